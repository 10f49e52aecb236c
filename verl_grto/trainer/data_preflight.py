"""The data check a grto / bgrto run makes when it starts, before any worker reads a row.

Why at start: verl reads rows lazily inside Ray workers, so one bad row (an image that does not
decode, a ground truth without its mask, an RLE that does not fit its image, an empty instruction)
stops a run with a worker's stack trace in the middle of a step, possibly hours in. The trainer
(:meth:`verl_grto.trainer.grto_trainer.GRTOTrainer._init_dataloader`) calls :func:`preflight_data` on
``data.train_files`` and ``data.val_files`` first, with the checks of ``verl-grto data check``
(:func:`verl_grto.data.check.check_parquet`). ``grto.data_check`` says what a bad row does:

* ``fail`` (default): the run stops here with :class:`BadDataError`, whose message lists
  ``file:row: reason`` for the bad rows;
* ``skip``: each file with bad rows is copied without them into ``<trainer.default_local_dir>/data_check/``
  and the run reads the copies; how many rows were left out, and which, is logged and written to
  ``data_check/report.json``;
* ``off``: nothing is checked (e.g. files already checked with ``verl-grto data check``).

A file that cannot be read at all (not parquet, a column missing) stops the run in every checking
mode: leaving it out would silently train on less data than configured. Remote files (a path with a
scheme, ``hdfs://...``, which verl copies to local disk itself) are not checked; a warning says so.

Checking decodes every image once (minutes for a split of 100k JPEGs), so ``report.json`` doubles as a
cache: a restart of the same run (``trainer.resume_mode``) reuses the result for every file whose size
and modification time are unchanged, and reuses its filtered copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_grto.atomic import atomic_file
from verl_grto.data.check import RowProblem, check_parquet
from verl_grto.data.frame import PolicyFrame
from verl_grto.data.parquet import write_without_rows

logger = logging.getLogger(__name__)

#: The values of ``grto.data_check``.
DATA_CHECK_MODES = ("fail", "skip", "off")
#: Under the run's directory: the report and the filtered copies.
FOLDER = "data_check"
REPORT_NAME = "report.json"
#: Bumped when the checks change, so that an older report is not reused as a cache.
REPORT_VERSION = 3
#: Problems quoted in an error or warning; the report (or ``verl-grto data check``) has them all.
MAX_LISTED = 20


class BadDataError(ValueError):
    """The training or validation data has rows (or files) the run cannot use; the message lists them."""


@dataclass
class PreflightResult:
    """The files the run should read, and what was found.

    ``train_files`` / ``val_files`` are the configured files, with a filtered copy in place of each file
    that had bad rows (``skip`` mode). ``skipped`` maps each source file to the row indices left out.
    """

    train_files: list[str]
    val_files: list[str]
    problems: list[RowProblem] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())


def _stat(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_report(path: Path) -> dict[str, Any]:
    """The previous report's per-file entries when it is of this version, else nothing (no cache)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(report, dict) or report.get("version") != REPORT_VERSION:
        return {}
    files = report.get("files")
    return files if isinstance(files, dict) else {}


def _check_file(
    path: str, cached: dict[str, Any] | None, policy: PolicyFrame | None = None
) -> tuple[list[RowProblem], dict[str, Any]]:
    """The file's problems (from the cache when its size, mtime and the policy frame checked match) and its report entry."""
    stat = _stat(path) if os.path.isfile(path) else None
    limits = None if policy is None else policy.cache_key()
    if (
        cached is not None
        and stat is not None
        and {k: cached.get(k) for k in stat} == stat
        and cached.get("policy_frame") == limits
    ):
        problems = [RowProblem(path, p["row"], p["reason"]) for p in cached.get("problems", [])]
        return problems, {
            **stat,
            "policy_frame": limits,
            "problems": cached.get("problems", []),
            "copy": cached.get("copy"),
        }
    problems = check_parquet(path, policy)
    entry = {
        **(stat or {}),
        "policy_frame": limits,
        "problems": [{"row": p.row, "reason": p.reason} for p in problems],
        "copy": None,
    }
    return problems, entry


