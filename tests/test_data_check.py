"""Broken data at training time (issue #14): every kind of bad row is reported by file, row index and
reason -- by ``check_parquet``, by ``verl-grto data check`` and by the check a run makes at start."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_grto.cli import main
from verl_grto.data.check import RowProblem, check_parquet
from verl_grto.data.masks import check_rle, decode_rle, encode_rle
from verl_grto.data.parquet import write_rows_atomic, write_without_rows
from verl_grto.data.synthetic import generate_split
from verl_grto.trainer.data_preflight import REPORT_NAME, BadDataError, preflight_data

N_ROWS, BAD = 4, 2  # every corrupted file has 4 rows; row 2 is the bad one
SIZE = 112


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return [r.to_record() for r in generate_split(N_ROWS, seed=5, domain="plain", split="val", size=SIZE)]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    write_rows_atomic(records, path)
    return path


def _corrupt(tmp_path: Path, records: list[dict[str, Any]], change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the split whose row BAD was changed in place by ``change`` (same schema)."""
    rows = copy.deepcopy(records)
    change(rows[BAD])
    path = tmp_path / "bad.parquet"
    write_rows_atomic(rows, path, schema=pa.Table.from_pylist(records).schema)
    return path


def _gt(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["reward_model"]["ground_truth"])


def _set_gt(row: dict[str, Any], **fields: Any) -> None:
    gt = _gt(row)
    gt.update(fields)
    row["reward_model"]["ground_truth"] = json.dumps(gt)


def _drop_gt_field(name: str) -> Callable[[dict[str, Any]], None]:
    def change(row: dict[str, Any]) -> None:
        gt = _gt(row)
        del gt[name]
        row["reward_model"]["ground_truth"] = json.dumps(gt)

    return change


def _image(data: bytes) -> Callable[[dict[str, Any]], None]:
    def change(row: dict[str, Any]) -> None:
        row["images"][0]["bytes"] = data

    return change


def _square_rle(side: int) -> dict[str, Any]:
    mask = np.zeros((side, side), bool)
    mask[4:20, 4:20] = True
    return encode_rle(mask)


def _prompt(text: str) -> Callable[[dict[str, Any]], None]:
    def change(row: dict[str, Any]) -> None:
        row["prompt"][0]["content"] = text

    return change


HXW = f"{SIZE}x{SIZE} (HxW)"

CASES = {
    "image_not_an_image": (_image(b"these bytes are not a PNG"), ["image 0 does not decode: not an image format PIL knows"]),
    "image_empty": (_image(b""), ["image 0 has no bytes"]),
    "rle_bad_character": (
        lambda row: _set_gt(row, mask={"size": [SIZE, SIZE], "counts": "!!"}),
        ["ground truth mask does not decode: RLE counts has '!' at character 0, outside '0'..'o'"],
    ),
    "rle_truncated_string": (
        lambda row: _set_gt(row, mask={"size": [SIZE, SIZE], "counts": "5o"}),
        ["ground truth mask does not decode: RLE counts end inside run 1 (truncated string?)"],
    ),
    "rle_runs_short_of_size": (
        lambda row: _set_gt(row, mask={"size": [SIZE, SIZE], "counts": _square_rle(64)["counts"]}),
        [f"ground truth mask does not decode: RLE runs cover 4096 pixels but its size {SIZE}x{SIZE} has {SIZE * SIZE}"],
    ),
    "rle_size_differs_from_image": (
        lambda row: _set_gt(row, mask=_square_rle(64)),
        [f"ground truth mask is 64x64 (HxW) but the image is {HXW}"],
    ),
    "rle_and_image_size_differ_from_image": (
        lambda row: _set_gt(row, mask=_square_rle(64), image_size=[64, 64]),
        [f"ground truth mask and image_size are 64x64 (HxW) but the image is {HXW}"],
    ),
    "image_size_differs_from_image": (
        lambda row: _set_gt(row, image_size=[SIZE, SIZE + 1]),
        [f"ground truth image_size is {SIZE}x{SIZE + 1} (HxW) but the image is {HXW}"],
    ),
    "gt_missing_mask": (_drop_gt_field("mask"), ["ground truth lacks field 'mask' (has: boxes, image_size)"]),
    "gt_missing_image_size": (_drop_gt_field("image_size"), ["ground truth lacks field 'image_size' (has: mask, boxes)"]),
    "gt_not_json": (
        lambda row: row["reward_model"].update(ground_truth="{mask"),
        ["ground truth is not JSON (Expecting property name enclosed in double quotes at char 1)"],
    ),
    "gt_box_of_three": (
        lambda row: _set_gt(row, boxes=[[1, 2, 3]]),
        ["ground truth 'boxes' must be a list of [x1, y1, x2, y2], got [[1, 2, 3]]"],
    ),
    "empty_instruction": (_prompt("<image>"), ["empty instruction (no text besides the <image> placeholder)"]),
    "blank_instruction": (
        _prompt("   "),
        ["empty instruction (no text besides the <image> placeholder)",
         "prompt has 0 <image> placeholder(s) but the row has 1 image(s)"],
    ),
    "no_sample_id": (lambda row: row["extra_info"].update(sample_id=""), ["extra_info has no sample_id"]),
    "two_problems_two_lines": (
        lambda row: (_image(b"junk")(row), _drop_gt_field("boxes")(row)),
        ["image 0 does not decode: not an image format PIL knows",
         "ground truth lacks field 'boxes' (has: mask, image_size)"],
    ),
}  # fmt: skip


