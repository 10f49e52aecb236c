"""gIoU / cIoU with the documented empty-mask rule, the COD suite, and the baseline predictors."""

from __future__ import annotations

import numpy as np
import py_sod_metrics
import pytest

from verl_grto.data.schema import GroundTruth
from verl_grto.eval import baselines
from verl_grto.eval.metrics import CODAccumulator, IoUAccumulator, intersection_union


def _mask(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows, cols] = True
    return m


def test_giou_is_mean_of_ious_and_ciou_is_ratio_of_sums():
    acc = IoUAccumulator()
    small_gt = _mask(10, 10, slice(0, 2), slice(0, 2))  # 4 px
    half = _mask(10, 10, slice(0, 1), slice(0, 2))  # 2 px inside it
    big_gt = _mask(10, 10, slice(0, 10), slice(0, 10))  # 100 px
    assert acc.add(half, small_gt) == 0.5
    assert acc.add(big_gt, big_gt) == 1.0
    r = acc.results()
    assert r["gIoU"] == pytest.approx(0.75) and r["cIoU"] == pytest.approx(102 / 104) and r["n"] == 2


def test_empty_mask_rule():
    empty = np.zeros((5, 5), bool)
    gt = _mask(5, 5, slice(1, 3), slice(1, 3))
    acc = IoUAccumulator()
    assert acc.add(empty, empty) == 1.0  # both empty: a perfect answer
    assert acc.add(None, empty) == 1.0  # missing prediction = empty prediction
    assert (acc.intersection, acc.union) == (0, 0)
    assert acc.add(None, gt) == 0.0  # missing prediction on a real target
    assert (acc.intersection, acc.union) == (0, 4)  # ... counts its whole ground truth in the union
    assert acc.results()["cIoU"] == 0.0
    only_empty = IoUAccumulator()
    only_empty.add(empty, empty)
    assert only_empty.results() == {"gIoU": 1.0, "cIoU": 1.0, "n": 1}


def test_ignore_pixels_count_nowhere_and_uint8_threshold():
    gt = _mask(6, 6, slice(0, 3), slice(0, 6))
    ignore = _mask(6, 6, slice(3, 6), slice(0, 3))
    pred = gt | ignore  # spills only into the ignore region
    assert intersection_union(pred, gt, ignore) == (18, 18)
    assert intersection_union(pred, gt) == (18, 27)
    u8 = np.where(gt, 128, 127).astype(np.uint8)
    assert intersection_union(u8, gt) == (18, 18)
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((5, 6), bool), gt)


def test_cod_suite_matches_pysodmetrics_called_directly():
    rng = np.random.default_rng(0)
    gts = [rng.random((24, 32)) > 0.7 for _ in range(4)]
    preds = [gts[0], rng.random((24, 32)) > 0.5, None, (rng.random((24, 32)) * 255).astype(np.uint8)]
    acc = CODAccumulator()
    sm, em, wfm, mae = (
        py_sod_metrics.Smeasure(),
        py_sod_metrics.Emeasure(),
        py_sod_metrics.WeightedFmeasure(),
        py_sod_metrics.MAE(),
    )
    for p, g in zip(preds, gts, strict=True):
        acc.add(p, g)
        p_u8 = np.zeros(g.shape, np.uint8) if p is None else (p.astype(np.uint8) * 255 if p.dtype == bool else p)
        for m in (sm, em, wfm, mae):
            m.step(pred=p_u8, gt=g.astype(np.uint8) * 255)
    r = acc.results()
    curve = em.get_results()["em"]["curve"]
    assert r["S_measure"] == pytest.approx(sm.get_results()["sm"])
    assert r["E_measure_adaptive"] == pytest.approx(em.get_results()["em"]["adp"])
    assert r["E_measure_mean"] == pytest.approx(curve.mean()) and r["E_measure_max"] == pytest.approx(curve.max())
    assert r["weighted_F"] == pytest.approx(wfm.get_results()["wfm"])
    assert r["MAE"] == pytest.approx(mae.get_results()["mae"])
    assert r["n"] == 4
    perfect = CODAccumulator()
    perfect.add(gts[0], gts[0])
    assert perfect.results()["S_measure"] == pytest.approx(1.0) and perfect.results()["MAE"] == 0.0


def test_box_fill_covers_every_pixel_a_box_touches():
    gt = GroundTruth(
        mask_rle={"size": [8, 10], "counts": ""}, boxes=[[1.5, 2, 4, 3.2], [8, 6, 12, 9]], image_size=(8, 10)
    )
    expected = np.zeros((8, 10), bool)
    expected[2:4, 1:4] = True
    expected[6:8, 8:10] = True  # clipped to the image
    assert np.array_equal(baselines.box_fill(gt, {}), expected)
    assert not baselines.fill_boxes([], 8, 10).any()


def test_random_object_box_is_one_of_the_objects_and_deterministic():
    boxes = [[0, 0, 2, 2], [3, 3, 6, 6], [7, 1, 9, 4]]
    gt = GroundTruth(mask_rle={"size": [10, 10], "counts": ""}, boxes=[boxes[0]], image_size=(10, 10))
    fills = [baselines.fill_boxes([b], 10, 10) for b in boxes]
    picks = []
    for i in range(30):
        extra = {"sample_id": f"s{i}", "object_boxes": "[[0, 0, 2, 2], [3, 3, 6, 6], [7, 1, 9, 4]]"}
        m = baselines.random_object_box(gt, extra)
        assert np.array_equal(m, baselines.random_object_box(gt, extra))
        picks.append(next(k for k, f in enumerate(fills) if np.array_equal(f, m)))
    assert set(picks) == {0, 1, 2}
    assert baselines.object_boxes({"object_boxes": ""}) is None
