"""A picture of a prediction: the mask tinted over its image, with the prompts the tool got.

Why show the prompts: a wrong mask has two possible culprits, the policy (a box around the wrong
object) and the tool (a good box, a bad mask); the overlay tells them apart at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from verl_grto.tool.prompts import PromptLike

MASK_COLOUR = np.array([255, 0, 0], dtype=np.float32)
MASK_ALPHA = 0.5
BOX_COLOUR = (0, 255, 0)
POINT_COLOURS = {1: (0, 255, 0), 0: (0, 0, 255)}  # object / background clicks


def overlay(rgb: np.ndarray, mask: np.ndarray, objects: Sequence[PromptLike] = ()) -> Image.Image:
    """``rgb`` (HxWx3 uint8) with ``mask`` (bool HxW) tinted red, boxes outlined and points dotted."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size")
    out = rgb.astype(np.float32)
    out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * MASK_COLOUR
    image = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = max(2, round(min(rgb.shape[:2]) / 100))
    for obj in objects:
        if obj.box is not None:
            x1, y1, x2, y2 = (float(v) for v in obj.box)
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=BOX_COLOUR, width=max(1, radius // 2))
        for (x, y), label in zip(obj.points, obj.labels, strict=True):
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius], fill=POINT_COLOURS.get(int(label), BOX_COLOUR)
            )
    return image
