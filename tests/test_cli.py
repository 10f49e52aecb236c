"""``verl-grto`` subcommands, called in-process through ``main([...])``: data, evaluate, predict, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from benchmark_layouts import make_scene, save_jpg, save_mask_png, write_corrupt_jpg
from PIL import Image

from verl_grto.cli import main
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.evaluate import prediction_path, write_prediction
from verl_grto.reward.answer import parse_answer


def _gt(row: dict) -> np.ndarray:
    return decode_rle(GroundTruth.from_json(row["reward_model"]["ground_truth"]).mask_rle)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    """A 6-row synthetic val split written by ``verl-grto data synthetic``."""
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["data", "synthetic", "--out", str(out), "--n-train", "1", "--n-val", "6", "--seed", "3"]) == 0
    return out / "val.parquet"


@pytest.fixture(scope="module")
def image(val, tmp_path_factory):
    """A PNG from the split: (path, height, width)."""
    row = pq.read_table(val).to_pylist()[0]
    path = tmp_path_factory.mktemp("image") / "scene.png"
    path.write_bytes(row["images"][0]["bytes"])
    h, w = GroundTruth.from_json(row["reward_model"]["ground_truth"]).image_size
    return path, h, w


def _camo(root):
    scene = make_scene("synthetic")
    camo = root / "CAMO-V.1.0-CVIU2019"
    save_jpg(camo / "Images" / "Train" / "camourflage_00001.jpg", scene.rgb)
    for n in ("00002", "00003"):
        save_jpg(camo / "Images" / "Test" / f"camourflage_{n}.jpg", scene.rgb)
    for n, m in (("00001", scene.masks[0]), ("00002", scene.masks[1]), ("00003", scene.masks[2])):
        save_mask_png(camo / "GT" / f"camourflage_{n}.png", m)
    return camo


def test_data_convert_then_score_predictions_with_the_cod_suite(tmp_path, capsys):
    out = tmp_path / "camo"
    rc = main(
        [
            "data",
            "convert",
            "camo",
            "--src",
            str(_camo(tmp_path)),
            "--out",
            str(out),
            "--opt",
            "splits=test",
            "--opt",
            "progress=false",
        ]
    )
    assert rc == 0
    assert "test: written 2, skipped 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.parquet")) == ["test.parquet"]  # the option reached the converter

    rows = pq.read_table(out / "test.parquet").to_pylist()
    preds = tmp_path / "preds"
    write_prediction(prediction_path(preds, rows[0]["extra_info"]["sample_id"]), _gt(rows[0]))  # perfect; 2nd missing
    assert (
        main(
            [
                "evaluate",
                "--split",
                str(out / "test.parquet"),
                "--predictions",
                str(preds),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["suite"] == "cod" and "S_measure" in report["scores"]["prediction"]  # auto: a COD release
    assert report["scores"]["prediction"]["gIoU"] == pytest.approx(0.5) and report["missing"] == 1
    assert "box_fill" in report["scores"] and "policy" not in report
    assert "box_fill" in printed and "1 missing" in printed


def test_data_convert_errors(tmp_path, capsys):
    camo = _camo(tmp_path)
    assert (
        main(["data", "convert", "camo", "--src", str(camo), "--out", str(tmp_path / "o"), "--opt", "split=test"]) == 2
    )
    assert "unknown option 'split'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert (
        main(
            [
                "data",
                "convert",
                "camo",
                "--src",
                str(camo),
                "--out",
                str(tmp_path / "o"),
                "--opt",
                "include_noncam=maybe",
            ]
        )
        == 2
    )
    assert "expected true or false" in capsys.readouterr().err
    assert main(["data", "convert", "coco", "--src", str(camo), "--out", str(tmp_path / "o")]) == 2
    assert "unknown dataset 'coco'" in capsys.readouterr().err
    assert main(["data", "convert", "nc4k", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err

    refs = tmp_path / "refer" / "refcoco" / "refs(unc).p"
    refs.parent.mkdir(parents=True)
    refs.write_bytes(b"this is not a pickle")
    assert main(["data", "convert", "refcoco", "--src", str(tmp_path / "refer"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "refs(unc).p" in err and "nothing converted" in err
    assert not list((tmp_path / "r").glob("*.parquet"))


def test_evaluate_with_policy_and_tool_resumes(val, tiny_assets, tmp_path, capsys):
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--split",
        str(val),
        "--policy",
        str(tiny_assets.policy),
        "--tool",
        str(tiny_assets.tool),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--suite",
        "auto",
    ]
    assert main([*args, "--limit", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 4 and report["limit"] == 4 and report["suite"] == "seg"
    assert len(list((out / "predictions").glob("*.png"))) == 4
    assert set(report["scores"]) == {"prediction", "box_fill", "random_object_box"}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    policy = report["policy"]
    assert len(records) == policy["answered"] == 4 and policy["without_record"] == 0
    assert policy["parsed"] == sum(1 for r in records if r["reason"] == "")
    assert f"policy answers parsed: {policy['parsed']}/4" in printed

    assert main([*args, "--limit", "6"]) == 0  # resumes: only the two new rows are predicted
    assert len((out / "records.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "report.json").read_text())["policy"]["answered"] == 6


def test_evaluate_argument_errors(val, tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert main(["evaluate", "--split", str(val), "--out", out]) == 2
    assert "--policy and --tool" in capsys.readouterr().err
    assert main(["evaluate", "--split", str(val), "--out", out, "--predictions", out, "--policy", out]) == 2
    assert main(["evaluate", "--split", str(val), "--out", out, "--tool", out]) == 2
    assert "both --policy and --tool" in capsys.readouterr().err
    assert main(["evaluate", "--split", str(tmp_path / "nope.parquet"), "--out", out, "--predictions", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--split", str(val), "--out", out, "--predictions", out, "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err


def _read_outputs(mask_path, h, w):
    mask = np.asarray(Image.open(mask_path))
    overlay = Image.open(mask_path.with_name(f"{mask_path.stem}.overlay.png"))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert overlay.size == (w, h) and overlay.mode == "RGB"
    return mask


def test_predict_with_a_box_needs_no_policy(image, tiny_assets, tmp_path, capsys):
    path, h, w = image
    out = tmp_path / "out" / "mask.png"
    args = ["predict", "--tool", str(tiny_assets.tool), "--image", str(path), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--policy", str(tmp_path / "no-such-policy"), "--box", "10,12,60,50", "--points", "30,30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    mask = _read_outputs(out, h, w)
    assert printed["foreground_pixels"] == int((mask == 255).sum()) and printed["objects_used"] == 1
    assert printed["answer"] is None


def test_predict_with_the_policy(image, tiny_assets, tmp_path, capsys):
    path, h, w = image
    out = tmp_path / "pred.png"
    assert (
        main(
            [
                "predict",
                "--policy",
                str(tiny_assets.policy),
                "--tool",
                str(tiny_assets.tool),
                "--image",
                str(path),
                "--prompt",
                "the red circle",
                "--out",
                str(out),
                "--max-new-tokens",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    mask = _read_outputs(out, h, w)
    assert printed["parse_reason"] == parse_answer(printed["answer"], (h, w)).reason
    if printed["parse_reason"]:  # the random tiny policy's usual case: an empty mask, and why
        assert not mask.any() and printed["objects_used"] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "10,12,60"], "--box expects x1,y1,x2,y2"),
        (["--box", "10,12,nan,50"], "--box expects x1,y1,x2,y2"),
        (["--box", "60,12,10,50"], "x2=10 <= x1=60"),
        (["--box", "10,12,6000,50"], "outside"),
        (["--points", "3,4;5"], "--points expects"),
        ([], "needs --prompt and --checkpoint (or --policy and --tool)"),
    ],
)
def test_predict_rejects_bad_prompts(image, tiny_assets, tmp_path, capsys, extra, message):
    path, _, _ = image
    out = tmp_path / "mask.png"
    assert main(["predict", "--tool", str(tiny_assets.tool), "--image", str(path), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_predict_rejects_missing_and_corrupt_images(tiny_assets, tmp_path, capsys):
    base = ["predict", "--tool", str(tiny_assets.tool), "--out", str(tmp_path / "m.png"), "--box", "1,1,5,5"]
    assert main([*base, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    write_corrupt_jpg(tmp_path / "corrupt.jpg")
    assert main([*base, "--image", str(tmp_path / "corrupt.jpg")]) == 2
    assert "corrupt image corrupt.jpg" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()
