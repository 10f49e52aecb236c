"""run_conversion streams: rows are built as the parquet writer takes them, memory stays one row group."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from verl_grto.data.convert.base import REPORT_NAME, Excluded, LoadedImage, RowError, Sample, Task, run_conversion

IMAGE_BYTES = 64 * 1024
_BLOCK = os.urandom(IMAGE_BYTES)
_MASK = np.zeros((8, 8), bool)
_MASK[2:5, 3:6] = True


def _build(i: int, crash_at: int | None = None):
    """A task's samples: a fresh 64 KB "image" (never decoded by the writer) and an 8x8 mask."""
    if i == crash_at:
        raise RuntimeError("disk full")
    if i % 500 == 7:
        raise RowError("corrupt image")
    if i % 500 == 8:
        raise Excluded("not in the benchmark")
    image = LoadedImage(i.to_bytes(4, "little") + _BLOCK[4:], 8, 8, Path(f"img{i}.jpg"))
    yield Sample(sample_id=f"s{i:05d}", image=image, mask=_MASK, expression=f"thing {i}")


def _tasks(n: int, crash_at: int | None = None) -> list[Task]:
    return [Task(f"ann{i // 100}.json", f"row {i}", lambda i=i: _build(i, crash_at)) for i in range(n)]


def test_conversion_memory_is_one_row_group_not_the_split(tmp_path: Path) -> None:
    n = 2500
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        report = run_conversion("fake", "fake", {"train": _tasks(n)}, tmp_path / "out", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = report.written["train"] * IMAGE_BYTES
    print(f"\nconverted {total / 2**20:.0f} MiB of image bytes: Python peak {peak / 2**20:.1f} MiB")
    assert peak < total / 5, (peak, total)
    assert report.written == {"train": n - 10} and report.excluded == {"train": {"not in the benchmark": 5}}
    assert [(s.file, s.row, s.reason) for s in report.skipped[:2]] == [
        ("ann0.json", "row 7", "corrupt image"),
        ("ann5.json", "row 507", "corrupt image"),
    ]
    table = pq.read_table(tmp_path / "out" / "train.parquet", columns=["extra_info"])
    infos = table.column("extra_info").to_pylist()
    assert [r["index"] for r in infos] == list(range(n - 10))
    assert infos[7]["sample_id"] == "s00009"  # rows 7 and 8 left out, indices stay contiguous


def test_crash_mid_conversion_leaves_no_parquet_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    splits = {"val": _tasks(300), "train": _tasks(1500, crash_at=1200)}  # val complete, train already on disk
    with pytest.raises(RuntimeError, match="disk full"):
        run_conversion("fake", "fake", splits, out, progress=False)
    assert list(out.iterdir()) == []
    assert not (out / REPORT_NAME).exists()
