"""Run verl's main_ppo on a recipe in a subprocess and read back its logged metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main_ppo(recipe: str, home: Path, runs: Path, metrics: Path, overrides: list[str], timeout: int = 1200) -> str:
    """Run ``python -m verl.trainer.main_ppo --config-path recipes --config-name RECIPE``; return its output.

    ``home`` is VERL_GRTO_HOME (built assets and data), ``runs`` the checkpoint root, ``metrics``
    the JSONL file verl's file logger writes."""
    env = {
        **os.environ,
        "VERL_GRTO_HOME": str(home),
        "VERL_GRTO_RUNS": str(runs),
        "VERL_FILE_LOGGER_PATH": str(metrics),
        "HF_DATASETS_CACHE": str(home / "hf_datasets"),
        "RAY_DEDUP_LOGS": "0",
    }
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "recipes", "--config-name", recipe,
           "trainer.logger=[console,file]", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"main_ppo {recipe} failed (rc={proc.returncode}):\n{out[-6000:]}"
    return out


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from verl's FileLogger JSONL."""
    steps: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return steps
