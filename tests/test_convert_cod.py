"""COD10K / CAMO / NC4K converters on fixtures in their release layouts; whole-or-nothing output."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_layouts import assert_row, make_scene, read_rows, save_jpg, save_mask_png, write_corrupt_jpg
from PIL import Image

import verl_grto.data.convert.base as base
from verl_grto.data.convert import CONVERTERS, convert
from verl_grto.data.convert.cod import PROMPTS

CAM = "COD10K-CAM-1-Aquatic-1-BatFish-{}"
NONCAM = "COD10K-NonCAM-1-Aquatic-1-BatFish-{}"


def _soft_edge_png(path, mask):
    """A GT PNG as releases have them: 255 inside, plus anti-aliased grey pixels (100 off, 200 on)."""
    grey = np.where(mask, 255, 0).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    grey[ys[0], xs[0]] = 200  # still foreground (> 128)
    grey[0, 0] = 100  # still background
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey).save(path)


def _cod10k(root, scene):
    rel = root / "COD10K-v3"
    for split, folder in (("train", "Train"), ("test", "Test")):
        for i, m in enumerate(scene.masks[:2]):
            save_jpg(rel / folder / "Image" / f"{CAM.format(f'{split}{i}')}.jpg", scene.rgb)
            _soft_edge_png(rel / folder / "GT_Object" / f"{CAM.format(f'{split}{i}')}.png", m)
    save_jpg(rel / "Test" / "Image" / f"{NONCAM.format(9)}.jpg", scene.rgb)
    save_mask_png(rel / "Test" / "GT_Object" / f"{NONCAM.format(9)}.png", np.zeros(scene.hw, bool))
    return rel


@pytest.mark.parametrize("kind", ["synthetic", "arc2017"])
def test_cod10k_round_trip(tmp_path, kind):
    scene = make_scene(kind)
    _cod10k(tmp_path, scene)
    report = convert("cod10k", tmp_path, tmp_path / "out", progress=False)  # the folder holding COD10K-v3/
    assert report.written == {"train": 2, "test": 2} and report.skipped == []
    assert report.excluded == {"test": {"non-camouflaged image (COD10K-NonCAM)": 1}}
    test = read_rows(tmp_path / "out" / "test.parquet")
    for i, m in enumerate(scene.masks[:2]):
        row = test[f"cod10k-test-{CAM.format(f'test{i}')}"]
        assert_row(row, m, PROMPTS[0])  # the fixed prompt on test
        assert row["data_source"] == "cod10k"
    train = read_rows(tmp_path / "out" / "train.parquet")
    assert all(r["extra_info"]["expression"] in PROMPTS for r in train.values())
    again = convert("cod10k", tmp_path / "COD10K-v3", tmp_path / "out2", progress=False)  # the release folder itself
    assert again.written == report.written
    assert read_rows(tmp_path / "out2" / "train.parquet").keys() == train.keys()
    assert [r["extra_info"]["expression"] for r in read_rows(tmp_path / "out2" / "train.parquet").values()] == [
        r["extra_info"]["expression"] for r in train.values()
    ]  # deterministic prompt variants


def test_camo_and_nc4k_layouts(tmp_path):
    scene = make_scene("synthetic")
    camo = tmp_path / "CAMO-V.1.0-CVIU2019"
    save_jpg(camo / "Images" / "Train" / "camourflage_00001.jpg", scene.rgb)
    save_jpg(camo / "Images" / "Test" / "camourflage_00002.jpg", scene.rgb)
    for n, m in (("00001", scene.masks[0]), ("00002", scene.masks[1])):
        save_mask_png(camo / "GT" / f"camourflage_{n}.png", m)
    report = convert("camo", camo, tmp_path / "camo_out", progress=False)
    assert report.written == {"train": 1, "test": 1} and report.skipped == []  # the shared GT folder is no error
    assert_row(
        read_rows(tmp_path / "camo_out" / "test.parquet")["camo-test-camourflage_00002"], scene.masks[1], PROMPTS[0]
    )

    nc4k = tmp_path / "NC4K"
    save_jpg(nc4k / "Imgs" / "1.jpg", scene.rgb)
    save_mask_png(nc4k / "GT" / "1.png", scene.masks[2])
    report = convert("nc4k", tmp_path, tmp_path / "nc4k_out", progress=False)
    assert report.written == {"test": 1}
    assert_row(read_rows(tmp_path / "nc4k_out" / "test.parquet")["nc4k-test-1"], scene.masks[2], PROMPTS[0])


def test_bad_rows_are_reported_by_file_and_row(tmp_path):
    scene = make_scene("synthetic")
    nc4k = tmp_path / "NC4K"
    save_jpg(nc4k / "Imgs" / "good.jpg", scene.rgb)
    save_mask_png(nc4k / "GT" / "good.png", scene.masks[0])
    write_corrupt_jpg(nc4k / "Imgs" / "corrupt.jpg")
    save_mask_png(nc4k / "GT" / "corrupt.png", scene.masks[0])
    save_jpg(nc4k / "Imgs" / "nomask.jpg", scene.rgb)
    save_jpg(nc4k / "Imgs" / "small.jpg", scene.rgb)
    save_mask_png(nc4k / "GT" / "small.png", scene.masks[0][:-2])
    save_jpg(nc4k / "Imgs" / "empty.jpg", scene.rgb)
    save_mask_png(nc4k / "GT" / "empty.png", np.zeros(scene.hw, bool))
    save_mask_png(nc4k / "GT" / "orphan.png", scene.masks[0])

    report = convert("nc4k", nc4k, tmp_path / "out", progress=False)
    assert report.written == {"test": 1}
    got = {(s.file.split("/")[-1], s.row): s.reason for s in report.skipped}
    h, w = scene.hw
    assert got == {
        ("corrupt.jpg", "corrupt"): got[("corrupt.jpg", "corrupt")],
        ("nomask.jpg", "nomask"): "missing mask GT/nomask.png for image nomask.jpg",
        ("small.jpg", "small"): f"mask size {h - 2}x{w} (small.png) differs from image size {h}x{w} (small.jpg) (HxW)",
        ("empty.jpg", "empty"): "empty mask empty.png",
        ("orphan.png", "orphan"): "mask orphan.png has no image",
    }
    assert got[("corrupt.jpg", "corrupt")].startswith("corrupt image corrupt.jpg")
    summary = report.summary()
    assert "test: written 1, skipped 5" in summary and "orphan.png :: orphan: mask orphan.png has no image" in summary


def test_registry():
    assert set(CONVERTERS) == {"reasonseg", "refcoco", "refcoco+", "refcocog", "cod10k", "camo", "nc4k", "earthreason"}
    with pytest.raises(KeyError, match="unknown dataset 'coco'"):
        convert("coco", ".", ".")


def test_exception_mid_conversion_leaves_no_output(tmp_path, monkeypatch):
    scene = make_scene("synthetic")
    rel = _cod10k(tmp_path, scene)
    real_to_record = base._to_record
    calls = []

    def crash_in_test_split(data_source, split, index, sample, *rest):
        calls.append(split)
        if split == "test" and index == 1:
            raise RuntimeError("disk on fire")
        return real_to_record(data_source, split, index, sample, *rest)

    monkeypatch.setattr(base, "_to_record", crash_in_test_split)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert("cod10k", rel, out, progress=False)
    assert calls.count("train") == 2  # the train split was complete when test failed ...
    assert sorted(p.name for p in out.iterdir()) == []  # ... and is not published either; no staging left
