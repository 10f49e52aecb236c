"""Box reward: format bonus + matched box IoU, verl's compute_score signature, shared geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from verl_grto.data.masks import encode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ToolPrompt, format_answer
from verl_grto.reward.box_reward import FORMAT_REWARD, compute_score, score_box_answer
from verl_grto.reward.geometry import box_iou, greedy_match, matched_mean_iou, pairwise_box_iou


def _gt(boxes: list[list[float]], h: int = 100, w: int = 120) -> str:
    mask = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        mask[int(y1) : int(y2), int(x1) : int(x2)] = True
    return GroundTruth(mask_rle=encode_rle(mask), boxes=boxes, image_size=(h, w)).to_json()


def _answer(*boxes: tuple[float, float, float, float], think: str = "look") -> str:
    return format_answer([ToolPrompt(box=b) for b in boxes], think=think)


# ---------------------------------------------------------------- geometry


def test_box_iou_values() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching, exclusive x2
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    m = pairwise_box_iou([[0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]], [[0, 0, 10, 10], [5, 0, 15, 10]])
    assert m.shape == (3, 2)
    assert m[1, 0] == pytest.approx(50 / 150) and m[1, 1] == 1.0 and not m[2].any()


def test_greedy_match_is_one_to_one_and_best_first() -> None:
    iou = np.array([[0.9, 0.8], [0.85, 0.1], [0.0, 0.0]])
    assert greedy_match(iou) == [(0, 0, 0.9), (1, 1, 0.1)]
    # 3 predictions for 2 objects: the unmatched third counts as a zero
    assert matched_mean_iou(iou) == pytest.approx((0.9 + 0.1) / 3)
    assert matched_mean_iou(np.zeros((0, 2))) == 0.0


# ---------------------------------------------------------------- reward


def test_perfect_answer_scores_format_plus_one() -> None:
    r = score_box_answer(_answer((10, 20, 50, 60)), _gt([[10, 20, 50, 60]]))
    assert r.parse_ok and r.reason == ""
    assert r.box_iou == pytest.approx(1.0)
    assert r.format_reward == FORMAT_REWARD
    assert r.score == pytest.approx(1.0 + FORMAT_REWARD)


def test_partial_overlap_scores_its_iou() -> None:
    r = score_box_answer(_answer((10, 20, 50, 60)), _gt([[30, 20, 70, 60]]))
    assert r.box_iou == pytest.approx(box_iou([10, 20, 50, 60], [30, 20, 70, 60]))
    assert r.score == pytest.approx(FORMAT_REWARD + r.box_iou)


def test_missing_think_loses_only_the_format_bonus() -> None:
    text = '<answer>{"bbox": [10, 20, 50, 60]}</answer>'
    r = score_box_answer(text, _gt([[10, 20, 50, 60]]))
    assert r.parse_ok and r.format_reward == 0.0 and r.box_iou == pytest.approx(1.0)
    assert r.reason == "no <think> block before <answer>"


@pytest.mark.parametrize(
    "text",
    ["", "<think>x</think>", '<think>x</think><answer>{"bbox": [10, 20, 500, 60]}</answer>', "<answer>[1,2</answer>"],
)
def test_malformed_answer_scores_zero_with_a_reason(text: str) -> None:
    r = score_box_answer(text, _gt([[10, 20, 50, 60]]))
    assert r.score == 0.0 and r.format_reward == 0.0 and not r.parse_ok
    assert r.reason


def test_multi_object_matching_is_order_free_and_penalises_extras() -> None:
    gt = _gt([[0, 0, 20, 20], [50, 50, 90, 90]])
    both = score_box_answer(_answer((50, 50, 90, 90), (0, 0, 20, 20)), gt)
    assert both.box_iou == pytest.approx(1.0)
    one = score_box_answer(_answer((0, 0, 20, 20)), gt)
    assert one.box_iou == pytest.approx(0.5)
    extra = score_box_answer(_answer((0, 0, 20, 20), (50, 50, 90, 90), (100, 0, 110, 10)), gt)
    assert extra.box_iou == pytest.approx(2 / 3)


def test_points_only_object_counts_as_zero_iou() -> None:
    text = format_answer([ToolPrompt(points=((15, 30),), labels=(1,))])
    r = score_box_answer(text, _gt([[10, 20, 50, 60]]))
    assert r.parse_ok and r.box_iou == 0.0 and r.score == pytest.approx(FORMAT_REWARD)


def test_answer_is_checked_against_the_ground_truth_image_size() -> None:
    # x2=110 is inside a 120-wide image but outside a 100-wide one
    text = _answer((10, 20, 110, 60))
    assert score_box_answer(text, _gt([[10, 20, 50, 60]], h=100, w=120)).parse_ok
    assert not score_box_answer(text, _gt([[10, 20, 50, 60]], h=120, w=100)).parse_ok


def test_bad_ground_truth_raises() -> None:
    with pytest.raises(ValueError, match="boxes"):
        score_box_answer(
            _answer((1, 2, 3, 4)), json.dumps({"mask": {"size": [4, 4], "counts": ""}, "image_size": [4, 4]})
        )


def test_compute_score_has_verls_signature_and_keys() -> None:
    out = compute_score(
        "grto/synthetic/plain", _answer((10, 20, 50, 60)), _gt([[10, 20, 50, 60]]), extra_info={"index": 0}
    )
    assert set(out) == {"score", "format_reward", "box_iou", "parse_ok", "reason"}
    assert out["parse_ok"] == 1 and isinstance(out["parse_ok"], int)
    assert out["score"] == pytest.approx(1.0 + FORMAT_REWARD)
    bad = compute_score("grto/synthetic/plain", "nonsense", _gt([[10, 20, 50, 60]]))
    assert bad["parse_ok"] == 0 and bad["score"] == 0.0 and bad["reason"] == "no <answer> tag"
