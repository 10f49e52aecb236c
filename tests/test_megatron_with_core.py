"""Runs tests/test_megatron_recipe.py in a child pytest that has ``megatron-core`` on its path.

The main environment does not install megatron-core: importing it changes which engines verl
registers in every process of every other test. ``scripts/install.sh`` puts it in a folder of its
own, ``.venv/megatron-core`` (``pip install --no-deps --target``), and this test hands that folder to
a child pytest only, so the Megatron recipe's test runs in CI instead of being skipped there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_CORE = ROOT / ".venv" / "megatron-core"


def test_megatron_recipe_test_passes_with_megatron_core_on_the_path():
    assert (MEGATRON_CORE / "megatron" / "core").is_dir(), (
        f"{MEGATRON_CORE} is missing: scripts/install.sh installs megatron-core there"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(MEGATRON_CORE), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_megatron_recipe.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]  # e.g. "2 passed in 25.1s"
    assert " passed" in summary and not any(word in summary for word in ("skipped", "failed", "error")), out[-4000:]
