"""Whole-or-nothing files and directories: no partial output, no leftovers, one build under concurrency."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from verl_grto.atomic import atomic_file, build_dir_once, read_stamp
from verl_grto.data.parquet import write_rows_atomic


def _rows(n: int):
    for i in range(n):
        yield {"a": i, "b": {"x": str(i)}}


def test_write_rows_atomic_writes_all_rows(tmp_path: Path) -> None:
    path = write_rows_atomic(_rows(5), tmp_path / "sub" / "t.parquet")
    df = pd.read_parquet(path)
    assert df["a"].tolist() == list(range(5)) and df["b"].iloc[3] == {"x": "3"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.parquet"]


def test_failure_while_iterating_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = write_rows_atomic(_rows(2), tmp_path / "t.parquet")
    before = path.read_bytes()

    def broken():
        yield from _rows(3)
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        write_rows_atomic(broken(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error type for mixed column types
        write_rows_atomic([{"a": 1}, {"a": "not an int"}], tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no rows"):
        write_rows_atomic([], tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_publishes_readable_file(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("hello")
        assert not (tmp_path / "f.txt").exists()  # not visible until complete
    assert (tmp_path / "f.txt").read_text() == "hello"
    assert (tmp_path / "f.txt").stat().st_mode & 0o044 == 0o044


def test_build_dir_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.2)  # long enough for the other threads to arrive and wait on the lock
        (tmp / "data.txt").write_text("done")

    target = tmp_path / "thing"
    threads = [threading.Thread(target=build_dir_once, args=(target, {"v": 1}, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (target / "data.txt").read_text() == "done" and read_stamp(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]


def test_build_dir_once_rebuilds_on_new_stamp_and_cleans_up_failures(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    build_dir_once(target, {"v": 1}, lambda d: (d / "f").write_text("one"))
    build_dir_once(target, {"v": 2}, lambda d: (d / "f").write_text("two"))
    assert (target / "f").read_text() == "two" and read_stamp(target) == {"v": 2}

    def broken(d: Path) -> None:
        (d / "f").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_dir_once(target, {"v": 3}, broken)
    assert (target / "f").read_text() == "two"  # the previous build survives
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]
