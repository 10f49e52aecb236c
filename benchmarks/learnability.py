"""How fast do the tiny models learn the synthetic world on this CPU? The study the tiny defaults are chosen from.

    .venv/bin/python benchmarks/learnability.py --quick            # < 10 minutes: 1 seed, 2 threads
    .venv/bin/python benchmarks/learnability.py                    # 2 seeds x 1 and 2 threads (policy), 2 seeds (tool)

In-process, no verl, one stage after another (two torch jobs at once on 2 cores slow each 3-25x):

* **policy**: the tiny Qwen2.5-VL trained exactly as the warm start trains it
  (:func:`verl_grto.assets.warmstart.train_policy`, its prompt and target, a fresh scene per example),
  probed every ``--policy-every`` steps on ``--n`` held-out single-object scenes of each domain through
  the rollout's own code (:func:`verl_grto.eval.policy_probe.probe_policy`): box IoU beside a constant
  box (the scenes' mean box) and the whole image; at 1 and 2 torch threads (the late localisation
  jump was seen to depend on the thread count before).
* **tool**: the tiny SAM2 pre-trained as the default pre-trains it
  (:func:`verl_grto.assets.tool_pretrain.pretrain_tool`), mask IoU from exact boxes on both domains
  every ``--tool-every`` steps beside box fill; then **adaptation**: ``--adapt-steps`` decoder-only steps
  on the shifted domain, scored on both (the plain score after it shows forgetting).

Writes ``--out`` (JSON, every curve) and a PNG beside it, prints one line per probe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from verl_grto.assets.build import build_assets
from verl_grto.assets.tool_pretrain import adapt_tool, evaluate_tool, pretrain_tool
from verl_grto.assets.warmstart import DEFAULT_PHASES, Phase, save_policy, train_policy
from verl_grto.data.synthetic import DOMAINS
from verl_grto.eval.policy_probe import probe_policy

SHIFTED = "camouflage"


def policy_curve(
    root: Path, seed: int, threads: int, phases: list[Phase], every: int, n: int, lr: float, at: list[int] | None = None
) -> dict:
    """Train the policy through ``phases`` and probe it every ``every`` steps on both domains; with ``at``,
    only at those steps, stopping after the last (the schedule still spans every phase, as the warm
    start's ``stop_after`` does)."""
    torch.set_num_threads(threads)
    base = build_assets(root / f"seed{seed}", seed=seed).policy
    scratch = Path(tempfile.mkdtemp(prefix="learnability_policy_", dir=root))
    total = sum(p.steps for p in phases)
    probes: list[dict] = []
    start = time.perf_counter()

    def probe(step: int, model: torch.nn.Module, processor: object) -> None:
        if (step not in at) if at else (step % every and step != total):
            return
        train_s = time.perf_counter() - start
        save_policy(model, processor, base, scratch)
        row: dict = {"step": step, "train_s": round(train_s, 1)}
        for domain in DOMAINS:
            r = probe_policy(scratch, seed, n, domain)
            row[domain] = {
                "box_iou": round(r.mean_iou, 4),
                "acc_at_0_5": round(r.acc_at_0_5, 4),
                "parse_rate": round(r.parse_rate, 4),
                "constant_box_iou": round(r.mean_box_iou, 4),
                "whole_image_iou": round(r.whole_image_iou, 4),
                "distinct_responses": r.distinct_responses,
            }
        probes.append(row)
        print(
            f"policy seed {seed} threads {threads} step {step:5d} ({train_s:6.0f} s): "
            + "  ".join(
                f"{d} box IoU {row[d]['box_iou']:.3f} (constant box {row[d]['constant_box_iou']:.3f}, "
                f"parse {row[d]['parse_rate']:.2f})"
                for d in DOMAINS
            ),
            flush=True,
        )

    stop_after = max(at) if at else None
    _, _, losses = train_policy(base, seed, phases, batch_size=16, lr=lr, callback=probe, stop_after=stop_after)
    return {
        "seed": seed,
        "threads": threads,
        "phases": [asdict(p) for p in phases],
        "lr": lr,
        "stop_after": stop_after,
        "seconds": round(time.perf_counter() - start, 1),
        "probes": probes,
        "loss_every_50": [round(v, 4) for v in losses[::50]],
    }


def tool_curve(root: Path, seed: int, threads: int, steps: int, every: int, adapt_steps: int, adapt_every: int) -> dict:
    """Pre-train the tool on the plain domain, scored on both domains; then adapt its decoder to the shift."""
    from transformers import Sam2Model

    torch.set_num_threads(threads)
    base = build_assets(root / f"seed{seed}", seed=seed).tool
    start = time.perf_counter()
    pretrain: list[dict] = []
    adapt: list[dict] = []

    def score(step: int, model: Sam2Model, into: list[dict], stage: str) -> None:
        row: dict = {"step": step, "train_s": round(time.perf_counter() - start, 1)}
        for domain in DOMAINS:
            iou, fill = evaluate_tool(model, domain, seed)
            row[domain] = {"mask_iou": round(iou, 4), "box_fill_iou": round(fill, 4)}
        into.append(row)
        print(
            f"tool {stage} seed {seed} step {step:5d} ({row['train_s']:6.0f} s): "
            + "  ".join(
                f"{d} mask IoU {row[d]['mask_iou']:.3f} (box fill {row[d]['box_fill_iou']:.3f})" for d in DOMAINS
            ),
            flush=True,
        )

    def on_pretrain(step: int, model: Sam2Model) -> None:
        if step % every == 0:
            score(step, model, pretrain, "pre-train (plain)")

    out = Path(tempfile.mkdtemp(prefix="learnability_tool_", dir=root))
    report = pretrain_tool(base, out, seed=seed, steps=steps, callback=on_pretrain)
    model = Sam2Model.from_pretrained(str(out)).float()
    start = time.perf_counter()
    score(0, model, adapt, f"adapt ({SHIFTED}, decoder only)")

    def on_adapt(step: int, m: Sam2Model) -> None:
        if step % adapt_every == 0:
            score(step, m, adapt, f"adapt ({SHIFTED}, decoder only)")

    adapt_tool(model, SHIFTED, adapt_steps, seed=seed, callback=on_adapt)
    return {
        "seed": seed,
        "threads": threads,
        "pretrain_steps": steps,
        "pretrain_seconds": round(report.seconds, 1),
        "pretrain": pretrain,
        "adapt_domain": SHIFTED,
        "adapt": adapt,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for run in result["policy"]:
        xs = [p["step"] for p in run["probes"]]
        ax.plot(xs, [p[SHIFTED]["box_iou"] for p in run["probes"]], label=f"seed {run['seed']}, {run['threads']} thr")
    if result["policy"]:
        probes = result["policy"][0]["probes"]
        ax.plot(
            [p["step"] for p in probes], [p[SHIFTED]["constant_box_iou"] for p in probes], "k--", label="constant box"
        )
    ax.set(title=f"policy: held-out box IoU ({SHIFTED})", xlabel="supervised step", ylabel="box IoU")
    ax.legend(fontsize=7)
    for ax, stage in ((axes[1], "pretrain"), (axes[2], "adapt")):
        for run in result["tool"]:
            for domain, style in zip(DOMAINS, ("-", ":"), strict=True):
                xs = [p["step"] for p in run[stage]]
                ax.plot(xs, [p[domain]["mask_iou"] for p in run[stage]], style, label=f"{domain}, seed {run['seed']}")
        if result["tool"]:
            run = result["tool"][0]
            for domain, style in zip(DOMAINS, ("-", ":"), strict=True):
                ax.axhline(
                    run[stage][-1][domain]["box_fill_iou"], color="k", ls=style, lw=0.8, label=f"{domain} box fill"
                )
        what = "pre-training on plain" if stage == "pretrain" else f"decoder-only adaptation to {SHIFTED}"
        ax.set(title=f"tool: {what}", xlabel="step", ylabel="mask IoU from exact boxes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 threads, shorter runs (< 10 minutes)")
    ap.add_argument("--stages", default="tool,policy")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--policy-threads", default="1,2")
    ap.add_argument("--phases", default=None, help="DOMAIN:STEPS,... (default: the warm start's; --quick: shorter)")
    ap.add_argument("--policy-every", type=int, default=250)
    ap.add_argument(
        "--policy-at",
        default=None,
        help="STEP,...: probe only there and stop after the last (e.g. the warm start's stop)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n", type=int, default=64, help="held-out scenes per policy probe")
    ap.add_argument("--tool-steps", type=int, default=4000)
    ap.add_argument("--tool-every", type=int, default=1000)
    ap.add_argument("--adapt-steps", type=int, default=600)
    ap.add_argument("--adapt-every", type=int, default=150)
    ap.add_argument("--out", default="benchmarks/results/learnability.json")
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.policy_threads.split(",")]
    default_phases = ",".join(f"{p.domain}:{p.steps}" for p in DEFAULT_PHASES)
    if args.quick:
        seeds, threads = seeds[:1], [2]
        args.tool_steps, args.tool_every, args.adapt_steps, args.adapt_every = 2000, 500, 300, 100
        default_phases = "plain:1500,camouflage:500"
    phases = []
    for part in (args.phases or default_phases).split(","):
        domain, _, steps = part.partition(":")
        if domain not in DOMAINS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--phases: {part!r} is not DOMAIN:STEPS with DOMAIN in {DOMAINS}")
        phases.append(Phase(domain, (1, 1), int(steps)))
    at = None
    if args.policy_at:
        parts = args.policy_at.split(",")
        total = sum(p.steps for p in phases)
        if not all(x.isdigit() and 0 < int(x) <= total for x in parts):
            raise SystemExit(f"--policy-at: {args.policy_at!r} is not STEP,... with each STEP in 1..{total}")
        at = sorted({int(x) for x in parts})
    stages = set(args.stages.split(","))
    if not stages <= {"tool", "policy"}:
        raise SystemExit(f"--stages: expected tool and/or policy, got {args.stages!r}")
    root = Path(tempfile.mkdtemp(prefix="learnability_"))
    result: dict = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available",
        "quick": args.quick,
        "tool": [],
        "policy": [],
    }
    start = time.perf_counter()
    if "tool" in stages:
        for seed in seeds:
            result["tool"].append(
                tool_curve(root, seed, 2, args.tool_steps, args.tool_every, args.adapt_steps, args.adapt_every)
            )
    if "policy" in stages:
        for seed in seeds:
            for t in threads:
                result["policy"].append(policy_curve(root, seed, t, phases, args.policy_every, args.n, args.lr, at))
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
