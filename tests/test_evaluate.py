"""evaluate_predictions reproduces independently computed metrics; evaluate() resumes."""

from __future__ import annotations

import json

import numpy as np
import py_sod_metrics
import pytest
from benchmark_layouts import make_scene, save_mask_png, tight_box
from PIL import Image

from verl_grto.data.masks import encode_rle
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth, RLRow, build_instruction
from verl_grto.eval import baselines
from verl_grto.eval.evaluate import evaluate, evaluate_predictions, format_table


def _write_split(path, samples, with_objects):
    """samples: (sample_id, gt mask, ignore mask | None, object boxes)."""
    records = []
    for i, (sid, gt, ignore, objects) in enumerate(samples):
        h, w = gt.shape
        extra = {"ignore_mask": json.dumps(encode_rle(ignore)) if ignore is not None else ""}
        if with_objects:
            extra["object_boxes"] = json.dumps(objects)
        records.append(
            RLRow(
                data_source="t",
                instruction=build_instruction("x", w, h),
                image_png=b"",
                index=i,
                sample_id=sid,
                split="test",
                expression="x",
                extra=extra,
                ground_truth=GroundTruth(encode_rle(gt), [tight_box(gt)] if gt.any() else [], (h, w)),
            ).to_record()
        )
    write_rows_atomic(records, path)


def _iou(pred, gt, ignore=None):
    valid = np.ones_like(gt) if ignore is None else ~ignore
    i, u = int((pred & gt & valid).sum()), int(((pred | gt) & valid).sum())
    return i, u


@pytest.fixture
def split(tmp_path):
    s = make_scene("synthetic")
    m0, m1, m2 = s.masks
    ignore = np.zeros(s.hw, bool)
    ignore[40:50, 60:70] = True
    boxes = [tight_box(m) for m in s.masks]
    samples = [
        ("a", m0, None, boxes),
        ("b", m1, None, boxes),
        ("c", np.zeros(s.hw, bool), None, []),
        ("d", m2, None, boxes),
        ("e", m2 & ~ignore, ignore, boxes[2:]),
    ]
    _write_split(tmp_path / "test.parquet", samples, with_objects=True)
    return tmp_path / "test.parquet", samples


def test_scores_match_independent_numpy_and_pysodmetrics(tmp_path, split):
    parquet, samples = split
    preds_dir = tmp_path / "preds"
    gts = {sid: gt for sid, gt, _, _ in samples}
    shifted = np.roll(gts["a"], 3, axis=1)
    save_mask_png(preds_dir / "a.png", shifted)  # a: imperfect
    # b: missing -> empty prediction
    save_mask_png(preds_dir / "c.png", np.zeros_like(gts["c"]))  # c: empty GT, empty prediction -> IoU 1
    save_mask_png(preds_dir / "d.png", gts["d"][:-1])  # d: wrong size -> invalid -> empty prediction
    ignore = samples[4][2]
    save_mask_png(preds_dir / "e.png", gts["e"] | ignore)  # e: spills only into the ignore region -> IoU 1
    report = evaluate_predictions(parquet, preds_dir, "cod", tmp_path / "report.json")

    empty = np.zeros_like(gts["a"])
    used = {"a": shifted, "b": empty, "c": empty, "d": empty, "e": gts["e"] | ignore}
    terms = [_iou(used[sid], gt, ign) for sid, gt, ign, _ in samples]
    ious = [1.0 if u == 0 else i / u for i, u in terms]
    assert ious[2] == 1.0 and ious[4] == 1.0 and ious[1] == 0.0 and ious[3] == 0.0
    p = report["scores"]["prediction"]
    assert p["gIoU"] == pytest.approx(np.mean(ious))
    assert p["cIoU"] == pytest.approx(sum(i for i, _ in terms) / sum(u for _, u in terms))
    assert (report["missing"], report["invalid"], report["n"]) == (1, 1, 5)
    assert report["missing_ids"] == ["b"] and "differs from image" in report["invalid_ids"]["d"]

    sm, em, wfm, mae = (
        py_sod_metrics.Smeasure(),
        py_sod_metrics.Emeasure(),
        py_sod_metrics.WeightedFmeasure(),
        py_sod_metrics.MAE(),
    )
    for sid, gt, _, _ in samples:
        for m in (sm, em, wfm, mae):
            m.step(pred=used[sid].astype(np.uint8) * 255, gt=gt.astype(np.uint8) * 255)
    assert p["S_measure"] == pytest.approx(sm.get_results()["sm"])
    assert p["E_measure_max"] == pytest.approx(em.get_results()["em"]["curve"].max())
    assert p["weighted_F"] == pytest.approx(wfm.get_results()["wfm"])
    assert p["MAE"] == pytest.approx(mae.get_results()["mae"])

    fill_ious = []
    for _, gt, ign, _ in samples:
        fill = np.zeros_like(gt)
        if gt.any():
            x1, y1, x2, y2 = (int(v) for v in tight_box(gt))
            fill[y1:y2, x1:x2] = True
        i, u = _iou(fill, gt, ign)
        fill_ious.append(1.0 if u == 0 else i / u)
    assert report["scores"]["box_fill"]["gIoU"] == pytest.approx(np.mean(fill_ious))
    rand_ious = []
    for sid, gt, ign, objects in samples:
        pick = baselines.random_object_box(
            GroundTruth(encode_rle(gt), [], gt.shape), {"sample_id": sid, "object_boxes": json.dumps(objects)}
        )
        assert not objects or any(np.array_equal(pick, baselines.fill_boxes([b], *gt.shape)) for b in objects)
        i, u = _iou(pick, gt, ign)
        rand_ious.append(1.0 if u == 0 else i / u)
    assert report["scores"]["random_object_box"]["gIoU"] == pytest.approx(np.mean(rand_ious))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = format_table(report)
    assert "prediction" in table and "box_fill" in table and "random_object_box" in table
    assert f"{p['gIoU']:.4f}" in table and "1 missing, 1 invalid" in table


