"""The tool as a call, measured on the tiny camouflage world: does the second turn refine, and does training
the tool in the loop help?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agent_loop.py --seeds 0 1 2 --steps 8

Every arm is a real ``python -m verl.trainer.main_ppo`` run on the same data (the recipes' 512
single-object camouflage scenes, validation on their 64), with the same number of GRTO steps, prompts
per step and answers per prompt:

* ``agent_trained`` -- ``grto_agent_tiny_cpu``: the tiny multi-turn policy calls the tool in verl's
  agent loop; GRTO trains the policy and the tool on every call (trainer mode ``grto_agent``);
* ``agent_frozen`` -- the same with the tool frozen (``grto.tool_loss_coef=0``): the calls are answered
  by the pre-trained tool throughout, only the policy learns;
* ``single_bgrto`` -- ``bgrto_tiny_cpu``: single-turn B-GRTO (BTO, then the same number of GRTO steps),
  the main job at this budget.

Validation (greedy, 64 scenes) before and after: the final masks' gIoU beside filling the final
prompts' boxes; for the multi-turn arms also the first call's gIoU (the same trajectories scored by their
first mask: does the second turn refine?), calls and valid calls per trajectory and the fraction of
trajectories with two or more policy turns. Seeds vary RL sampling and data order
(``actor_rollout_ref.rollout.seed``, ``data.seed``, ``bto.seed``); the initial models are the shipped
seed-0 ones in every arm. Writes ``--out`` (JSON: every run's validations and per-step metrics, the
settings, the machine) and a PNG beside it. A run already finished in ``--workdir`` is read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tiny_run import git_commit  # benchmarks/ is the script's folder, first on sys.path

from verl_grto.trainer.launch import read_metrics, run_main_ppo

ARMS: dict[str, tuple[str, list[str]]] = {
    "agent_trained": ("grto_agent_tiny_cpu", []),
    "agent_frozen": ("grto_agent_tiny_cpu", ["grto.tool_loss_coef=0"]),
    "single_bgrto": ("bgrto_tiny_cpu", []),
}
VAL_KEYS = (
    "val-grto/gIoU",
    "val-grto/cIoU",
    "val-grto/box_fill_gIoU",
    "val-grto/policy_box_iou",
    "val-grto/parse_rate",
    "val-agent/first_call_gIoU",
    "val-agent/calls_per_trajectory",
    "val-agent/valid_calls_per_trajectory",
    "val-agent/multi_turn_fraction",
)
STEP_KEYS = (
    "grto/reward/score",
    "grto/reward/mask_iou",
    "grto/agent/calls_per_trajectory",
    "grto/agent/invalid_call_fraction",
    "grto/agent/multi_turn_fraction",
    "grto/agent/first_call_iou",
    "grto/agent/final_iou",
    "grto/agent/call_mask_agreement",
    "grto/tool/iou_before",
    "grto/tool/iou_after",
    "timing_s/step",
)


def overrides(arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    common = [
        f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.steps}",
        f"trainer.save_freq={args.steps}",
        "trainer.val_before_train=true",
        f"data.train_batch_size={args.prompts}",
        f"actor_rollout_ref.rollout.n={args.answers}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"data.seed={seed}",
    ]
    if arm == "single_bgrto":
        common.append(f"bto.seed={seed}")
    else:
        common.append("grto_agent.trace_every=0")
    return common + ARMS[arm][1]


def run(arm: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    name = f"{arm}_s{seed}"
    runs, metrics_file = workdir / name, workdir / f"{name}.jsonl"
    recipe = ARMS[arm][0]
    summary_file = runs / recipe / "grto_summary.json"
    seconds = None
    if not summary_file.is_file():
        metrics_file.unlink(missing_ok=True)
        start = time.perf_counter()
        run_main_ppo(recipe, Path(args.home), runs, metrics_file, overrides(arm, seed, args), timeout=3600)
        seconds = time.perf_counter() - start
    summary = json.loads(summary_file.read_text())
    steps = read_metrics(metrics_file)
    return {
        "arm": arm,
        "seed": seed,
        "recipe": recipe,
        "wall_s": seconds,
        "validations": [{k: v.get(k) for k in ("step", "label", *VAL_KEYS) if k in v} for v in summary["validations"]],
        "steps": {str(s): {k: m[k] for k in STEP_KEYS if k in m} for s, m in sorted(steps.items()) if s > 0},
        "seconds": summary["seconds"],
    }


def table(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm, mean and std over seeds of the first and last validation of each key."""
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for key in VAL_KEYS:
            for when, idx in (("start", 0), ("end", -1)):
                values = [r["validations"][idx].get(key) for r in runs]
                if all(v is not None for v in values):
                    row[f"{key}@{when}"] = {
                        "mean": float(np.mean(values)),
                        "std": float(np.std(values)),
                        "runs": values,
                    }
        if arm == "single_bgrto":  # the validation after BTO, before the first GRTO step
            values = [r["validations"][1]["val-grto/gIoU"] for r in runs if len(r["validations"]) > 2]
            if values:
                row["val-grto/gIoU@after_bto"] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "runs": values,
                }
        out[arm] = row
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"agent_trained": "tab:blue", "agent_frozen": "tab:orange", "single_bgrto": "tab:green"}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        start = [r["validations"][0] for r in runs]
        end = [r["validations"][-1] for r in runs]
        x = np.arange(2)
        offset = list(ARMS).index(arm) * 0.25 - 0.25
        for k, key in enumerate(("val-grto/gIoU", "val-agent/first_call_gIoU")):
            if key not in start[0]:
                continue
            means = [np.mean([v[key] for v in start]), np.mean([v[key] for v in end])]
            stds = [np.std([v[key] for v in start]), np.std([v[key] for v in end])]
            label = f"{arm}: {'final mask' if k == 0 else 'first call'}"
            axes[k if key == "val-agent/first_call_gIoU" else 0].errorbar(
                x + offset, means, yerr=stds, fmt="o-" if k == 0 else "s--", color=colors[arm], label=label, capsize=3
            )
        fill = np.mean([v["val-grto/box_fill_gIoU"] for v in end])
        axes[0].axhline(fill, color=colors[arm], ls=":", lw=1)
    for ax, title in zip(axes, ("final mask gIoU (dotted: filling its boxes)", "first call's mask gIoU"), strict=True):
        ax.set_xticks([0, 1], ["before", "after RL"])
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8, help="GRTO steps per run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--answers", type=int, default=4, help="answers (trajectories) per prompt")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workdir", default="/tmp/agent_loop_bench")
    parser.add_argument("--home", default=os.environ.get("VERL_GRTO_HOME", str(Path.home() / ".cache/verl_grto")))
    parser.add_argument("--out", default="benchmarks/results/agent_loop.json")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = {**git_commit(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            results.append(run(arm, seed, args, workdir))
            print(f"{arm} seed {seed}: {results[-1]['validations'][-1]}", flush=True)
    out = {
        "command": " ".join(["benchmarks/agent_loop.py", *sys.argv[1:]]),
        **started,
        "settings": {k: getattr(args, k) for k in ("seeds", "steps", "prompts", "answers", "arms")},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "table": table(results),
        "runs": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(results, path.with_suffix(".png"))
    print(json.dumps(out["table"], indent=1))


if __name__ == "__main__":
    main()
