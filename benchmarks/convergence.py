"""The paper's claim, measured: does B-GRTO converge faster and end better than GRPO?

    .venv/bin/python benchmarks/convergence.py            # 3 seeds x 3 arms, the recipe's 32 steps (hours)
    .venv/bin/python benchmarks/convergence.py --quick    # 1 seed, 8 steps, a smaller BTO
    .venv/bin/python benchmarks/convergence.py --replot benchmarks/results/convergence.json  # the PNG again, no run

Every arm is a real ``python -m verl.trainer.main_ppo`` run of ``recipes/bgrto_tiny_cpu`` (synthetic
camouflage scenes; the tool was pre-trained on plain scenes), with the same data, initial policy,
initial tool, step budget and validation set (the recipe's 64 scenes); only the trainer mode / tool-loss weight
differ. BTO is the main job's (256 prompts x G=4, 8 epochs; --quick: 64 prompts, 4 epochs):

* ``grpo``: GRPO with the frozen tool (trainer mode ``grto``, ``grto.tool_loss_coef=0``);
* ``grto``: policy and tool trained together (trainer mode ``grto``), the tool on the rollouts whose
  box points at the object (``grto.min_box_iou=0.1``, the recipe's default);
* ``bgrto``: BTO, then GRTO (trainer mode ``bgrto``), both training the tool on the rollouts whose
  box points at the object (``bto.min_box_iou=0.1``, ``grto.min_box_iou=0.1``, the recipe's
  defaults); ``bgrto_uniform``: the tool trained on every parseable rollout in both stages;
* ``bto_only`` / ``bto_only_uniform``: the bootstrapped tool with the reference policy and nothing
  trained after BTO. This is exactly the B-GRTO run's validation between BTO and its first GRTO
  step, so it is read from that run (a flat line) rather than run again.

``--arms`` runs a subset; ``--merge FILE`` adds the runs of an earlier result file (same settings)
before the tables are computed, so arms can be run at different times.

Validation (greedy answers -> tool masks -> gIoU / cIoU, with the box-fill baseline) every
``--test-freq`` steps. Seeds vary RL sampling, data order and BTO's image order
(``actor_rollout_ref.rollout.seed``, ``data.seed``, ``bto.seed``); the initial models are the seed-0
tiny assets in every arm. Steps to threshold: the first validated step whose gIoU reaches the
threshold (default: filling the reference policy's boxes + 0.05, i.e. segmenting better than the
trivial answer); BTO's time is reported beside it, as a fraction of one GRTO epoch. Each final tool is also scored back on the *plain* domain with
ground-truth boxes (did tuning make it forget the source domain?).

Writes ``--out`` (JSON: every run's validation curve, summaries, settings) and a PNG plot beside it
(mean over seeds, the band their range; dotted: the trivial answer, each arm's policy's boxes filled);
the last line printed is ``steps-to-threshold ratio B-GRTO/GRPO: X``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from verl_grto.assets.build import default_home
from verl_grto.trainer.launch import read_metrics, run_main_ppo

RECIPE = "bgrto_tiny_cpu"
ARMS: dict[str, list[str]] = {
    "grpo": ["trainer.v1.trainer_mode=grto", "grto.tool_loss_coef=0"],
    "grto": ["trainer.v1.trainer_mode=grto"],
    "bgrto_uniform": ["bto.min_box_iou=0.0", "grto.min_box_iou=0.0"],
    "bgrto": ["bto.min_box_iou=0.1", "grto.min_box_iou=0.1"],  # the recipe's defaults
}
#: The B-GRTO arms and the BTO-only line read from each (its validation between BTO and GRTO).
BTO_ONLY = {"bgrto_uniform": "bto_only_uniform", "bgrto": "bto_only"}
#: The issue's arms (the uniform-BTO ablation runs with ``--arms``).
DEFAULT_ARMS = ["grpo", "grto", "bgrto"]
#: Steps to threshold count from the first validation reaching the trivial answer + this.
THRESHOLD_MARGIN = 0.05
GIOU = "val-grto/gIoU"
BOX_IOU = "val-grto/policy_box_iou"


def arm_overrides(arm: str, seed: int, steps: int, test_freq: int, quick: bool) -> list[str]:
    common = [
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={test_freq}",
        f"trainer.save_freq={steps}",  # the final tool, scored back on the plain domain
        "trainer.val_before_train=true",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"data.seed={seed}",
        f"bto.seed={seed}",
    ]
    if quick:
        common += ["bto.max_prompts=64", "bto.epochs=4"]
    return common + ARMS[arm]


def curve(summary: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation gIoU) from the run's summary; for ``bgrto`` the step-0 point is the one
    after BTO (where GRTO starts), the one before BTO is kept as ``before_bto``."""
    points: dict[int, float] = {}
    for v in summary["validations"]:
        points[int(v["step"])] = float(v[GIOU])  # a later step-0 validation (after BTO) wins
    return sorted(points.items())


