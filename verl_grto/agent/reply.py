"""What the policy sees back from a call: the mask drawn on the image it was shown, and a short text.

The picture is :func:`verl_grto.eval.overlay.overlay` (the mask tinted red, the call's box outlined,
its points dotted) on the image the policy was shown, at that image's size unless ``max_pixels`` asks
for a smaller reply (a reply image costs as many vision tokens as its size, and counts against
``rollout.response_length``). The text gives the mask's area as a fraction of the image and its box on
the policy's own grid (the numbers it would write in a call or an answer), so a policy can compare the
mask with the box it asked for and call again.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from verl_grto.agent.calls import CallFrame
from verl_grto.data.masks import mask_to_box
from verl_grto.eval.overlay import overlay
from verl_grto.reward.answer import ToolPrompt


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``(H, W)`` by nearest neighbour (unchanged when already that size)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(hw):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((int(hw[1]), int(hw[0])), Image.Resampling.NEAREST)
    return np.asarray(image) >= 128


def reply_text(mask_shown: np.ndarray, frame: CallFrame) -> str:
    """``mask: area 0.123 of the image, box [x1, y1, x2, y2]`` (the box on the policy's grid), or
    ``mask: empty`` when the tool found nothing."""
    box = mask_to_box(mask_shown)
    if box is None:
        return "mask: empty"
    area = float(np.asarray(mask_shown, dtype=bool).mean())
    x1, y1, x2, y2 = frame.box_on_grid(box)
    return f"mask: area {area:.3f} of the image, box [{x1}, {y1}, {x2}, {y2}]"


def reply_image(
    shown: Image.Image, mask_shown: np.ndarray, prompt_shown: ToolPrompt, max_pixels: int | None
) -> Image.Image:
    """The mask (in the shown frame) drawn on the shown image with the call's prompt, scaled down to at most
    ``max_pixels`` pixels when given (the aspect ratio kept)."""
    picture = overlay(np.asarray(shown.convert("RGB")), mask_shown, [prompt_shown])
    w, h = picture.size
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        picture = picture.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
    return picture
