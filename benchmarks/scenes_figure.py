"""A picture of what B-GRTO does: validation scenes, the policy's box and the tool's mask at each stage.

    .venv/bin/python benchmarks/scenes_figure.py --run RUNS/bgrto_tiny_cpu --out docs/images/bgrto_scenes.png

Reads a finished ``bgrto`` run's folder (``benchmarks/tiny_run.py --fresh --runs RUNS`` keeps one):
``resolved_config.yaml`` names the validation parquet, the reference policy and the pre-trained tool;
``bto/report.json`` the tool BTO left; the newest ``global_step_N`` holds the policy (``actor/huggingface``)
and the tool (``tool``) after GRTO. For the first ``--scenes`` validation scenes (no choosing), each
stage's policy answers greedily and the stage's tool segments from the answer, exactly as the run's
validation does (:class:`verl_grto.eval.inference.PolicyToolPredictor`); each panel shows the box the
tool was given (green) and its mask (red, outlined) with the mask's IoU, beside the ground truth. A JSON beside the
picture (``--out`` with ``.json``) records the command, the run, and every panel's IoU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tiny_run import git_commit  # benchmarks/ is the script's folder, first on sys.path

STAGES = ("before BTO", "after BTO", "after GRTO")
SCALE = 3  # the tiny scenes are 112 px: draw them larger


def stage_checkpoints(run: Path) -> dict[str, tuple[Path, Path]]:
    """(policy dir, tool dir) of each stage of a bgrto run, from the run's own records."""
    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
    reference = Path(cfg["actor_rollout_ref"]["model"]["path"])
    pretrained = Path(cfg["grto"]["tool"]["path"])
    report = json.loads((run / "bto" / "report.json").read_text())
    steps = sorted(run.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if not steps:
        raise FileNotFoundError(f"{run} has no global_step_N checkpoint: was the run's save_freq -1?")
    last = steps[-1]
    policy = last / "actor" / "huggingface"
    if not (policy / "config.json").is_file():
        raise FileNotFoundError(f"{policy} holds no Hugging Face model (the recipe must save hf_model)")
    return {
        "before BTO": (reference, pretrained),
        "after BTO": (reference, Path(report["tool"]["tool_dir"])),
        f"after GRTO ({last.name.replace('global_step_', 'step ')})": (policy, last / "tool"),
    }


def val_rows(run: Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
    files = cfg["data"]["val_files"]
    path = files if isinstance(files, str) else files[0]
    return pq.read_table(path).slice(0, n).to_pylist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a bgrto run folder (runs/bgrto_tiny_cpu)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--scenes", type=int, default=4, help="the first N validation scenes")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from verl_grto.data.masks import decode_rle
    from verl_grto.data.schema import GroundTruth
    from verl_grto.eval.inference import PolicyToolPredictor, row_rgb
    from verl_grto.eval.overlay import overlay
    from verl_grto.eval.policy_probe import TINY_RESPONSE_LENGTH
    from verl_grto.reward.answer import ToolPrompt
    from verl_grto.reward.mask_iou import intersection_union, sample_iou

    run = args.run.resolve()
    stages = stage_checkpoints(run)
    rows = val_rows(run, args.scenes)
    images = [row_rgb(r) for r in rows]
    truths = [GroundTruth.from_json(r["reward_model"]["ground_truth"]) for r in rows]
    gt_masks = [decode_rle(t.mask_rle) for t in truths]
    panels: dict[str, list[dict[str, Any]]] = {}
    for stage, (policy, tool) in stages.items():
        predictor = PolicyToolPredictor(policy, tool, max_new_tokens=TINY_RESPONSE_LENGTH, device="cpu")
        masks = predictor.predict_batch(rows)
        panels[stage] = []
        for row, image, mask, gt, record in zip(rows, images, masks, gt_masks, predictor.records, strict=True):
            parsed = predictor.parse(row, record.answer or "", image.shape[:2])
            panels[stage].append(
                {
                    "mask": mask,
                    "objects": list(parsed.objects) if parsed.ok else [],
                    "iou": sample_iou(*intersection_union(mask, gt)),
                    "answer": record.answer,
                }
            )

    columns = [*stages, "ground truth"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.45 * len(rows)), squeeze=False)
    for i, (row, image, gt, truth) in enumerate(zip(rows, images, gt_masks, truths, strict=True)):
        big = np.kron(image, np.ones((SCALE, SCALE, 1), dtype=np.uint8))
        for j, column in enumerate(columns):
            ax = axes[i][j]
            if column == "ground truth":
                boxes = [ToolPrompt(box=tuple(v * SCALE for v in b)) for b in truth.boxes]
                mask, title = np.kron(gt, np.ones((SCALE, SCALE), dtype=bool)), "ground truth"
            else:
                p = panels[column][i]
                boxes = [ToolPrompt(box=tuple(v * SCALE for v in o.box)) for o in p["objects"] if o.box is not None]
                mask, title = np.kron(p["mask"], np.ones((SCALE, SCALE), dtype=bool)), f"{column}\nIoU {p['iou']:.2f}"
            ax.imshow(overlay(big, mask, boxes))
            if mask.any():  # the mask's outline too: a red mask on a red object is hard to see
                ax.contour(mask, levels=[0.5], colors="yellow", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        prompt = row["prompt"][-1]["content"].replace("<image>", "").strip().splitlines()[-1]
        axes[i][0].set_ylabel(prompt[:28], fontsize=7)
    fig.suptitle(
        "B-GRTO on camouflage scenes: box from the policy (green), mask from the tool (red, outlined yellow)",
        fontsize=9,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)

    record = {
        "what": "benchmarks/scenes_figure.py: the first validation scenes at each stage of a bgrto run",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/scenes_figure.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        **git_commit(),
        "run": str(args.run),
        "stages": {k: {"policy": str(p), "tool": str(t)} for k, (p, t) in stages.items()},
        "scenes": [str(r["extra_info"]["sample_id"]) for r in rows],
        "iou": {k: [round(p["iou"], 4) for p in v] for k, v in panels.items()},
        "answers": {k: [p["answer"] for p in v] for k, v in panels.items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.out}: {len(rows)} scenes x {len(columns)} panels")
    for k, v in record["iou"].items():
        print(f"  {k:24s} IoU {' '.join(f'{x:.2f}' for x in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