def test_synthetic_rows_are_clean(tmp_path, records):
    assert check_parquet(_write(tmp_path / "val.parquet", records)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_row_is_reported_with_file_index_and_reason(tmp_path, records, case):
    change, reasons = CASES[case]
    path = _corrupt(tmp_path, records, change)
    assert check_parquet(path) == [RowProblem(str(path), BAD, reason) for reason in reasons]


def test_truncated_image_is_reported(tmp_path, records):
    data = records[BAD]["images"][0]["bytes"]
    path = _corrupt(tmp_path, records, _image(data[: len(data) // 2]))
    (problem,) = check_parquet(path)
    assert (problem.file, problem.row) == (str(path), BAD)
    assert problem.reason.startswith("image 0 does not decode: ") and "truncated" in problem.reason


def test_unreadable_files_are_one_file_level_problem(tmp_path, records):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    (problem,) = check_parquet(junk)
    assert problem.row is None and problem.reason.startswith("not a readable parquet file: ")
    assert str(problem).startswith(f"{junk}: not a readable parquet file")
    no_images = tmp_path / "no_images.parquet"
    write_rows_atomic(({k: v for k, v in r.items() if k != "images"} for r in records), no_images)
    assert check_parquet(no_images) == [
        RowProblem(
            str(no_images), None, "no column images (a verl RL parquet has prompt, images, reward_model, extra_info)"
        )
    ]
    assert check_parquet(tmp_path / "missing.parquet") == [
        RowProblem(str(tmp_path / "missing.parquet"), None, "no such file")
    ]


def test_decode_rle_refuses_runs_that_do_not_cover_the_size():
    rle = _square_rle(32)
    assert check_rle(rle) == (32, 32) and decode_rle(rle).sum() == 16 * 16
    with pytest.raises(ValueError, match="RLE runs cover 1024 pixels but its size 40x40 has 1600"):
        decode_rle({"size": [40, 40], "counts": rle["counts"]})  # pycocotools alone returns garbage here


def test_write_without_rows_keeps_the_others_and_the_schema(tmp_path, records):
    src = _write(tmp_path / "val.parquet", records)
    dst = tmp_path / "out" / "val.parquet"
    assert write_without_rows(src, [BAD, 99], dst) == N_ROWS - 1
    kept = pq.read_table(dst)
    assert kept.schema == pq.read_schema(src)
    assert kept.column("extra_info").to_pylist() == [r["extra_info"] for i, r in enumerate(records) if i != BAD]
    with pytest.raises(ValueError, match="every row"):
        write_without_rows(src, range(N_ROWS), tmp_path / "none.parquet")
    assert not (tmp_path / "none.parquet").exists()


# ---------------------------------------------------------------- verl-grto data check


def test_cli_prints_one_line_per_problem_and_exits_1(tmp_path, records, capsys):
    clean = _write(tmp_path / "clean.parquet", records)
    bad = _corrupt(tmp_path, records, CASES["two_problems_two_lines"][0])
    assert main(["data", "check", str(clean), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{bad}:{BAD}: image 0 does not decode: not an image format PIL knows",
        f"{bad}:{BAD}: ground truth lacks field 'boxes' (has: mask, image_size)",
    ]
    assert err.strip() == "verl-grto: 2 problem(s), 1 bad row(s), in 1 of 2 file(s)"


def test_cli_exits_0_on_clean_files_and_2_on_a_missing_path(tmp_path, records, capsys):
    clean = _write(tmp_path / "clean.parquet", records)
    assert main(["data", "check", str(clean)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "every row of 1 file(s) is usable" in err
    assert main(["data", "check", str(clean), str(tmp_path / "nope.parquet")]) == 2
    assert f"file {tmp_path / 'nope.parquet'} does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the check a run makes at start


@pytest.fixture()
def split(tmp_path, records) -> tuple[Path, Path]:
    """(a training file with a bad row BAD, a clean validation file)"""
    bad = _corrupt(tmp_path, records, CASES["image_not_an_image"][0])
    return bad, _write(tmp_path / "val.parquet", records)


def test_run_start_fails_naming_file_row_and_reason(tmp_path, split):
    bad, val = split
    with pytest.raises(BadDataError) as err:
        preflight_data([str(bad)], [str(val)], "fail", tmp_path / "run")
    message = str(err.value)
    assert f"{bad}:{BAD}: image 0 does not decode: not an image format PIL knows" in message.splitlines()
    assert "1 bad row(s)" in message and "grto.data_check=skip" in message


def test_run_start_skips_bad_rows_into_filtered_copies(tmp_path, split, records):
    bad, val = split
    run = tmp_path / "run"
    result = preflight_data([str(bad)], [str(val)], "skip", run)
    (filtered,) = result.train_files
    assert Path(filtered).parent == run / "data_check"
    assert result.val_files == [str(val)]  # the clean file is read as is
    assert result.skipped == {str(bad): [BAD]} and result.num_skipped == 1
    ids = [info["sample_id"] for info in pq.read_table(filtered).column("extra_info").to_pylist()]
    assert ids == [r["extra_info"]["sample_id"] for i, r in enumerate(records) if i != BAD]
    assert check_parquet(filtered) == []
    report = json.loads((run / "data_check" / REPORT_NAME).read_text())
    assert report["skipped_rows"] == 1 and report["skipped"] == {str(bad): [BAD]}
    assert report["files"][str(bad)]["problems"] == [
        {"row": BAD, "reason": "image 0 does not decode: not an image format PIL knows"}
    ]
    assert report["files"][str(bad)]["copy"] == filtered and report["files"][str(bad)]["rows"] == N_ROWS


def test_run_restart_reuses_the_check_until_a_file_changes(tmp_path, split, monkeypatch):
    bad, val = split
    run = tmp_path / "run"
    first = preflight_data([str(bad)], [str(val)], "skip", run)
    calls = []
    import verl_grto.trainer.data_preflight as preflight

    def counting(path, *rest):
        calls.append(str(path))
        return check_parquet(path, *rest)

    monkeypatch.setattr(preflight, "check_parquet", counting)
    again = preflight_data([str(bad)], [str(val)], "skip", run)
    assert calls == [] and again.train_files == first.train_files and again.skipped == first.skipped
    os.utime(val, ns=(1, 1))  # a changed file is checked again
    preflight_data([str(bad)], [str(val)], "skip", run)
    assert calls == [str(val)]
    clean_run = tmp_path / "clean_run"  # a run whose files are all clean is cached too
    preflight_data([str(val)], [], "fail", clean_run)
    preflight_data([str(val)], [], "fail", clean_run)
    assert calls == [str(val)] * 2


def test_off_checks_nothing_and_unreadable_files_stop_every_checking_mode(tmp_path, split):
    bad, val = split
    result = preflight_data([str(bad)], [str(val)], "off", tmp_path / "run")
    assert result.train_files == [str(bad)] and not (tmp_path / "run").exists()
    missing = str(tmp_path / "missing.parquet")
    for mode in ("fail", "skip"):
        with pytest.raises(BadDataError, match=f"{missing}: no such file"):
            preflight_data([str(val)], [missing], mode, tmp_path / "run")


def test_skip_refuses_a_file_with_no_good_row(tmp_path, records):
    path = tmp_path / "all_bad.parquet"
    rows = [dict(r, images=[{"bytes": b"junk", "path": None}]) for r in records]
    write_rows_atomic(rows, path)
    with pytest.raises(BadDataError, match="every row of .*all_bad.parquet is bad"):
        preflight_data([str(path)], [], "skip", tmp_path / "run")
    with pytest.raises(ValueError, match="grto.data_check must be one of"):
        preflight_data([str(path)], [], "sometimes", tmp_path / "run")


def test_remote_files_are_left_to_verl(tmp_path, split):
    bad, val = split
    result = preflight_data(["hdfs://cluster/train.parquet"], [str(val)], "fail", tmp_path / "run")
    assert result.train_files == ["hdfs://cluster/train.parquet"] and result.problems == []
