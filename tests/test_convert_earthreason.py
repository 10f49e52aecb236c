"""EarthReason converter on a fixture in its release layout (<split>/images, labels, QAs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_layouts import assert_row, make_scene, read_rows, save_jpg, save_mask_png, write_corrupt_jpg

from verl_grto.data.convert import convert


def _qa(path, questions, answers):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"questions": questions, "answer": answers}))


def _release(root, scene):
    save_jpg(root / "train" / "images" / "t1.jpg", scene.rgb)
    save_mask_png(root / "train" / "labels" / "t1.png", scene.masks[0], value=1)  # any non-zero value is target
    _qa(root / "train" / "QAs" / "t1.json", ["Which area floods first?", "Where would water collect?"], ["The pond."])
    save_jpg(root / "train" / "images" / "t2.jpg", scene.rgb)
    save_mask_png(root / "train" / "labels" / "t2.png", np.zeros(scene.hw, bool))
    _qa(root / "train" / "QAs" / "t2.json", ["Where is the airport?"], [])
    # val as some unpacked archives nest it: val/val/images next to val/labels and val/QAs
    save_jpg(root / "val" / "val" / "images" / "v1.jpg", scene.rgb)
    save_mask_png(root / "val" / "labels" / "v1.png", scene.masks[1])
    _qa(root / "val" / "QAs" / "v1.json", ["Which structure stores grain?", "second"], ["The silo."])
    save_jpg(root / "val" / "val" / "images" / "v2.jpg", scene.rgb)
    save_mask_png(root / "val" / "labels" / "v2.png", np.zeros(scene.hw, bool))
    _qa(root / "val" / "QAs" / "v2.json", ["Where is the harbour?"], [])


@pytest.mark.parametrize("kind", ["synthetic", "arc2017"])
def test_round_trip(tmp_path, kind):
    scene = make_scene(kind)
    _release(tmp_path / "EarthReason", scene)
    report = convert("earthreason", tmp_path / "EarthReason", tmp_path / "out", progress=False)
    assert report.written == {"train": 2, "val": 2} and report.skipped == []
    assert report.excluded == {"train": {"no target in the image (empty mask)": 1}}  # negatives: not in train ...
    train = read_rows(tmp_path / "out" / "train.parquet")
    assert_row(train["earthreason-train-t1-q0"], scene.masks[0], "Which area floods first?")
    assert_row(train["earthreason-train-t1-q1"], scene.masks[0], "Where would water collect?")
    val = read_rows(tmp_path / "out" / "val.parquet")
    assert_row(val["earthreason-val-v1-q0"], scene.masks[1], "Which structure stores grain?")
    empty = np.zeros(scene.hw, bool)
    assert_row(val["earthreason-val-v2-q0"], empty, "Where is the harbour?", boxes=[])  # ... but kept in val
    assert val["earthreason-val-v2-q0"]["extra_info"]["has_target"] is False


def test_bad_rows_are_reported_by_file_and_row(tmp_path):
    scene = make_scene("synthetic")
    test = tmp_path / "test"
    save_jpg(test / "images" / "ok.jpg", scene.rgb)
    save_mask_png(test / "labels" / "ok.png", scene.masks[0])
    _qa(test / "QAs" / "ok.json", ["q"], ["a"])
    write_corrupt_jpg(test / "images" / "corrupt.jpg")
    save_mask_png(test / "labels" / "corrupt.png", scene.masks[0])
    _qa(test / "QAs" / "corrupt.json", ["q"], ["a"])
    save_jpg(test / "images" / "nolabel.jpg", scene.rgb)
    _qa(test / "QAs" / "nolabel.json", ["q"], ["a"])
    save_jpg(test / "images" / "wide.jpg", scene.rgb)
    save_mask_png(test / "labels" / "wide.png", np.zeros((scene.hw[0], scene.hw[1] + 3), bool))
    _qa(test / "QAs" / "wide.json", ["q"], [])
    save_jpg(test / "images" / "badqa.jpg", scene.rgb)
    save_mask_png(test / "labels" / "badqa.png", scene.masks[0])
    _qa(test / "QAs" / "badqa.json", [], ["a"])
    _qa(test / "QAs" / "lonely.json", ["q"], ["a"])

    report = convert("earthreason", tmp_path, tmp_path / "out", progress=False)
    assert report.written == {"test": 1}
    got = {(s.file.split("/")[-1], s.row): s.reason for s in report.skipped}
    h, w = scene.hw
    assert set(got) == {
        ("corrupt.jpg", "corrupt"),
        ("nolabel.jpg", "nolabel"),
        ("wide.jpg", "wide"),
        ("badqa.jpg", "badqa"),
        ("lonely.json", "lonely"),
    }
    assert got[("corrupt.jpg", "corrupt")].startswith("corrupt image corrupt.jpg")
    assert got[("nolabel.jpg", "nolabel")] == "missing mask nolabel.png"
    assert got[("wide.jpg", "wide")].startswith(
        f"mask size {h}x{w + 3} (labels/wide.png) differs from image size {h}x{w}"
    )
    assert got[("badqa.jpg", "badqa")].startswith("malformed annotation badqa.json")
    assert got[("lonely.json", "lonely")] == "annotation lonely.json has no image"
