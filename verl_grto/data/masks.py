"""Binary masks <-> COCO RLE, boxes from masks. pycocotools does the encoding."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an HxW binary mask as ``{"size": [H, W], "counts": str}`` (exact, JSON-safe)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict (counts as str or bytes) into an HxW bool array."""
    counts = rle["counts"]
    coco = {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(coco).astype(bool)


def mask_to_box(mask: np.ndarray) -> list[float] | None:
    """Tight box ``[x1, y1, x2, y2]`` in pixels with exclusive x2/y2; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
