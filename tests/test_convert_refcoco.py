"""RefCOCO* converter on a fixture in the REFER layout, and the restricted unpickler it relies on."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from benchmark_layouts import (
    assert_row,
    coco_image_name,
    coco_polygon,
    make_scene,
    read_rows,
    ref,
    save_jpg,
    uncompressed_rle,
    write_corrupt_jpg,
    write_refs_pickle,
)
from pycocotools import mask as mask_utils

from verl_grto.data.convert import AnnotationFileError, convert
from verl_grto.data.safe_pickle import UnsafePickleError, load_data_pickle

IMAGES = "images/mscoco/images/train2014"


def _ann(ann_id, image_id, segmentation, mask, iscrowd=0):
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": segmentation,
        "area": float(mask.sum()),
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def _release(root, dataset="refcoco", split_by="unc", kind="synthetic"):
    a, b = make_scene(kind), make_scene("synthetic", seed=1)
    save_jpg(root / IMAGES / coco_image_name(1), a.rgb)
    save_jpg(root / IMAGES / coco_image_name(2), b.rgb)
    (h1, w1), (h2, w2) = a.hw, b.hw
    images = [
        {"id": 1, "file_name": coco_image_name(1), "height": h1, "width": w1},
        {"id": 2, "file_name": coco_image_name(2), "height": h2, "width": w2},
    ]
    anns = [
        _ann(101, 1, [coco_polygon(a.masks[0])], a.masks[0]),
        _ann(102, 1, uncompressed_rle(a.masks[1]), a.masks[1], iscrowd=1),
        _ann(103, 1, [coco_polygon(a.masks[2])], a.masks[2]),
        _ann(201, 2, [coco_polygon(b.masks[0])], b.masks[0]),
    ]
    refs = [
        ref(1, 101, 1, "train", ["left bowl", "the bowl on the left"]),
        ref(2, 102, 1, "val", ["red thing"]),
        ref(3, 201, 2, "testA", ["square"]),
        ref(4, 103, 1, "testB", ["the triangle"]),
    ]
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": []})
    )
    write_refs_pickle(root / dataset / f"refs({split_by}).p", refs)
    return a, b, images, anns, refs


def _polygon_mask(poly, h, w):
    """COCO's own rasterisation of a polygon: the definition of the benchmark's ground truth."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


@pytest.mark.parametrize("kind", ["synthetic", "arc2017"])
def test_round_trip(tmp_path, kind):
    a, b, images, anns, _ = _release(tmp_path / "refer", kind=kind)
    report = convert("refcoco", tmp_path / "refer", tmp_path / "out", progress=False)
    assert report.written == {"train": 2, "val": 1, "testA": 1, "testB": 1} and report.skipped == []
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [
        "testA.parquet",
        "testB.parquet",
        "train.parquet",
        "val.parquet",
    ]

    train = read_rows(tmp_path / "out" / "train.parquet")
    poly0 = _polygon_mask(anns[0]["segmentation"][0], *a.hw)
    assert_row(train["refcoco-unc-train-r1-s10"], poly0, "left bowl")
    assert_row(train["refcoco-unc-train-r1-s11"], poly0, "the bowl on the left")
    assert np.logical_xor(poly0, a.masks[0]).sum() <= 0.2 * a.masks[0].sum()  # the polygon is the mask's outline
    # the uncompressed-RLE annotation decodes to the source mask exactly
    val = read_rows(tmp_path / "out" / "val.parquet")
    assert_row(val["refcoco-unc-val-r2-s20"], a.masks[1], "red thing")
    extra = val["refcoco-unc-val-r2-s20"]["extra_info"]
    assert (extra["ref_id"], extra["ann_id"], extra["image_id"]) == (2, 102, 1)
    boxes = json.loads(extra["object_boxes"])
    assert len(boxes) == 3 and [x + 0.0 for x in anns[1]["bbox"][:2]] == boxes[1][:2]
    test_a = read_rows(tmp_path / "out" / "testA.parquet")
    assert_row(test_a["refcoco-unc-testA-r3-s30"], _polygon_mask(anns[3]["segmentation"][0], *b.hw), "square")
    assert json.loads(test_a["refcoco-unc-testA-r3-s30"]["extra_info"]["object_boxes"]) == [
        [
            anns[3]["bbox"][0],
            anns[3]["bbox"][1],
            anns[3]["bbox"][0] + anns[3]["bbox"][2],
            anns[3]["bbox"][1] + anns[3]["bbox"][3],
        ]
    ]


