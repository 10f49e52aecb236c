"""Run ``python -m verl.trainer.main_ppo`` on a recipe in a subprocess and read its logged metrics.

For tests and benchmarks that need a real verl run (Ray, workers, rollout servers) and its
per-step metrics: verl's file logger writes one JSON line per step to ``VERL_FILE_LOGGER_PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class MainPPOError(RuntimeError):
    pass


def run_main_ppo(
    recipe: str,
    home: Path,
    runs: Path,
    metrics: Path,
    overrides: list[str],
    timeout: int = 1800,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run the recipe; return its combined output; raise MainPPOError (with the tail) on failure.

    ``home`` is VERL_GRTO_HOME (built assets and data), ``runs`` the checkpoint root,
    ``metrics`` the JSONL file of verl's file logger; ``env`` adds to the command's environment (e.g.
    what a driver needs to join an existing Ray cluster)."""
    child_env = {
        **os.environ,
        "VERL_GRTO_HOME": str(home),
        "VERL_GRTO_RUNS": str(runs),
        "VERL_FILE_LOGGER_PATH": str(metrics),
        "HF_DATASETS_CACHE": str(Path(home) / "hf_datasets"),
        "RAY_DEDUP_LOGS": "0",
        **(env or {}),
    }
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "recipes", "--config-name", recipe,
        "trainer.logger=[console,file]", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise MainPPOError(f"main_ppo {recipe} failed (rc={proc.returncode}):\n{out[-6000:]}")
    return out


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from verl's FileLogger JSONL."""
    steps: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return steps
