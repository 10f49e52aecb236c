"""Shared helpers for the segmentation-tool tests: a tiny tool and synthetic shape scenes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verl_grto.tool.configs import tiny_sam2_config
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.prompts import ObjectPrompt

torch.set_num_threads(1)  # the test machine is small and shared: 2 threads under contention were 2-5x slower


def tiny_tool(seed: int = 0, image_size: int = 128, **kwargs) -> SegmentationTool:
    return SegmentationTool.from_config(tiny_sam2_config(image_size), seed=seed, **kwargs)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@dataclass
class Scene:
    image: np.ndarray
    masks: list[np.ndarray]  # one boolean HxW mask per object

    def box(self, i: int, rng: np.random.Generator | None = None, jitter: float = 0.0) -> tuple[float, ...]:
        """The tight box (x1, y1, x2, y2) of object i, optionally jittered by `jitter` pixels (std)."""
        ys, xs = np.nonzero(self.masks[i])
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        if rng is not None and jitter:
            box += rng.normal(0.0, jitter, 4)
        return tuple(float(v) for v in box)

    def prompt(self, i: int, rng: np.random.Generator | None = None, jitter: float = 0.0) -> ObjectPrompt:
        return ObjectPrompt(self.box(i, rng, jitter))


def shape_scene(rng: np.random.Generator, height: int = 128, width: int = 128, max_objects: int = 2) -> Scene:
    """Filled rectangles and circles of random colours on a noisy grey background."""
    image = rng.normal(128, 20, (height, width, 3)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if rng.random() < 0.5:
            w, h = rng.integers(12, 40, 2)
            x1, y1 = rng.integers(0, width - w), rng.integers(0, height - h)
            mask = (xx >= x1) & (xx < x1 + w) & (yy >= y1) & (yy < y1 + h)
        else:
            r = int(rng.integers(6, 20))
            cx, cy = rng.integers(r, width - r), rng.integers(r, height - r)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[mask] = rng.integers(0, 256, 3)
        masks.append(mask)
    # later objects may cover earlier ones; keep only visible pixels
    for i in range(len(masks) - 1):
        masks[i] = masks[i] & ~np.logical_or.reduce(masks[i + 1 :])
    return Scene(image, [m for m in masks if m.any()])  # the last object is always visible


def make_batch(scenes: list[Scene], rng: np.random.Generator, group: int = 2, prefix: str = "s") -> ToolBatch:
    """`group` rollouts per scene, each prompting a random object with a jittered box."""
    index, prompts, masks = [], [], []
    for i, scene in enumerate(scenes):
        for _ in range(group):
            obj = int(rng.integers(len(scene.masks)))
            index.append(i)
            prompts.append([scene.prompt(obj, rng, jitter=2.0)])
            masks.append(scene.masks[obj])
    return ToolBatch([f"{prefix}{i}" for i in range(len(scenes))], [s.image for s in scenes], index, prompts, masks)
