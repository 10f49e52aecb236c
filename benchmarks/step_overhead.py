"""Wall time of a GRTO step against a GRPO step on the same tiny config, by phase, in one run.

    .venv/bin/python benchmarks/step_overhead.py [--steps 4]

Runs ``grto_tiny_cpu`` three times through verl's main_ppo: as GRTO with the tool colocated in the
actor's processes (trainer mode ``grto``: tool masks, mask rewards, tool update), as GRTO with the
tool in a pool of its own (``grto.placement=separate``: its update overlaps the actor's), and as
plain GRPO on the same data and policy (trainer mode ``sync``, estimator ``grpo``, the agent loop's
box reward, no tool). Phases are verl's ``timing_s/*`` plus the
plugin's ``tool_predict`` and ``update_tool``; step 1 (warm-up) is excluded from the means. The
tiny assets are built first, outside the timing. A measurement on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from verl_grto.assets.build import default_home
from verl_grto.trainer.launch import read_metrics, run_main_ppo

ARMS = {
    "grpo": ["trainer.v1.trainer_mode=sync", "algorithm.adv_estimator=grpo"],
    "grto": [],
    "grto_separate": ["grto.placement=separate", "ray_kwargs.ray_init.num_gpus=2"],
}


def phase_means(metrics: dict[int, dict[str, float]]) -> dict[str, float]:
    steps = [s for s in sorted(metrics) if s > 1] or sorted(metrics)
    keys = {k for s in steps for k in metrics[s] if k.startswith("timing_s/")}
    return {k.removeprefix("timing_s/"): float(np.mean([metrics[s].get(k, 0.0) for s in steps])) for k in sorted(keys)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="step_overhead_"))
    common = [f"trainer.total_training_steps={args.steps}", "trainer.save_freq=-1"]
    results = {}
    for name, extra in ARMS.items():
        run_main_ppo("grto_tiny_cpu", default_home(), tmp / name, tmp / f"{name}.jsonl", common + extra)
        results[name] = phase_means(read_metrics(tmp / f"{name}.jsonl"))
    phases = sorted(set().union(*results.values()))
    print(f"mean seconds per step over steps 2..{args.steps} (grto_tiny_cpu)")
    print(f"{'phase':22s}" + "".join(f"{name:>15s}" for name in ARMS))
    for p in phases:
        print(f"{p:22s}" + "".join(f"{results[name].get(p, 0.0):15.2f}" for name in ARMS))
    separate = results["grto_separate"]["step"] / results["grpo"]["step"]
    print(f"step time ratio GRTO (tool in its own pool)/GRPO: {separate:.2f}")
    print(f"step time ratio GRTO/GRPO: {results['grto']['step'] / results['grpo']['step']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