def test_random_object_baseline_only_with_several_objects(tmp_path):
    s = make_scene("synthetic")
    _write_split(tmp_path / "single.parquet", [("a", s.masks[0], None, [tight_box(s.masks[0])])], with_objects=True)
    _write_split(tmp_path / "none.parquet", [("a", s.masks[0], None, [])], with_objects=False)
    for name in ("single", "none"):
        report = evaluate_predictions(tmp_path / f"{name}.parquet", tmp_path / "preds", "seg", tmp_path / "r.json")
        assert set(report["scores"]) == {"prediction", "box_fill"}
        assert "S_measure" not in report["scores"]["prediction"]


def test_evaluate_runs_the_predictor_only_where_no_png_exists(tmp_path, split):
    parquet, samples = split
    preds_dir = tmp_path / "preds"
    gts = {sid: gt for sid, gt, _, _ in samples}
    save_mask_png(preds_dir / "a.png", gts["a"])
    save_mask_png(preds_dir / "b.png", gts["b"])
    calls = []

    def predictor(row):
        sid = row["extra_info"]["sample_id"]
        calls.append(sid)
        assert row["prompt"][0]["content"].startswith("<image>") and "images" in row
        return gts[sid]

    report = evaluate(parquet, predictor, preds_dir, suite="seg", report_path=tmp_path / "r.json", progress=False)
    assert calls == ["c", "d", "e"]
    assert report["missing"] == 0 and report["scores"]["prediction"]["gIoU"] == 1.0
    written = np.asarray(Image.open(preds_dir / "d.png"))
    assert written.dtype == np.uint8 and set(np.unique(written)) == {0, 255}
    assert np.array_equal(written == 255, gts["d"])
    assert not [p for p in preds_dir.iterdir() if not p.name.endswith(".png")]  # no temp files left

    calls.clear()
    evaluate(parquet, predictor, preds_dir, suite="seg", report_path=tmp_path / "r.json", progress=False)
    assert calls == []


def test_a_predictor_returning_the_wrong_size_fails_loudly(tmp_path, split):
    parquet, _ = split
    with pytest.raises(ValueError, match="expected"):
        evaluate(
            parquet,
            lambda row: np.zeros((3, 3), bool),
            tmp_path / "p",
            suite="seg",
            report_path=tmp_path / "r.json",
            progress=False,
        )
