"""Which tiny-policy variant localises in *every* seed? One warm start per (variant, seed), probed as it trains.

    .venv/bin/python benchmarks/warmstart_sweep.py --variants base,deep4 --seeds 0,1,2 --out runs/sweep
    .venv/bin/python benchmarks/warmstart_sweep.py --dry-run                      # 2 variants, 12 steps, CPU

Why: the default warm start (2 text layers, 16 image tokens) localised with seed 0 and never with
seed 1 (docs/benchmarks.md), so the jump to localisation is a property of the seed, not of the recipe.
This script trains the warm start's exact loop (:func:`verl_grto.assets.warmstart.train_policy`: its
prompt, target, curriculum and schedule) for size variants of the tiny Qwen2.5-VL and records held-out
box IoU every ``--every`` steps on both domains (64 single-object scenes of the probe's own stream,
greedy answers through :class:`verl_grto.policy.generate.GreedyPolicy`) beside a constant box (the
scenes' mean box). Not :func:`verl_grto.eval.policy_probe.probe_policy`: it answers through the ``hf``
rollout server, which needs Ray, and the lent GPU machine has none.

Each (variant, seed) runs in its own process with one torch thread (``--jobs`` at a time) and appends
one JSON line per probe to ``OUT/<variant>_s<seed>.jsonl``, so a run cut short still leaves every probe
it finished; ``OUT/summary.json`` gathers them at the end. ``--device cuda`` trains on a GPU (the
scenes and prompts are still made on the CPU): a GPU run only chooses the variant; the chosen default
is then checked on this CPU with 1 and 2 threads (benchmarks/learnability.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

#: name -> (text hidden, text layers, vision patch size, learning rate). "base" is the tiny policy as it
#: was before this sweep (patch 14, 16 image tokens); "patch7" is the default it chose.
VARIANTS: dict[str, dict] = {
    "base": {"hidden": 128, "layers": 2, "patch_size": 14, "lr": 1e-3},
    "deep4": {"hidden": 128, "layers": 4, "patch_size": 14, "lr": 1e-3},
    "patch7": {"hidden": 128, "layers": 2, "patch_size": 7, "lr": 1e-3},
    "deep4_patch7": {"hidden": 128, "layers": 4, "patch_size": 7, "lr": 1e-3},
    "wide256": {"hidden": 256, "layers": 2, "patch_size": 14, "lr": 1e-3},
    "deep4_lr5e-4": {"hidden": 128, "layers": 4, "patch_size": 14, "lr": 5e-4},
    "patch7_lr2e-3": {"hidden": 128, "layers": 2, "patch_size": 7, "lr": 2e-3},
}
PROBE_DOMAINS = ("plain", "camouflage")


def _without_verl() -> None:
    """The GPU machine has no verl (nor Ray); ``verl_grto/__init__`` imports verl only to register the
    plugin, which a warm start does not use. Stand in an empty module there, and only there."""
    if importlib.util.find_spec("verl") is None:
        sys.modules["verl"] = types.ModuleType("verl")


def run_one(variant: str, seed: int, steps: tuple[int, int], every: int, n: int, device: str, out: Path) -> None:
    """Train one warm start and append a probe line to ``out`` every ``every`` steps and at the end."""
    _without_verl()
    import numpy as np
    import torch

    from verl_grto.assets.qwen25vl import build_tiny_qwen25vl
    from verl_grto.assets.warmstart import Phase, save_policy, train_policy
    from verl_grto.data.schema import GroundTruth
    from verl_grto.data.synthetic import generate_split
    from verl_grto.eval.policy_probe import PROBE_SPLIT
    from verl_grto.policy.generate import GreedyPolicy
    from verl_grto.reward.box_reward import score_box_answer
    from verl_grto.reward.geometry import box_iou

    torch.set_num_threads(1)
    spec = VARIANTS[variant]
    work = Path(tempfile.mkdtemp(prefix=f"sweep_{variant}_s{seed}_"))
    base = build_tiny_qwen25vl(
        work / "base", seed=seed, hidden=spec["hidden"], layers=spec["layers"], patch_size=spec["patch_size"]
    )
    phases = [Phase("plain", (1, 1), steps[0]), Phase("camouflage", (1, 1), steps[1])]
    total = sum(steps)
    probe_rows = {
        d: [r.to_record() for r in generate_split(n, seed, d, PROBE_SPLIT, max_objects=1, min_objects=1)]
        for d in PROBE_DOMAINS
    }
    start = time.perf_counter()

    def probe(step: int, model: torch.nn.Module, processor: object) -> None:
        if step % every and step != total:
            return
        save_policy(model, processor, base, work / "probe")
        policy = GreedyPolicy(work / "probe", device=device)
        line: dict = {"variant": variant, "seed": seed, "step": step, "train_s": round(time.perf_counter() - start, 1)}
        for domain, rows in probe_rows.items():
            texts = policy.answer(rows, max_new_tokens=32)
            gts = [GroundTruth.from_json(r["reward_model"]["ground_truth"]) for r in rows]
            scores = [score_box_answer(t, g) for t, g in zip(texts, gts, strict=True)]
            boxes = np.asarray([g.boxes[0] for g in gts], dtype=np.float64)
            mean_box = boxes.mean(axis=0)
            line[domain] = {
                "box_iou": round(float(np.mean([s.box_iou for s in scores])), 4),
                "parse_rate": round(float(np.mean([s.parse_ok for s in scores])), 4),
                "constant_box_iou": round(float(np.mean([box_iou(mean_box, b) for b in boxes])), 4),
                "distinct": len(set(texts)),
            }
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    train_policy(base, seed, phases, batch_size=16, lr=spec["lr"], callback=probe, progress_bar=False, device=device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plain-steps", type=int, default=2000)
    parser.add_argument("--camouflage-steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--n", type=int, default=64, help="held-out scenes per domain and probe")
    parser.add_argument("--extra", default="", help="more runs as variant:seed,variant:seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one torch thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/warmstart_sweep"))
    parser.add_argument("--dry-run", action="store_true", help="2 variants, seed 0, 12 steps, CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "variant,seed": the child process
    args = parser.parse_args()
    if args.dry_run:
        args.variants, args.seeds, args.plain_steps, args.camouflage_steps, args.every, args.n = (
            "base,deep4_patch7",
            "0",
            6,
            6,
            6,
            8,
        )
    steps = (args.plain_steps, args.camouflage_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        variant, seed = args.one.split(",")
        run_one(variant, int(seed), steps, args.every, args.n, args.device, args.out / f"{variant}_s{seed}.jsonl")
        return 0

    runs = [(v, int(s)) for v in args.variants.split(",") for s in args.seeds.split(",")]
    runs += [(v, int(s)) for v, s in (r.split(":") for r in args.extra.split(",") if r)]
    unknown = sorted({v for v, _ in runs} - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = [
        sys.executable,
        __file__,
        "--plain-steps",
        str(steps[0]),
        "--camouflage-steps",
        str(steps[1]),
        "--every",
        str(args.every),
        "--n",
        str(args.n),
        "--device",
        args.device,
        "--out",
        str(args.out),
    ]
    pending, running, failed = list(runs), [], []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            v, s = pending.pop(0)
            log = (args.out / f"{v}_s{s}.log").open("w")
            running.append(
                ((v, s), subprocess.Popen([*child, "--one", f"{v},{s}"], env=env, stdout=log, stderr=subprocess.STDOUT))
            )
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode:
                    failed.append(item[0])
    summary: dict = {
        "device": args.device,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "failed": failed,
        "variants": {v: VARIANTS[v] for v in {v for v, _ in runs}},
        "runs": {},
    }
    for v, s in runs:
        path = args.out / f"{v}_s{s}.jsonl"
        summary["runs"][f"{v}_s{s}"] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for key, probes in summary["runs"].items():
        curve = " ".join(f"{p['camouflage']['box_iou']:.2f}" for p in probes)
        print(f"{key:24s} camouflage box IoU by probe: {curve}")
    print(f"failed: {failed}" if failed else "all runs finished")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
