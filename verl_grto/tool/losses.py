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


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy per mask: (R, H, W) logits and targets in [0, 1] -> (R,)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask, 1 - (2|P.T| + s) / (|P| + |T| + s) with P = sigmoid(logits): (R, H, W) -> (R,).

    The smoothing term keeps empty-vs-empty masks at 0 loss and the gradient finite.
    """
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return 1.0 - (2.0 * inter + smooth) / (probs.sum(1) + targets.sum(1) + smooth)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per mask of boolean (R, H, W) masks; two empty masks have IoU 1."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
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


def _pairs_at_resolution(
    mask_logits: torch.Tensor, gt_masks: Sequence[torch.Tensor | np.ndarray], resolution: Resolution
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, soft target) per rollout at the configured resolution."""
    device = mask_logits.device
    pairs = []
    for logits, gt in zip(mask_logits, gt_masks, strict=True):
        target = _as_float_mask(gt, device)
        if resolution == "low_res":
            pairs.append((logits, _area_resize(target, tuple(logits.shape))))
        elif resolution == "original":
            up = F.interpolate(logits[None, None], size=tuple(target.shape), mode="bilinear", align_corners=False)
            pairs.append((up[0, 0], target))
        else:
            size = (int(resolution), int(resolution))
            up = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)
            pairs.append((up[0, 0], _area_resize(target, size)))
    return pairs


def segmentation_losses(
    mask_logits: torch.Tensor,
    gt_masks: Sequence[torch.Tensor | np.ndarray],
    iou_pred: torch.Tensor | None,
    config: LossConfig,
) -> SegLosses:
    """BCE + Dice (+ optional IoU-head MSE) per rollout.

    `mask_logits` is the decoder's (R, h, w) output, `gt_masks[r]` the boolean HxW mask of
    rollout r at its image's original size. The IoU-head target is the IoU of the prediction
    thresholded at logit 0 against the target thresholded at 0.5, and is not differentiated.
    """
    if len(gt_masks) != mask_logits.shape[0]:
        raise ValueError(f"{mask_logits.shape[0]} masks predicted but {len(gt_masks)} ground truths")
    if config.iou_weight and iou_pred is None:
        raise ValueError("iou_weight > 0 needs iou_pred")
    bce, dice, iou = [], [], []
    # Rollouts at the same size could be batched; per-rollout keeps mixed image sizes simple and R is small.
    for logits, target in _pairs_at_resolution(mask_logits, gt_masks, config.resolution):
        logits, target = logits[None], target[None]
        bce.append(bce_loss(logits, target))
        dice.append(dice_loss(logits, target, config.dice_smooth))
        iou.append(mask_iou(logits.detach() > 0, target > 0.5))
    if not bce:
        empty = mask_logits.new_zeros(0)
        return SegLosses(empty, empty, empty, empty, empty)
    bce_t, dice_t, iou_t = torch.cat(bce), torch.cat(dice), torch.cat(iou).to(mask_logits.dtype)
    iou_loss = (iou_pred - iou_t) ** 2 if iou_pred is not None else torch.zeros_like(bce_t)
    total = config.bce_weight * bce_t + config.dice_weight * dice_t
    if config.iou_weight:
        total = total + config.iou_weight * iou_loss
    return SegLosses(total, bce_t, dice_t, iou_loss, iou_t)
