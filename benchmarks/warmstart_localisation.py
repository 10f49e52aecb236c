"""Does the tiny policy learn to localise, and after how many supervised steps? Box IoU during a warm start.

    .venv/bin/python benchmarks/warmstart_localisation.py --phases plain:1500 --probe-at 500,1000,1500
    .venv/bin/python benchmarks/warmstart_localisation.py --phases plain:1500,camouflage:600 \\
        --probe-at 1000,1500,1750,2100

Trains the tiny Qwen2.5-VL as the warm start does (:func:`verl_grto.assets.warmstart.train_policy`:
single-object scenes, one cosine learning-rate schedule over all phases) and, at each ``--probe-at``
step, answers ``--probe-n`` held-out scenes of each domain greedily through the rollout's own code
(:func:`verl_grto.eval.policy_probe.probe_policy`). Prints box IoU beside its trivial baselines (the
mean ground-truth box; the whole image) and writes every probe to ``--out`` (JSON).

Why it exists: the main job's policy is the 300-step default warm start, whose boxes are about as good
as a constant box; this measures what more supervised steps, or steps on the camouflage domain, buy.
A measurement, not a test: about 0.25 s per step with 2 torch threads on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from verl_grto.assets.build import ensure_assets
from verl_grto.assets.warmstart import Phase, save_policy, train_policy
from verl_grto.eval.policy_probe import probe_policy

DOMAINS = ("plain", "camouflage")


def parse_phases(text: str) -> list[Phase]:
    """``plain:1500,camouflage:600`` -> phases of single-object scenes."""
    phases = []
    for part in text.split(","):
        domain, _, steps = part.partition(":")
        if domain not in DOMAINS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--phases: {part!r} is not DOMAIN:STEPS with DOMAIN in {DOMAINS}")
        phases.append(Phase(domain, (1, 1), int(steps)))
    return phases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="plain:1500")
    ap.add_argument("--probe-at", default="500,1000,1500", help="steps (1-based, over all phases)")
    ap.add_argument("--probe-n", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="warmstart_localisation.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    phases = parse_phases(args.phases)
    probe_at = sorted({int(s) for s in args.probe_at.split(",")})
    base = ensure_assets(seed=args.seed).policy
    probes: list[dict] = []
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="warmstart_probe_"))

    def probe(step: int, model: torch.nn.Module, processor: object) -> None:
        if step not in probe_at:
            return
        save_policy(model, processor, base, scratch)
        row: dict = {"step": step, "train_s": round(time.perf_counter() - start, 1)}
        for domain in DOMAINS:
            result = probe_policy(scratch, args.seed, args.probe_n, domain)
            row[domain] = {
                "box_iou": result.mean_iou,
                "parse_rate": result.parse_rate,
                "mean_box_iou": result.mean_box_iou,
                "whole_image_iou": result.whole_image_iou,
                "distinct_responses": result.distinct_responses,
            }
        probes.append(row)
        cells = "  ".join(
            f"{d}: box IoU {row[d]['box_iou']:.3f} (mean box {row[d]['mean_box_iou']:.3f}, "
            f"parse {row[d]['parse_rate']:.2f})"
            for d in DOMAINS
        )
        print(f"step {step:5d} ({row['train_s']:.0f} s)  {cells}", flush=True)

    train_policy(base, args.seed, phases, args.batch_size, args.lr, callback=probe)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "phases": [[p.domain, p.steps] for p in phases],
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "probe_n": args.probe_n,
        "probes": probes,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
