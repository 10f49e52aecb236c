"""Tool throughput on CPU: masks/s of `ToolEngine.predict` and steps/s of `ToolEngine.update`, with and without the embedding cache.

Run: ``.venv/bin/python benchmarks/tool_throughput.py [--quick] [--repeats 3] [--images 4] [--group 4]``.
Not a test: it prints numbers for one machine and load.

A GRTO step gives the tool ``--images`` distinct images with ``--group`` (G) rollouts each, every
rollout with its own box prompt. Two ways to feed them, measured in the same run:

* ``uncached``: every rollout is its own sample id, so every rollout re-encodes its image
  (what a tool without `EmbeddingCache` would do): images x G encodes per call;
* ``cached``: the rollouts of an image share its sample id, so each distinct image is encoded
  once per step and its G rollouts are decoded from the cache: ``images`` encodes per call.

Each timed call starts a new step (`begin_step` clears the cache), so the cached numbers include
the encoder once per image, never zero times. Models have random weights: ``tiny``
(`tiny_sam2_config`, 128 px) and Meta's released architectures by name (`meta_sam2_config`, 1024 px;
``sam2.1_hiera_t`` is several seconds per encode on a small CPU, so keep ``--repeats`` low).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from verl_grto.tool.configs import meta_sam2_config, tiny_sam2_config
from verl_grto.tool.engine import ToolBatch, ToolEngine
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.prompts import ObjectPrompt


@dataclass(frozen=True)
class Workload:
    """One step's images and rollouts: rollout r belongs to image r // group."""

    images: list[np.ndarray]
    group: int
    boxes: list[tuple[float, float, float, float]]
    gt_masks: list[np.ndarray]

    def batch(self, cached: bool) -> ToolBatch:
        """The step as the trainer would send it, with (cached) or without (uncached) shared sample ids."""
        owner = [r // self.group for r in range(len(self.boxes))]
        prompts = [[ObjectPrompt(box)] for box in self.boxes]
        if cached:
            return ToolBatch(list(range(len(self.images))), list(self.images), owner, prompts, list(self.gt_masks))
        rollouts = list(range(len(self.boxes)))
        return ToolBatch(rollouts, [self.images[i] for i in owner], rollouts, prompts, list(self.gt_masks))


def make_workload(rng: np.random.Generator, images: int, group: int, height: int, width: int) -> Workload:
    """Random images; per rollout a random box and its filled rectangle as ground truth."""
    pictures = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(images)]
    boxes, masks = [], []
    for _ in range(images * group):
        x1, y1 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x2, y2 = x1 + rng.integers(width // 8, width // 2), y1 + rng.integers(height // 8, height // 2)
        mask = np.zeros((height, width), dtype=bool)
        mask[y1:y2, x1:x2] = True
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
        masks.append(mask)
    return Workload(pictures, group, boxes, masks)


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timings: on a shared machine the minimum is the least disturbed estimate."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(engine: ToolEngine, work: Workload, repeats: int) -> dict[tuple[str, bool], float]:
    """Seconds per call of predict and update, uncached and cached; each call is one fresh step."""

    def step(kind: str, cached: bool) -> Callable[[], object]:
        batch = work.batch(cached)

        def run() -> object:
            engine.begin_step()
            return engine.predict(batch) if kind == "predict" else engine.update(batch)

        return run

    warm = ToolBatch([0], [work.images[0]], [0], [[ObjectPrompt(work.boxes[0])]], [work.gt_masks[0]])
    engine.begin_step()
    engine.update(warm)  # first-call allocations and lazy initialisation, outside the timings
    return {
        (kind, cached): best_seconds(step(kind, cached), repeats)
        for kind in ("predict", "update")
        for cached in (False, True)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny config only")
    parser.add_argument("--configs", default="tiny,sam2.1_hiera_t", help="comma-separated: tiny and/or Meta names")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per cell (the best is reported)")
    parser.add_argument("--images", type=int, default=4, help="distinct images per step")
    parser.add_argument("--group", type=int, default=4, help="rollouts per image (G)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = parser.parse_args(argv)
    if min(args.repeats, args.images, args.group) < 1:
        parser.error("--repeats, --images and --group must be positive")
    torch.set_num_threads(args.threads)
    names = ["tiny"] if args.quick else args.configs.split(",")
    rollouts = args.images * args.group

    print(
        f"{args.images} images x G={args.group} rollouts, 1 box each; best of {args.repeats}; "
        f"torch threads {torch.get_num_threads()}, device cpu"
    )
    print(f"{'config':<16}{'call':<9}{'uncached':>12}{'cached':>12}{'unit':>10}{'cached/uncached':>17}{'encodes':>10}")
    for name in names:
        config = tiny_sam2_config() if name == "tiny" else meta_sam2_config(name)
        side = config.prompt_encoder_config.image_size
        engine = ToolEngine(SegmentationTool.from_config(config, seed=0))
        work = make_workload(np.random.default_rng(0), args.images, args.group, side * 3 // 4, side)
        seconds = measure(engine, work, args.repeats)
        for kind, per_call, unit in (("predict", rollouts, "masks/s"), ("update", 1, "steps/s")):
            uncached, cached = (per_call / seconds[kind, c] for c in (False, True))
            print(
                f"{name:<16}{kind:<9}{uncached:>12.3f}{cached:>12.3f}{unit:>10}{cached / uncached:>16.2f}x"
                f"{f'{rollouts}/{args.images}':>10}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
