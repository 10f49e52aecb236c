"""Box reward: a small bonus for the answer format plus the IoU of the answered box(es).

This is the reward of the policy-only baseline (no tool in the loop) and the localisation part of
the tool rewards. ``score = format_reward + box_iou`` where

* ``format_reward`` = :data:`FORMAT_REWARD` when the answer parses *and* a ``<think>`` block precedes
  it, else 0 - small, so a policy cannot live on format alone;
* ``box_iou`` = greedy matched mean IoU of the answered boxes with the ground-truth boxes, divided by
  ``max(#answered, #ground truth)`` (see :mod:`verl_grto.reward.geometry`); an answered object without
  a bbox (points only) counts as IoU 0. Points are ignored here: they only matter through the tool.

Answers are read in the row's answer frame and scored in its image frame
(:func:`verl_grto.reward.frame.parse_policy_answer`). A malformed ground truth raises: that is a data bug and must be loud. A malformed answer never raises.
A recipe names its policy's coordinate convention to this function (``reward_kwargs.answer_coords``); a
row of the other convention then raises too, instead of being scored in the wrong frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from verl_grto.data.schema import GroundTruth
from verl_grto.reward.frame import parse_policy_answer
from verl_grto.reward.geometry import matched_mean_iou, pairwise_box_iou

FORMAT_REWARD = 0.1


@dataclass(frozen=True)
class RewardBreakdown:
    """The score and its parts, as logged per sample."""

    score: float
    format_reward: float
    box_iou: float
    parse_ok: bool
    reason: str


def score_box_answer(
    solution_str: str,
    ground_truth: str | dict[str, Any] | GroundTruth,
    extra_info: dict[str, Any] | None = None,
    answer_coords: str | None = None,
) -> RewardBreakdown:
    """Score one decoded response against a ground truth (JSON string, dict or :class:`GroundTruth`).

    ``answer_coords``: the policy's coordinate convention, when known (a row asking for the other raises)."""
    gt = ground_truth if isinstance(ground_truth, GroundTruth) else GroundTruth.from_json(ground_truth)
    parsed = parse_policy_answer(solution_str, gt, answer_coords)
    if not parsed.ok:
        return RewardBreakdown(score=0.0, format_reward=0.0, box_iou=0.0, parse_ok=False, reason=parsed.reason)
    format_reward = FORMAT_REWARD if parsed.has_think else 0.0
    # A points-only object gets an empty box, i.e. IoU 0 with everything, but still counts in the denominator.
    pred_boxes = [obj.box if obj.box is not None else (0.0, 0.0, 0.0, 0.0) for obj in parsed.objects]
    iou = matched_mean_iou(pairwise_box_iou(pred_boxes, gt.boxes))
    reason = "" if parsed.has_think else "no <think> block before <answer>"
    return RewardBreakdown(
        score=format_reward + iou, format_reward=format_reward, box_iou=iou, parse_ok=True, reason=reason
    )


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """verl's custom reward function signature (``custom_reward_function.name=compute_score``).

    ``score`` is the reward; the other keys become per-sample extra info / validation metrics (verl
    averages numbers and skips strings, so ``reason`` is only visible in dumps). ``answer_coords`` (from
    the recipe's ``reward.custom_reward_function.reward_kwargs``) is the policy's coordinate convention.
    """
    out = asdict(score_box_answer(solution_str, ground_truth, extra_info, kwargs.get("answer_coords")))
    out["parse_ok"] = int(out["parse_ok"])
    return out
