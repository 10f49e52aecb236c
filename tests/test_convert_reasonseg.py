"""ReasonSeg converter on a fixture in LISA's release layout (dataset/reason_seg/ReasonSeg/<split>/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_layouts import (
    assert_row,
    make_scene,
    polygon,
    read_rows,
    reasonseg_json,
    rect_points,
    save_jpg,
    shape,
    tight_box,
    write_corrupt_jpg,
)

from verl_grto.data.convert import convert
from verl_grto.data.masks import decode_rle


@pytest.fixture(params=["synthetic", "arc2017"])
def scene(request):
    return make_scene(request.param)


def _release(tmp_path, scene):
    root = tmp_path / "dataset" / "reason_seg" / "ReasonSeg"
    # val/a: two target polygons from real masks, plus a "flag" shape that must be ignored
    save_jpg(root / "val" / "a.jpg", scene.rgb)
    m0, m1 = scene.masks[0], scene.masks[1]
    reasonseg_json(
        root / "val" / "a.json",
        [shape("target", polygon(m0)), shape("target", polygon(m1)), shape("flag", rect_points(0, 0, 5, 5))],
        ["what holds the water?", "a second phrasing"],
        is_sentence=False,
    )
    # val/b: a rectangle target with an "ignore" rectangle inside it (the smaller one is painted last)
    save_jpg(root / "val" / "b.jpg", scene.rgb)
    reasonseg_json(
        root / "val" / "b.json",
        [shape("ignore", rect_points(20, 10, 25, 15)), shape("target", rect_points(10, 5, 40, 30))],
        ["The thing you would sit on after a long walk."],
        is_sentence=True,
    )
    # train/c: every query becomes a row
    save_jpg(root / "train" / "c.jpg", scene.rgb)
    reasonseg_json(root / "train" / "c.json", [shape("target", polygon(m0))], ["q one", "q two"], is_sentence=False)
    return tmp_path / "dataset"


def test_round_trip(tmp_path, scene):
    src = _release(tmp_path, scene)
    report = convert("reasonseg", src, tmp_path / "out", progress=False)
    assert report.written == {"train": 2, "val": 2} and report.skipped == []

    val = read_rows(tmp_path / "out" / "val.parquet")
    m0, m1 = scene.masks[0], scene.masks[1]
    assert_row(val["reasonseg-val-a-q0"], m0 | m1, "what holds the water?", boxes=[tight_box(m0), tight_box(m1)])
    assert set(val) == {"reasonseg-val-a-q0", "reasonseg-val-b-q0"}  # val keeps the first query only

    rect = np.zeros(scene.hw, bool)
    rect[5:31, 10:41] = True
    hole = np.zeros(scene.hw, bool)
    hole[10:16, 20:26] = True
    b = val["reasonseg-val-b-q0"]
    assert_row(b, rect & ~hole, "The thing you would sit on after a long walk.", boxes=[tight_box(rect)])
    assert np.array_equal(decode_rle(json.loads(b["extra_info"]["ignore_mask"])), hole)
    assert b["extra_info"]["is_sentence"] is True
    assert val["reasonseg-val-a-q0"]["extra_info"]["ignore_mask"] == ""

    train = read_rows(tmp_path / "out" / "train.parquet")
    assert sorted(r["extra_info"]["expression"] for r in train.values()) == ["q one", "q two"]
    assert sorted(r["extra_info"]["index"] for r in train.values()) == [0, 1]
    assert all(r["data_source"] == "reasonseg" for r in train.values())


def test_long_and_short_query_subsets(tmp_path):
    src = _release(tmp_path, make_scene("synthetic"))
    report = convert("reasonseg", src, tmp_path / "long", splits=["val"], queries="long", progress=False)
    assert report.written == {"val_long": 1} and report.excluded == {"val_long": {"short query": 1}}
    assert set(read_rows(tmp_path / "long" / "val_long.parquet")) == {"reasonseg-val_long-b-q0"}
    convert("reasonseg", src, tmp_path / "short", splits=["val"], queries="short", all_queries=True, progress=False)
    assert set(read_rows(tmp_path / "short" / "val_short.parquet")) == {
        "reasonseg-val_short-a-q0",
        "reasonseg-val_short-a-q1",
    }


def test_bad_rows_are_reported_by_file_and_row(tmp_path):
    scene = make_scene("synthetic")
    val = tmp_path / "val"
    save_jpg(val / "good.jpg", scene.rgb)
    reasonseg_json(val / "good.json", [shape("target", polygon(scene.masks[0]))], ["ok"], is_sentence=False)
    write_corrupt_jpg(val / "corrupt.jpg")
    reasonseg_json(val / "corrupt.json", [shape("target", polygon(scene.masks[0]))], ["x"], is_sentence=False)
    save_jpg(val / "badjson.jpg", scene.rgb)
    (val / "badjson.json").write_text('{"text": ["x"], "shapes": [')
    save_jpg(val / "badpoints.jpg", scene.rgb)
    reasonseg_json(val / "badpoints.json", [shape("target", [[1, 2]])], ["x"], is_sentence=False)
    save_jpg(val / "noanno.jpg", scene.rgb)
    reasonseg_json(val / "noimage.json", [shape("target", polygon(scene.masks[0]))], ["x"], is_sentence=False)

    report = convert("reasonseg", tmp_path, tmp_path / "out", progress=False)
    assert report.written == {"val": 1}
    got = {(s.file.split("/")[-1], s.row): s.reason for s in report.skipped}
    assert set(got) == {
        ("corrupt.json", "corrupt"),
        ("badjson.json", "badjson"),
        ("badpoints.json", "badpoints"),
        ("noanno.jpg", "noanno"),
        ("noimage.json", "noimage"),
    }
    assert got[("corrupt.json", "corrupt")].startswith("corrupt image corrupt.jpg")
    assert got[("badjson.json", "badjson")].startswith("malformed annotation")
    assert got[("badpoints.json", "badpoints")].startswith("malformed annotation")
    assert got[("noanno.jpg", "noanno")].startswith("missing annotation")
    assert got[("noimage.json", "noimage")] == "missing image noimage.jpg"
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert len(saved["skipped"]) == 5 and saved["skipped_per_split"] == {"val": 5}


def test_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ReasonSeg"):
        convert("reasonseg", tmp_path, tmp_path / "out", progress=False)