def policy_box_iou(summary: dict[str, Any]) -> tuple[float, float]:
    """The policy's greedy box IoU at the run's first and last validation."""
    values = [float(v[BOX_IOU]) for v in summary["validations"]]
    return values[0], values[-1]


def steps_to(points: list[tuple[int, float]], threshold: float) -> int | None:
    return next((s for s, v in points if v >= threshold - 1e-12), None)


def domain_scores(tool_dir: Path, scenes: int = 64) -> dict[str, float]:
    """The tool's mean mask IoU from exact ground-truth boxes on held-out plain and camouflage scenes
    (the tool alone, no policy), with the box-fill baseline."""
    from transformers import Sam2Model

    from verl_grto.assets.tool_pretrain import evaluate_tool

    model = Sam2Model.from_pretrained(tool_dir)
    out = {}
    for domain in ("plain", "camouflage"):
        iou, fill = evaluate_tool(model, domain, seed=1, scenes=scenes)
        out[f"{domain}_gt_box_iou"], out[f"{domain}_box_fill_iou"] = iou, fill
    return out


def run_arm(arm: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One arm's main_ppo run in ``tmp``; a run already finished there (its summary and final tool
    written, e.g. by an interrupted earlier call with the same ``--workdir``) is read, not run again."""
    name = f"{arm}_s{seed}"
    summary_path = tmp / name / RECIPE / "grto_summary.json"
    final_tool = tmp / name / RECIPE / f"global_step_{args.steps}" / "tool"
    wall_path = tmp / f"{name}.wall_s"
    if summary_path.exists() and final_tool.exists():
        print(f"[convergence] {name}: finished earlier in {tmp}, read", flush=True)
        wall = float(wall_path.read_text()) if wall_path.exists() else None
    else:
        start = time.perf_counter()
        run_main_ppo(
            RECIPE,
            default_home(),
            tmp / name,
            tmp / f"{name}.jsonl",
            arm_overrides(arm, seed, args.steps, args.test_freq, args.quick),
            timeout=3600,
        )
        wall = time.perf_counter() - start
        wall_path.write_text(f"{wall:.1f}")
    read_metrics(tmp / f"{name}.jsonl")  # fails loudly if verl logged nothing
    summary = json.loads(summary_path.read_text())
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": wall,
        "curve": curve(summary),
        "before_bto": float(summary["validations"][0][GIOU]),
        "tool_gt_box": domain_scores(final_tool),
        "summary": summary,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 steps, a smaller BTO buffer (32 prompts)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--test-freq", type=int, default=None)
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="gIoU (default: filling the reference policy's boxes + 0.05, i.e. the first validation's box-fill"
        " baseline, mean over runs, + 0.05: a tool that segments better than the trivial answer)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--arms", nargs="*", choices=list(ARMS), default=DEFAULT_ARMS, help="none: only --merge")
    ap.add_argument("--merge", type=Path, default=None, help="a result file whose runs are added to this one's")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the runs go (default: a new temporary folder); runs"
        " already finished there are read instead of run again, so an interrupted benchmark resumes",
    )
    ap.add_argument("--replot", type=Path, default=None, help="redraw the PNG of a result file and stop")
    args = ap.parse_args()
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(saved["runs"], list(saved["arms"]), saved["threshold_gIoU"], args.replot.with_suffix(".png"))
        print(f"wrote {args.replot.with_suffix('.png')}")
        return 0
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (8 if args.quick else 32)
    args.test_freq = args.test_freq or (4 if args.quick else 8)
    out = args.out or Path("benchmarks/results") / ("convergence_quick.json" if args.quick else "convergence.json")
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="convergence_"))
    tmp.mkdir(parents=True, exist_ok=True)

    runs = []
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        runs = [r for r in earlier["runs"] if not r["arm"].startswith("bto_only")]
    for seed in args.seeds:
        for arm in args.arms:
            print(f"[convergence] {arm} seed {seed} ...", flush=True)
            runs.append(run_arm(arm, seed, args, tmp))
            print(f"[convergence] {arm} seed {seed}: {runs[-1]['curve']} ({runs[-1]['wall_s']} s)", flush=True)
    for r in [r for r in runs if r["arm"] in BTO_ONLY]:
        bto_point = next(v for s, v in r["curve"] if s == 0)
        line = [(s, bto_point) for s, _ in r["curve"]]
        runs.append({"arm": BTO_ONLY[r["arm"]], "seed": r["seed"], "curve": line})

    order = [*ARMS, *BTO_ONLY.values()]
    arms = [a for a in order if any(r["arm"] == a for r in runs)]
    finals = {a: [r["curve"][-1][1] for r in runs if r["arm"] == a] for a in arms}
    first_fill = [r["summary"]["validations"][0]["val-grto/box_fill_gIoU"] for r in runs if "summary" in r]
    threshold = args.threshold if args.threshold is not None else float(np.mean(first_fill)) + THRESHOLD_MARGIN
    table = {}
    for a in arms:
        reached = [steps_to(r["curve"], threshold) for r in runs if r["arm"] == a]
        table[a] = {
            "seeds": [r["seed"] for r in runs if r["arm"] == a],
            "final_gIoU_mean": float(np.mean(finals[a])),
            "final_gIoU_std": float(np.std(finals[a])),
            "initial_gIoU_mean": float(np.mean([r["curve"][0][1] for r in runs if r["arm"] == a])),
            "steps_to_threshold": reached,
        }
        box = [policy_box_iou(r["summary"]) for r in runs if r["arm"] == a and "summary" in r]
        if box:  # the policy's own greedy boxes against the object's box, first and last validation
            table[a]["policy_box_iou_first_mean"] = float(np.mean([first for first, _ in box]))
            table[a]["policy_box_iou_last_mean"] = float(np.mean([last for _, last in box]))
            table[a]["policy_box_iou_last_std"] = float(np.std([last for _, last in box]))
    baseline = [r["summary"]["val_last"]["val-grto/box_fill_gIoU"] for r in runs if "summary" in r]
    from verl_grto.assets.build import ensure_assets
    from verl_grto.assets.tool_pretrain import ensure_pretrained_tool

    ensure_assets(None, seed=0)
    initial_tool = domain_scores(ensure_pretrained_tool(None, seed=0))
    trained = [a for a in arms if a in ARMS]
    for a in trained:
        scores = [r["tool_gt_box"] for r in runs if r["arm"] == a]
        table[a]["final_tool_gt_box"] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    bto_fraction = [r["summary"].get("bto_fraction_of_grto_epoch") for r in runs if r["arm"] in BTO_ONLY]

    censored_at = args.steps + args.test_freq  # a run that never reached it counts as the next validation

    def mean_steps(a: str) -> float | None:
        got = table.get(a, {}).get("steps_to_threshold")
        return float(np.mean([censored_at if s is None else s for s in got])) if got else None

    g, b = mean_steps("grpo"), mean_steps("bgrto")
    ratio = (b / g) if (g and b is not None) else None
    result = {
        "recipe": RECIPE,
        "settings": {
            "seeds": sorted({r["seed"] for r in runs}),
            "steps": args.steps,
            "test_freq": args.test_freq,
            "quick": args.quick,
        },
        "threshold_gIoU": threshold,
        "box_fill_baseline_gIoU_final_mean": float(np.mean(baseline)),
        "bto_fraction_of_grto_epoch": bto_fraction,
        "initial_tool_gt_box": initial_tool,
        "arms": table,
        "runs": runs,
        "steps_to_threshold_ratio_bgrto_over_grpo": ratio,
        "steps_to_threshold_censored_at": censored_at,
        "command": " ".join(["python benchmarks/convergence.py", *sys.argv[1:]]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(runs, arms, threshold, out.with_suffix(".png"))

    print(
        f"threshold gIoU {threshold:.3f} ("
        + (
            f"filling the reference policy's boxes {np.mean(first_fill):.3f} + {THRESHOLD_MARGIN})"
            if args.threshold is None
            else "given)"
        )
    )
    print(f"box-fill baseline gIoU (each run's final policy's boxes filled, mean): {np.mean(baseline):.3f}")
    for a in arms:
        t = table[a]
        print(
            f"{a:17s} gIoU {t['initial_gIoU_mean']:.3f} -> {t['final_gIoU_mean']:.3f} +- {t['final_gIoU_std']:.3f}"
            f"  steps to threshold {t['steps_to_threshold']}"
            + (
                f"  policy box IoU {t['policy_box_iou_first_mean']:.3f} -> {t['policy_box_iou_last_mean']:.3f}"
                f" +- {t['policy_box_iou_last_std']:.3f}"
                if "policy_box_iou_last_mean" in t
                else ""
            )
        )
    print(f"BTO wall time / one GRTO epoch: {bto_fraction}")
    print(
        "tool alone, exact GT boxes (mask IoU plain / camouflage; box fill {:.3f} / {:.3f}):".format(
            initial_tool["plain_box_fill_iou"], initial_tool["camouflage_box_fill_iou"]
        )
    )
    print(f"  initial   {initial_tool['plain_gt_box_iou']:.3f} / {initial_tool['camouflage_gt_box_iou']:.3f}")
    for a in trained:
        t = table[a]["final_tool_gt_box"]
        print(f"  {a:15s} {t['plain_gt_box_iou']:.3f} / {t['camouflage_gt_box_iou']:.3f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(
        f"mean GRTO steps to threshold, a run that never reached it counted as {censored_at}: GRPO {g}, B-GRTO {b}"
        " (0 = reached after BTO, before the first GRTO step; BTO's own time is the fraction above)"
    )
    print(f"steps-to-threshold ratio B-GRTO/GRPO: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    return 0


#: How the plot names each arm.
LABELS = {
    "grpo": "GRPO, frozen tool",
    "grto": "GRTO",
    "bgrto": "B-GRTO",
    "bgrto_uniform": "B-GRTO, uniform",
    "bto_only": "BTO alone (B-GRTO after BTO)",
    "bto_only_uniform": "BTO alone, uniform",
}


def box_fill_curve(summary: dict[str, Any]) -> list[tuple[int, float]]:
    """The trivial answer at each validated step: the policy's boxes filled (the last validation of a step)."""
    by_step = {int(v["step"]): float(v["val-grto/box_fill_gIoU"]) for v in summary["validations"]}
    return sorted(by_step.items())


