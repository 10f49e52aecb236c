"""Run a test file in a child pytest: for tests that must not share this process's state.

Two reasons a test file runs in a child: it needs a package the main environment must not import
(megatron-core changes which engines verl registers in every process that imports it), or it sets
process-global state (a verl worker initialises ``torch.distributed`` and its device meshes). The
child's result is the parent test's: it fails with the child's output, and a child that skipped or
ran nothing fails too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child_pytest(test_file: str, extra_path: Path | None = None, timeout: int = 900) -> str:
    """Run ``pytest -q test_file`` in a child process (``extra_path`` first on its ``PYTHONPATH``); its summary line."""
    paths = [str(extra_path)] if extra_path is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test_file],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]  # e.g. "2 passed in 25.1s"
    assert " passed" in summary and not any(word in summary for word in ("skipped", "failed", "error")), out[-4000:]
    return summary
