"""Differentiable segmentation losses for the tool, one value per rollout.

Why per rollout: GRTO weights each rollout's tool loss (e.g. by its reward or advantage),
so losses are returned as vectors and reduced by the caller with `weighted_mean`.
Non-finite values are not masked here: they propagate so the caller can detect and skip.

Resolution choices (`LossConfig.resolution`):
- "low_res": the decoder's logits (S/4 square) against the ground truth area-averaged down
  to that size. Area averaging gives soft targets at object borders instead of the aliasing
  of nearest-neighbour sampling, which would drop thin objects entirely.
- "original": logits upsampled bilinearly to each ground-truth mask's own size (what the
  reward sees), against the exact binary mask.
- an int S: logits upsampled and ground truth area-resized to S x S.

Ignore regions (ReasonSeg's "ignore" polygons): pixels that count in no score are left out of every
term. A per-pixel *valid* weight v = 1 - ignore (area-averaged, so fractional at the loss resolution's
borders) multiplies the BCE, which is then the mean over valid pixels (sum v * bce / sum v), and the
Dice sums (P -> v P, T -> v T); the IoU of the thresholded prediction counts only pixels with v > 0.5.
Without an ignore region the terms are exactly the plain ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Resolution = Literal["low_res", "original"] | int


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms and the resolution they are computed at."""

    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 0.0
    resolution: Resolution = "low_res"
    dice_smooth: float = 1.0

    def __post_init__(self) -> None:
        if not (
            self.resolution in ("low_res", "original") or (isinstance(self.resolution, int) and self.resolution > 0)
        ):
            raise ValueError(f"resolution must be 'low_res', 'original' or a positive int, got {self.resolution!r}")


@dataclass
class SegLosses:
    """Per-rollout loss terms (each shape (R,)) and the IoU of the thresholded prediction."""

    total: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    iou_loss: torch.Tensor
    iou: torch.Tensor


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy per mask: (R, H, W) logits and targets in [0, 1] -> (R,); with ``valid``
    (R, H, W) weights in [0, 1], the mean over valid pixels (0 for a mask with none)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1)
    if valid is None:
        return bce.mean(1)
    v = valid.flatten(1)
    return (bce * v).sum(1) / v.sum(1).clamp(min=torch.finfo(v.dtype).tiny)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss per mask, 1 - (2|P.T| + s) / (|P| + |T| + s) with P = sigmoid(logits): (R, H, W) -> (R,);
    with ``valid`` weights, P and T are first multiplied by them (ignored pixels add to no sum).

    The smoothing term keeps empty-vs-empty masks at 0 loss and the gradient finite.
    """
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    if valid is not None:
        probs, targets = probs * valid.flatten(1), targets * valid.flatten(1)
    inter = (probs * targets).sum(1)
    return 1.0 - (2.0 * inter + smooth) / (probs.sum(1) + targets.sum(1) + smooth)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU per mask of boolean (R, H, W) masks, counting only ``valid`` (bool) pixels; an empty union has IoU 1."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter, union = pred & target, pred | target
    if valid is not None:
        inter, union = inter & valid.flatten(1), union & valid.flatten(1)
    inter, union = inter.sum(1).float(), union.sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def weighted_sum(
    per_rollout: torch.Tensor, weights: torch.Tensor | Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(w * loss), sum(w)): the numerator (attached to the graph) and denominator of `weighted_mean`.

    Rollouts with weight 0 contribute exactly 0, even when their loss is non-finite.
    """
    w = torch.as_tensor(weights, dtype=per_rollout.dtype, device=per_rollout.device)
    if w.shape != per_rollout.shape:
        raise ValueError(f"weights shape {tuple(w.shape)} != losses shape {tuple(per_rollout.shape)}")
    if torch.any(w < 0):
        raise ValueError("weights must be non-negative")
    used = w > 0
    # where() rather than w * loss so that a zero-weight non-finite rollout cannot leak NaN in.
    weighted = torch.where(used, w * per_rollout, torch.zeros_like(per_rollout))
    return weighted.sum(), w.sum()


