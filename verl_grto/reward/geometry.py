"""Box overlap and one-to-one matching, shared by the rewards and the evaluation.

Boxes are ``(x1, y1, x2, y2)`` in pixels with exclusive ``x2``/``y2`` (as
:func:`verl_grto.data.masks.mask_to_box` writes them), so a box's area is simply
``(x2 - x1) * (y2 - y1)`` and a one-pixel object has area 1.

For several predicted and ground-truth objects the score is the mean IoU over a greedy one-to-one
match divided by ``max(#pred, #gt)``: every missing or extra object counts as a zero. Greedy (take the
best remaining pair, repeat) rather than Hungarian keeps it dependency-free; with the handful of
objects a referring expression names the two rarely differ, and greedy never exceeds the optimum, so
the reward can only be pessimistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = Sequence[float]


def box_area(box: Box) -> float:
    """Area of a box; zero for an empty or inverted one."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0.0 when both are empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def pairwise_box_iou(pred: Sequence[Box], gt: Sequence[Box]) -> np.ndarray:
    """IoU matrix of shape ``(len(pred), len(gt))``."""
    out = np.zeros((len(pred), len(gt)), dtype=np.float64)
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            out[i, j] = box_iou(p, g)
    return out


def greedy_match(iou: np.ndarray) -> list[tuple[int, int, float]]:
    """One-to-one ``(pred_index, gt_index, iou)`` pairs, best pair first, ties broken by lower indices.

    Pairs with IoU 0 are not matched: they would add nothing to the score.
    """
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou must be a 2-D matrix, got shape {iou.shape}")
    order = sorted(
        ((float(iou[i, j]), i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_p: set[int] = set()
    used_g: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for value, i, j in order:
        if value <= 0.0:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        pairs.append((i, j, value))
    return pairs


def matched_mean_iou(iou: np.ndarray) -> float:
    """Sum of greedily matched IoUs over ``max(#pred, #gt)``; 0.0 if either side is empty."""
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2 or iou.shape[0] == 0 or iou.shape[1] == 0:
        return 0.0
    return sum(v for _, _, v in greedy_match(iou)) / max(iou.shape)
