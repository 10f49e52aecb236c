"""Runs tests/test_megatron_recipe.py in a child pytest that has ``megatron-core`` on its path.

The main environment does not install megatron-core: importing it changes which engines verl
registers in every process of every other test. ``scripts/install.sh`` puts it in a folder of its
own, ``.venv/megatron-core`` (``pip install --no-deps --target``), and this test hands that folder to
a child pytest only, so the Megatron recipe's test runs in CI instead of being skipped there.
"""

from __future__ import annotations

from pathlib import Path

from child_pytest import run_child_pytest

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_CORE = ROOT / ".venv" / "megatron-core"


def test_megatron_recipe_test_passes_with_megatron_core_on_the_path():
    assert (MEGATRON_CORE / "megatron" / "core").is_dir(), (
        f"{MEGATRON_CORE} is missing: scripts/install.sh installs megatron-core there"
    )
    run_child_pytest("tests/test_megatron_recipe.py", extra_path=MEGATRON_CORE)