def test_refcocog_umd_and_split_selection(tmp_path):
    _release(tmp_path / "refer", dataset="refcocog", split_by="umd")
    report = convert("refcocog", tmp_path / "refer", tmp_path / "out", splits=["val"], progress=False)
    assert report.written == {"val": 1}
    assert list(read_rows(tmp_path / "out" / "val.parquet")) == ["refcocog-umd-val-r2-s20"]
    with pytest.raises(ValueError, match="split_by"):
        convert("refcocog", tmp_path / "refer", tmp_path / "out", split_by="unc", progress=False)


def test_bad_rows_are_reported_by_file_and_row(tmp_path):
    root = tmp_path / "refer"
    a, _, images, anns, refs = _release(root)
    write_corrupt_jpg(root / IMAGES / coco_image_name(3))
    images += [
        {"id": 3, "file_name": coco_image_name(3), "height": 32, "width": 32},
        {"id": 4, "file_name": coco_image_name(1), "height": a.hw[0] + 1, "width": a.hw[1]},
    ]
    anns += [
        _ann(301, 3, [[1, 1, 20, 1, 20, 20]], np.ones((2, 2), bool)),
        _ann(401, 4, [coco_polygon(a.masks[0])], a.masks[0]),
    ]
    bad_refs = [
        {**ref(5, 101, 1, "val", ["x"]), "sentences": "not a list"},  # malformed ref
        ref(6, 999, 1, "val", ["x"]),  # annotation missing
        ref(7, 301, 3, "val", ["x"]),  # corrupt image
        ref(8, 401, 4, "val", ["x"]),  # instances.json size != image size
    ]
    (root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": []})
    )
    write_refs_pickle(root / "refcoco" / "refs(unc).p", refs + bad_refs)

    report = convert("refcoco", root, tmp_path / "out", progress=False)
    assert report.written == {"train": 2, "val": 1, "testA": 1, "testB": 1}
    got = {s.row: (s.split, s.file, s.reason) for s in report.skipped}
    refs_file = str(root / "refcoco" / "refs(unc).p")
    assert set(got) == {"ref #4 (ref_id 5)", "ref #5 (ref_id 6)", "ref #6 (ref_id 7)", "ref #7 (ref_id 8)"}
    assert all(split == "val" and file == refs_file for split, file, _ in got.values())
    assert got["ref #4 (ref_id 5)"][2].startswith("malformed ref")
    assert got["ref #5 (ref_id 6)"][2] == "ann_id 999 not in instances.json"
    assert got["ref #6 (ref_id 7)"][2].startswith(f"corrupt image {coco_image_name(3)}")
    assert got["ref #7 (ref_id 8)"][2].startswith(f"mask size {a.hw[0] + 1}x{a.hw[1]} (instances.json) differs")


def test_malformed_instances_file_is_a_clear_error(tmp_path):
    root = tmp_path / "refer"
    _release(root)
    (root / "refcoco" / "instances.json").write_text('{"images": [')
    with pytest.raises(AnnotationFileError, match=r"instances\.json"):
        convert("refcoco", root, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.parquet"))


class _Evil:
    def __reduce__(self):
        return (open, ("MARKER", "w"))


def test_unsafe_refs_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    root = tmp_path / "refer"
    _release(root)
    monkeypatch.chdir(tmp_path)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil()}], protocol=2))
    with pytest.raises(
        AnnotationFileError, match=r"refs\(unc\)\.p: cannot load refs pickle: refusing to load global io\.open"
    ):
        convert("refcoco", root, tmp_path / "out", progress=False)
    assert not (tmp_path / "MARKER").exists()


def test_safe_pickle_loads_plain_data_and_python2_strings(tmp_path):
    data = [{"a": 1, "b": [1.5, "x", (1, 2)], "c": {"d": None, "e": True}}]
    p = tmp_path / "ok.p"
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        p.write_bytes(pickle.dumps(data, protocol=protocol))
        assert load_data_pickle(p) == data
    # Python 2 protocol 2: ']' EMPTY_LIST, 'U' SHORT_BINSTRING (a py2 str of UTF-8 bytes), 'a' APPEND
    word = "café".encode()
    p.write_bytes(b"\x80\x02]U" + bytes([len(word)]) + word + b"a.")
    assert load_data_pickle(p) == ["café"]
    p.write_bytes(pickle.dumps({1, 2}, protocol=2))  # a set needs a global (written as Python 2's __builtin__.set)
    with pytest.raises(UnsafePickleError, match=r"ok\.p: refusing to load global __builtin__\.set"):
        load_data_pickle(p)