def weighted_mean(per_rollout: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sum(w * loss) / sum(w); 0 (still attached to the graph) when all weights are 0.

    Invariant to a common rescaling of the weights (w and c * w, c > 0, give the same value): a
    loss coefficient must multiply the result, not the weights. A non-finite loss with non-zero
    weight makes the result non-finite, which is the signal the caller checks.
    """
    total, weight = weighted_sum(per_rollout, weights)
    return total / weight.clamp(min=torch.finfo(weight.dtype).tiny)


def _as_float_mask(mask: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask, device=device).float()


def _area_resize(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask[None, None], size=size, mode="area")[0, 0]


def _at_resolution(
    logits: torch.Tensor, mask: torch.Tensor | np.ndarray, resolution: Resolution
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """One rollout's (h, w) logits at the loss resolution, and the size masks must be area-resized to
    (None: they stay at their own, original size)."""
    if resolution == "low_res":
        return logits, tuple(logits.shape)
    size = tuple(np.shape(mask)) if resolution == "original" else (int(resolution), int(resolution))
    up = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return up, None if resolution == "original" else size


def _pairs_at_resolution(
    mask_logits: torch.Tensor,
    gt_masks: Sequence[torch.Tensor | np.ndarray],
    resolution: Resolution,
    ignore_masks: Sequence[torch.Tensor | np.ndarray | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(logits, soft target, valid weights or None) per rollout at the configured resolution."""
    device = mask_logits.device
    ignores = ignore_masks if ignore_masks is not None else [None] * len(gt_masks)
    out = []
    for logits, gt, ignore in zip(mask_logits, gt_masks, ignores, strict=True):
        at, resize = _at_resolution(logits, gt, resolution)
        target = _as_float_mask(gt, device)
        valid = None if ignore is None else 1.0 - _as_float_mask(ignore, device)
        if resize is not None:
            target = _area_resize(target, resize)
            valid = None if valid is None else _area_resize(valid, resize)
        out.append((at, target, valid))
    return out


def segmentation_losses(
    mask_logits: torch.Tensor,
    gt_masks: Sequence[torch.Tensor | np.ndarray],
    iou_pred: torch.Tensor | None,
    config: LossConfig,
    ignore_masks: Sequence[torch.Tensor | np.ndarray | None] | None = None,
) -> SegLosses:
    """BCE + Dice (+ optional IoU-head MSE) per rollout.

    `mask_logits` is the decoder's (R, h, w) output, `gt_masks[r]` the boolean HxW mask of
    rollout r at its image's original size, `ignore_masks[r]` (None, or bool HxW) the pixels of it
    no term counts (see the module docstring). The IoU-head target is the IoU of the prediction
    thresholded at logit 0 against the target thresholded at 0.5, and is not differentiated.
    """
    if len(gt_masks) != mask_logits.shape[0]:
        raise ValueError(f"{mask_logits.shape[0]} masks predicted but {len(gt_masks)} ground truths")
    if config.iou_weight and iou_pred is None:
        raise ValueError("iou_weight > 0 needs iou_pred")
    bce, dice, iou = [], [], []
    # Rollouts at the same size could be batched; per-rollout keeps mixed image sizes simple and R is small.
    for logits, target, valid in _pairs_at_resolution(mask_logits, gt_masks, config.resolution, ignore_masks):
        logits, target = logits[None], target[None]
        valid = None if valid is None else valid[None]
        bce.append(bce_loss(logits, target, valid))
        dice.append(dice_loss(logits, target, config.dice_smooth, valid))
        iou.append(mask_iou(logits.detach() > 0, target > 0.5, None if valid is None else valid > 0.5))
    if not bce:
        empty = mask_logits.new_zeros(0)
        return SegLosses(empty, empty, empty, empty, empty)
    bce_t, dice_t, iou_t = torch.cat(bce), torch.cat(dice), torch.cat(iou).to(mask_logits.dtype)
    iou_loss = (iou_pred - iou_t) ** 2 if iou_pred is not None else torch.zeros_like(bce_t)
    total = config.bce_weight * bce_t + config.dice_weight * dice_t
    if config.iou_weight:
        total = total + config.iou_weight * iou_loss
    return SegLosses(total, bce_t, dice_t, iou_loss, iou_t)
