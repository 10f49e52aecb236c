"""Which rollouts should BTO train the tool on? Uniform weights against ``bto.min_box_iou``.

    .venv/bin/python benchmarks/bto_weighting.py [--prompts 128] [--epochs 8]

Offline BTO on the main job's data (single-object camouflage scenes): a buffer of G=4 sampled
answers per training prompt from the tiny warm-started policy (the ``hf`` rollout server, in
process), the pre-trained tiny tool trained on it for ``--epochs`` epochs (mask decoder, lr 1e-3,
8 images per update), each setting from the same initial tool and the same buffer. Held-out: the
policy's greedy answers on the 64 validation scenes, scored as validation scores them (gIoU of the
tool's masks, unparseable answers as missing masks), beside the baseline of the answers' boxes
filled. Settings: ``uniform`` (every parseable rollout) and ``min_box_iou`` 0.1 / 0.3 (only rollouts
whose box overlaps the object at least that much). The last line is the ratio of the final held-out
gIoU, ``min_box_iou=0.1`` over ``uniform``. A measurement on a shared machine, one seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from verl_grto.algorithm.bto.build import build_buffer, hf_generate_fn
from verl_grto.algorithm.bto.train import train_tool_on_buffer
from verl_grto.assets.tool_pretrain import ensure_pretrained_tool
from verl_grto.assets.warmstart import ensure_warm_policy
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.baselines import fill_boxes
from verl_grto.eval.metrics import IoUAccumulator
from verl_grto.recipe_resolvers import resolve_synthetic
from verl_grto.tool.engine import ToolEngine, ToolEngineConfig
from verl_grto.tool.model import SegmentationTool

SETTINGS = {"uniform": 0.0, "min_box_iou=0.1": 0.1, "min_box_iou=0.3": 0.3}
MAIN_JOB_DATA = ("camouflage", 256, 64, 0, 1, 1)  # recipes/bgrto_tiny_cpu.yaml


def box_fill_giou(records) -> float:
    acc = IoUAccumulator()
    for r in records:
        gt = GroundTruth.from_json(r.ground_truth)
        boxes = [o.box for o in r.objects() if o.box is not None]
        acc.add(fill_boxes(boxes, *gt.image_size) if r.parse_ok else None, decode_rle(gt.mask_rle))
    return acc.results()["gIoU"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    domain, n_train, n_val, seed, hi, lo = MAIN_JOB_DATA
    files = [Path(resolve_synthetic(domain, split, n_train, n_val, seed, hi, lo)) for split in ("train", "val")]
    train = pd.read_parquet(files[0]).to_dict("records")[: args.prompts]
    val = pd.read_parquet(files[1]).to_dict("records")
    policy, tool_dir = ensure_warm_policy(None, seed=0), ensure_pretrained_tool(None, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bto_weighting_"))
    buffer = build_buffer(train, hf_generate_fn(policy, seed=0), 4, tmp / "buffer", reference_policy=str(policy))
    heldout = build_buffer(val, hf_generate_fn(policy, top_k=1), 1, tmp / "heldout", reference_policy="greedy")
    store = SampleImageStore(files)
    print(f"buffer: {len(buffer)} rollouts, parse rate {np.mean([r.parse_ok for r in buffer.records]):.2f}")
    print(f"held-out: {len(heldout)} greedy answers, box-fill baseline gIoU {box_fill_giou(heldout.records):.3f}")

    finals = {}
    for name, min_box_iou in SETTINGS.items():
        torch.manual_seed(0)
        engine = ToolEngine(SegmentationTool.from_pretrained(str(tool_dir)), ToolEngineConfig(lr=1e-3))
        curve: list[float] = []
        for epoch in range(args.epochs):
            report = train_tool_on_buffer(
                engine,
                buffer,
                store,
                1,
                8,
                heldout=heldout.records,
                seed=epoch,
                min_box_iou=min_box_iou,
                progress=False,
            )
            curve += [report.iou_before] if epoch == 0 else []
            curve.append(report.iou_after)
        finals[name] = curve[-1]
        print(f"{name:16s} usable rollouts {report.usable_rollouts:4d}  held-out gIoU by epoch (0 = before):")
        print("    " + " ".join(f"{v:.3f}" for v in curve))
    ratio = finals["min_box_iou=0.1"] / max(finals["uniform"], 1e-9)
    print(f"final held-out gIoU ratio min_box_iou=0.1 / uniform: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