def _listing(problems: Sequence[RowProblem]) -> str:
    lines = [str(p) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def _copy_path(folder: Path, source: str) -> Path:
    """A filtered copy's name: the source's stem, tagged by its full path (two ``val.parquet`` differ)."""
    tag = hashlib.sha1(source.encode()).hexdigest()[:10]
    return folder / f"{Path(source).stem}-{tag}.parquet"


def preflight_data(
    train_files: Sequence[str],
    val_files: Sequence[str],
    mode: str,
    run_dir: str | Path,
    policy: PolicyFrame | None = None,
) -> PreflightResult:
    """Check every row of ``train_files`` and ``val_files`` as ``grto.data_check = mode`` says.

    ``policy``: the recipe's policy frame (``data.answer_coords``, the processor's factor and
    ``data.mm_processor_kwargs``), against which each row's frame is checked (docs/method.md, "Image frames").

    Returns the files to train and validate on (filtered copies in ``skip`` mode); raises
    :class:`BadDataError` listing ``file:row: reason`` for bad rows in ``fail`` mode, and for
    unreadable files in both checking modes.
    """
    if mode not in DATA_CHECK_MODES:
        raise ValueError(f"grto.data_check must be one of {DATA_CHECK_MODES}, got {mode!r}")
    train, val = [str(f) for f in train_files], [str(f) for f in val_files]
    if mode == "off":
        logger.info("grto.data_check=off: %d training and %d validation files not checked", len(train), len(val))
        return PreflightResult(train, val)
    folder = Path(run_dir) / FOLDER
    previous = _read_report(folder / REPORT_NAME)
    entries: dict[str, dict[str, Any]] = {}
    problems: list[RowProblem] = []
    for path in dict.fromkeys(train + val):  # each file once, in order
        if "://" in path:
            logger.warning("grto.data_check: %s is not a local file and is not checked", path)
            continue
        found, entries[path] = _check_file(path, previous.get(path), policy)
        problems += found
    file_level = [p for p in problems if p.row is None]
    bad_rows = {path: sorted({p.row for p in problems if p.file == path and p.row is not None}) for path in entries}
    bad_rows = {path: rows for path, rows in bad_rows.items() if rows}
    n_bad = sum(len(rows) for rows in bad_rows.values())
    result = PreflightResult(train, val, problems=problems)
    if file_level or (bad_rows and mode == "fail"):
        _write_report(folder, mode, entries, {})
        if file_level:
            raise BadDataError(
                f"grto.data_check: {len(file_level)} training/validation file(s) cannot be read; the run stops "
                f"before training.\n{_listing(file_level)}"
            )
        raise BadDataError(
            f"grto.data_check: {n_bad} bad row(s) in the training/validation files ({len(problems)} problem(s)); "
            f"the run stops before training.\n{_listing(problems)}\n"
            "`verl-grto data check FILE ...` lists every problem. Fix or remove these rows, or set "
            f"grto.data_check=skip to train without them (filtered copies go to {folder}/)."
        )
    if not bad_rows:
        _write_report(folder, mode, entries, {})  # the cache of a restart
        logger.info("grto.data_check: every row of %d file(s) is usable", len(entries))
        return result
    copies: dict[str, str] = {}
    for path, rows in bad_rows.items():
        copy = _copy_path(folder, path)
        entry = entries[path]
        if entry.get("copy") != str(copy) or not copy.is_file():
            try:
                kept = write_without_rows(path, rows, copy)
            except ValueError as exc:
                _write_report(folder, mode, entries, {})
                raise BadDataError(
                    f"grto.data_check=skip: every row of {path} is bad, nothing left to train on"
                ) from exc
            entry["copy"] = str(copy)
            logger.info("grto.data_check: wrote %s (%d rows, %d left out)", copy, kept, len(rows))
        copies[path] = str(copy)
    result.skipped = bad_rows
    result.train_files = [copies.get(f, f) for f in train]
    result.val_files = [copies.get(f, f) for f in val]
    report = _write_report(folder, mode, entries, bad_rows)
    logger.warning(
        "grto.data_check=skip: %d bad row(s) left out of %d file(s); the run reads filtered copies "
        "(every row in %s):\n%s",
        n_bad,
        len(bad_rows),
        report,
        _listing(problems),
    )
    return result


def _write_report(folder: Path, mode: str, entries: dict[str, dict[str, Any]], skipped: dict[str, list[int]]) -> Path:
    """``report.json``: per file its size, mtime, problems and filtered copy; the rows left out."""
    path = folder / REPORT_NAME
    for source, entry in entries.items():
        if "rows" not in entry and os.path.isfile(source):
            try:
                entry["rows"] = pq.ParquetFile(source).metadata.num_rows
            except (OSError, pa.ArrowException):  # an unreadable file is already reported as such
                entry["rows"] = None
    report = {
        "version": REPORT_VERSION,
        "mode": mode,
        "skipped_rows": sum(len(rows) for rows in skipped.values()),
        "skipped": skipped,
        "files": entries,
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return path
