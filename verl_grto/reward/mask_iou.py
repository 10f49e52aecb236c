"""Pixel IoU of a predicted mask against the ground truth, under the project's one empty-mask rule.

Why here, in the reward layer: the rewards (:mod:`verl_grto.reward.mask_reward`) and the evaluation
(:mod:`verl_grto.eval.metrics`, gIoU / cIoU) must score a mask the same way, and the evaluation sits
above the rewards, so the rule lives at the lower of the two (docs/architecture.md).

**The empty-mask rule** (LISA's, not Seg-Zero's):

1. A sample whose union is 0 (empty ground truth *and* empty prediction) has IoU **1.0**: saying
   "nothing" about an image whose target is absent (EarthReason's no-target questions) is a perfect
   answer. It adds 0 to both cIoU sums.
2. A missing prediction (no mask file, the policy's answer did not parse, the tool failed) is scored
   as an **empty prediction**: intersection 0, union = ground-truth area, so IoU 0 when the ground
   truth is not empty (and 1.0 when it is, by rule 1).
3. Pixels of an *ignore* region (ReasonSeg's "ignore" polygons) count in neither intersection nor
   union, as in LISA's evaluation.

A prediction pixel is foreground when its value is at least 128 (:func:`binarize`).

Rule 3 is applied by one function, :func:`count_overlap`, wherever masks are scored: here (rewards,
``evaluate``) and on the tool's workers (the trainer's mask rewards and validation, on torch tensors
on the tool's device, ``verl_grto/tool/engine.py``), so training and evaluation count the same pixels.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

MaskArray = TypeVar("MaskArray", np.ndarray, torch.Tensor)

#: Threshold of a uint8 prediction map for gIoU/cIoU: foreground where value >= FOREGROUND_MIN.
FOREGROUND_MIN = 128


def binarize(pred: np.ndarray) -> np.ndarray:
    """Bool mask of a prediction: bool as is, uint8 maps foreground where >= 128."""
    pred = np.asarray(pred)
    return pred if pred.dtype == bool else pred >= FOREGROUND_MIN


def count_overlap(pred: MaskArray, gt: MaskArray, ignore: MaskArray | None = None) -> tuple[MaskArray, MaskArray]:
    """(intersection, union) pixel counts of bool predictions against a bool ground truth, ignore pixels
    in neither (rule 3).

    ``pred`` is (..., H, W), ``gt`` and ``ignore`` (H, W) or broadcastable; numpy arrays or torch
    tensors (then on any device): the counts have ``pred``'s leading shape, as int64."""
    inter, union = pred & gt, pred | gt
    if ignore is not None:
        inter, union = inter & ~ignore, union & ~ignore
    flat = (*inter.shape[:-2], -1)
    return inter.reshape(flat).sum(-1), union.reshape(flat).sum(-1)


def intersection_union(pred: np.ndarray | None, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """Pixel counts (intersection, union) of a prediction (None = missing) against a bool ground truth."""
    gt = np.asarray(gt, dtype=bool)
    ignore = None if ignore is None else np.asarray(ignore, dtype=bool)
    p = np.zeros_like(gt) if pred is None else binarize(pred)
    if p.shape != gt.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth {gt.shape}")
    inter, union = count_overlap(p, gt, ignore)
    return int(inter), int(union)


def sample_iou(intersection: int, union: int) -> float:
    """Per-sample IoU under the empty-mask rule (union 0 -> 1.0)."""
    return 1.0 if union == 0 else intersection / union