def plot(runs: list[dict[str, Any]], arms: list[str], threshold: float, path: Path) -> None:
    """Validation gIoU per arm (mean over seeds, band: their range) and, dotted, each trained arm's trivial
    answer (its policy's boxes filled, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"grpo": "tab:gray", "grto": "tab:blue", "bgrto": "tab:red", "bgrto_uniform": "tab:orange"}
    colors |= {"bto_only": "tab:red", "bto_only_uniform": "tab:orange"}
    for a in arms:
        color = colors.get(a, "tab:purple")
        curves = [r["curve"] for r in runs if r["arm"] == a]
        steps = [s for s, _ in curves[0]]
        values = np.array([[v for _, v in c] for c in curves])
        label = LABELS.get(a, a)
        ax.plot(steps, values.mean(0), label=label, color=color, linestyle="--" if a.startswith("bto_only") else "-")
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15)
        fills = [box_fill_curve(r["summary"]) for r in runs if r["arm"] == a and "summary" in r]
        if fills:
            fill = np.array([[v for _, v in f] for f in fills]).mean(0)
            ax.plot(
                [s for s, _ in fills[0]],
                fill,
                color=color,
                linestyle=":",
                linewidth=1.2,
                label=f"{label}: boxes filled",
            )
    ax.axhline(threshold, color="black", linewidth=0.8, linestyle=(0, (1, 4)), label="threshold (boxes filled + 0.05)")
    ax.set_xlabel("GRTO step (0 = before training; B-GRTO: after BTO)")
    ax.set_ylabel("validation gIoU, 64 camouflage scenes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
