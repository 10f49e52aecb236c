"""The streaming parquet writer: bounded memory, whole-or-nothing output, row groups by rows and bytes."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_grto.data.parquet import AtomicParquetWriter, write_rows_atomic

IMAGE_BYTES = 64 * 1024
_BLOCK = os.urandom(IMAGE_BYTES)


def _image(i: int) -> bytes:
    """A fresh 64 KB bytes object per row (a new allocation, as a converter reading files makes)."""
    return i.to_bytes(4, "little") + _BLOCK[4:]


def _record(i: int) -> dict:
    return {
        "i": i,
        "images": [{"bytes": _image(i), "path": None}],
        "extra_info": {"sample_id": f"s{i:06d}", "split": "train"},
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_memory_stays_bounded_while_streaming_many_image_rows(tmp_path: Path, monkeypatch) -> None:
    n = 3000
    total = n * IMAGE_BYTES  # ~188 MiB of image bytes go through the writer
    arrow_peak = 0  # Arrow's allocations are not traced by tracemalloc: sample them where they are largest

    def sample_arrow() -> None:
        nonlocal arrow_peak
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes())

    class SampledWriter(pq.ParquetWriter):
        def write_table(self, table, *args, **kwargs):
            sample_arrow()  # the row group's table is alive here
            super().write_table(table, *args, **kwargs)
            sample_arrow()

    monkeypatch.setattr(pq, "ParquetWriter", SampledWriter)

    def rows():
        for i in range(n):
            sample_arrow()  # between rows: nothing of earlier row groups may stay behind
            yield _record(i)

    path = tmp_path / "big.parquet"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        write_rows_atomic(rows(), path)  # default row groups: 1024 rows or 16 MiB
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"\nwrote {total / 2**20:.0f} MiB: Python peak {python_peak / 2**20:.1f} MiB, Arrow peak {arrow_peak / 2**20:.1f} MiB"
    )
    assert python_peak < total / 5, (python_peak, total)
    assert arrow_peak < total / 5, (arrow_peak, total)

    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == n and meta.num_row_groups > 1
    assert pq.read_table(path, columns=["i"]).column("i").to_pylist() == list(range(n))
    last = pq.ParquetFile(path).read_row_group(meta.num_row_groups - 1, columns=["images"])
    assert last.column("images")[-1].as_py()[0]["bytes"] == _image(n - 1)
    assert _leftovers(tmp_path) == ["big.parquet"]


def test_failure_mid_stream_leaves_no_output_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    seen_temp = []

    def rows():
        for i in range(300):
            yield _record(i)
        seen_temp.extend(n for n in _leftovers(tmp_path) if n.endswith(".tmp"))  # row groups already on disk
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        write_rows_atomic(rows(), path, row_group_rows=50)
    assert len(seen_temp) == 1 and seen_temp[0].startswith(".t.parquet.")
    assert _leftovers(tmp_path) == []

    with pytest.raises(KeyboardInterrupt), AtomicParquetWriter(path, row_group_rows=10) as writer:
        writer.write_all(_record(i) for i in range(25))
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write_rows_atomic((_record(i) for i in range(3)), tmp_path / "t.parquet")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"rows 20-29 do not fit the schema inferred from the first row group"):
        write_rows_atomic(({**_record(i), "i": "x" if i >= 20 else i} for i in range(40)), path, row_group_rows=10)
    assert path.read_bytes() == before and _leftovers(tmp_path) == ["t.parquet"]


def test_row_groups_split_by_rows_and_by_bytes(tmp_path: Path) -> None:
    by_rows = write_rows_atomic((_record(i) for i in range(25)), tmp_path / "rows.parquet", row_group_rows=10)
    assert [
        pq.ParquetFile(by_rows).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(by_rows).num_row_groups)
    ] == [10, 10, 5]
    by_bytes = write_rows_atomic(
        (_record(i) for i in range(25)), tmp_path / "bytes.parquet", row_group_bytes=4 * IMAGE_BYTES
    )
    assert pq.ParquetFile(by_bytes).num_row_groups == 7  # 4 rows of 64 KB per group
    assert pq.read_table(by_bytes, columns=["i"]).column("i").to_pylist() == list(range(25))


def test_an_image_shared_by_consecutive_rows_is_stored_once_per_row_group(tmp_path: Path) -> None:
    images = [os.urandom(IMAGE_BYTES) for _ in range(30)]  # 7 rows per image, as RefCOCO sentences of one image
    rows = ({"i": i, "images": [{"bytes": images[i // 7], "path": None}]} for i in range(210))
    path = write_rows_atomic(rows, tmp_path / "shared.parquet", row_group_bytes=50 * IMAGE_BYTES)
    assert pq.ParquetFile(path).num_row_groups == 5
    unique, per_row = 30 * IMAGE_BYTES, 210 * IMAGE_BYTES
    assert (
        path.stat().st_size < unique + 5 * IMAGE_BYTES < per_row / 5
    )  # at most one image split by each group boundary
    back = pq.read_table(path).column("images").to_pylist()
    assert [r[0]["bytes"] for r in back] == [images[i // 7] for i in range(210)]  # readers get every row's copy


def test_given_schema_and_misuse(tmp_path: Path) -> None:
    schema = pa.schema([("a", pa.int32()), ("b", pa.string())])
    with AtomicParquetWriter(tmp_path / "s.parquet", schema, row_group_rows=2) as writer:
        writer.write_all({"a": i, "b": str(i)} for i in range(5))
        assert writer.num_rows == 5 and writer.num_row_groups == 2  # the last group is written on exit
    assert pq.read_schema(tmp_path / "s.parquet").field("a").type == pa.int32()

    with pytest.raises(ValueError, match="no rows"), AtomicParquetWriter(tmp_path / "e.parquet", schema):
        pass
    with pytest.raises(ValueError, match="rows 0-0 do not fit the given schema"):
        write_rows_atomic([{"a": "x", "b": "y"}], tmp_path / "e.parquet", schema)
    with pytest.raises(RuntimeError, match="not open"):
        AtomicParquetWriter(tmp_path / "e.parquet").write({"a": 1})
    assert _leftovers(tmp_path) == ["s.parquet"]
