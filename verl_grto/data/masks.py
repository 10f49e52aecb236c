"""Binary masks <-> COCO RLE, boxes <-> masks. pycocotools does the encoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an HxW binary mask as ``{"size": [H, W], "counts": str}`` (exact, JSON-safe)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_runs(counts: str | bytes) -> list[int]:
    """The run lengths of a COCO compressed RLE string, read as pycocotools' ``rleFrString`` reads them.

    Why in Python: pycocotools trusts the string. A string whose runs cover fewer pixels than its
    size decodes to a mask whose remaining pixels are uninitialised memory (garbage, no error), and a
    string ending inside a number is read past its end. Raises ValueError for a character outside
    the format's ``'0'..'o'``, a string ending inside a number, or a negative run.
    """
    try:
        data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except (UnicodeEncodeError, TypeError):
        raise ValueError(f"RLE counts is not an ASCII string: {str(counts)[:40]!r}") from None
    runs: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"RLE counts end inside run {len(runs)} (truncated string?)")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts has {chr(data[p])!r} at character {p}, outside '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:  # runs after the third are stored as differences to the run two back
            x += runs[-2]
        if x < 0:
            raise ValueError(f"RLE run {len(runs)} is negative ({x})")
        runs.append(x)
    return runs


def check_rle(rle: Any) -> tuple[int, int]:
    """Check that ``rle`` is a COCO RLE dict whose runs cover exactly its ``size``; return ``(H, W)``.

    Raises ValueError saying what is wrong. :func:`decode_rle` runs this first, so a corrupt mask is
    an error, never a silently wrong ground truth.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE must be a dict with size and counts, got {str(rle)[:80]}")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise ValueError(f"RLE size must be [H, W] (two integers >= 0), got {str(size)[:80]}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if not isinstance(counts, str | bytes):
        raise ValueError(f"RLE counts must be a compressed COCO string, got {type(counts).__name__}")
    total = sum(rle_runs(counts))
    if total != h * w:
        raise ValueError(f"RLE runs cover {total} pixels but its size {h}x{w} has {h * w}")
    return h, w


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict (counts as str or bytes) into an HxW bool array.

    Raises ValueError (from :func:`check_rle`) for an RLE that does not describe an HxW mask.
    """
    check_rle(rle)
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


def fill_boxes(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Bool HxW mask covering every pixel a box ``[x1, y1, x2, y2]`` (x2/y2 exclusive) touches.

    Why in the data layer: the trivial "fill the box" baseline is scored where the tool's masks are
    made (the tool's workers, :mod:`verl_grto.tool.engine`) and in evaluation
    (:mod:`verl_grto.eval.baselines`), which sit in different layers above this one."""
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c2, r2 = min(width, math.ceil(x2)), min(height, math.ceil(y2))
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask
