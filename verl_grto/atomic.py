"""Publish files and directories whole or not at all.

Datasets and tiny model assets are built on demand by whichever process needs them first, and
several processes (Ray workers, parallel test runs, two engineers' recipes) may ask at once. A reader
must never see half a parquet file or a model directory without its weights, so everything is
written under a temporary name in the destination's own directory (same filesystem, so the final
``os.replace`` is atomic) and renamed into place only when complete. A ``filelock`` lock keeps two
builders of the same directory from doing the work twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

#: Written last into every directory built by :func:`build_dir_once`; its content says what was built.
STAMP_NAME = ".verl_grto_stamp.json"
_FILE_MODE = 0o644
_DIR_MODE = 0o755


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on error delete it.

    The caller writes the whole file to the yielded path. An existing ``path`` is replaced only once the
    new file is complete, so concurrent readers see either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it private; the published file is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The stamp of a directory built by :func:`build_dir_once`, or None if absent or unreadable."""
    try:
        return json.loads((Path(directory) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_dir_once(target: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Make sure ``target`` holds what ``build`` makes for ``stamp``; build it only if it does not.

    ``build(tmp_dir)`` fills an empty temporary directory; the stamp (JSON-serialisable: builder name,
    version, seed, sizes...) is written into it last and the directory is renamed onto ``target``. A
    ``target`` whose stamp differs (older builder version, other seed) is rebuilt and replaced; while
    it is swapped, under the lock, there is a moment where ``target`` does not exist.
    """
    target = Path(target)
    if read_stamp(target) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if read_stamp(target) == stamp:  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, _DIR_MODE)  # mkdtemp makes it private; the published directory is for everyone to read
        try:
            build(tmp)
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, sort_keys=True))
            if target.exists() or target.is_symlink():
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
                os.replace(target, stale / "old")
                os.replace(tmp, target)
                _remove(stale)
            else:
                os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
    return target
