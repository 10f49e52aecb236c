"""Mask reward: the policy is scored by the mask the tool makes from its answer.

``score = format_weight * format + mask_iou_weight * IoU(tool mask, GT mask)
          + box_iou_weight * box IoU + points_weight * (fraction of positive points inside the GT mask)
          - repeat_penalty * (fraction of repeated objects/points)``

The extra terms are off by default. Other systems found that rewarding boxes and points together
let a policy emit few points, and that repeated objects need a penalty; the terms are here so a
recipe can turn them on, and every zero comes with a reason.

**Empty-mask rule** (shared with evaluation, :mod:`verl_grto.reward.mask_iou`): a union of 0 (empty GT
and empty prediction) scores IoU 1.0; an unparseable answer is an empty prediction (IoU 0 against a
non-empty GT) and gets no format reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ParsedAnswer
from verl_grto.reward.box_reward import FORMAT_REWARD
from verl_grto.reward.geometry import matched_mean_iou, pairwise_box_iou
from verl_grto.reward.mask_iou import intersection_union, sample_iou


@dataclass(frozen=True)
class MaskRewardConfig:
    format_weight: float = FORMAT_REWARD
    mask_iou_weight: float = 1.0
    box_iou_weight: float = 0.0
    points_weight: float = 0.0
    repeat_penalty: float = 0.0


@dataclass(frozen=True)
class MaskRewardBreakdown:
    score: float
    format_reward: float
    mask_iou: float
    box_iou: float
    points_in_mask: float
    repeat_fraction: float
    parse_ok: bool
    reason: str

    def metrics(self) -> dict[str, float]:
        """The numeric parts, for logging."""
        return {
            "score": self.score,
            "format_reward": self.format_reward,
            "mask_iou": self.mask_iou,
            "box_iou": self.box_iou,
            "points_in_mask": self.points_in_mask,
            "repeat_fraction": self.repeat_fraction,
            "parse_ok": float(self.parse_ok),
        }


def _points_in_mask(parsed: ParsedAnswer, gt_mask: np.ndarray) -> float:
    h, w = gt_mask.shape
    positives = [p for obj in parsed.objects for p, label in zip(obj.points, obj.labels, strict=True) if label == 1]
    if not positives:
        return 0.0
    inside = [gt_mask[min(int(y), h - 1), min(int(x), w - 1)] for x, y in positives]
    return float(np.mean(inside))


def _repeat_fraction(parsed: ParsedAnswer) -> float:
    items = [("box", obj.box) for obj in parsed.objects if obj.box is not None]
    items += [("pt", p) for obj in parsed.objects for p in obj.points]
    if len(items) <= 1:
        return 0.0
    return 1.0 - len(set(items)) / len(items)


def score_mask_answer(
    parsed: ParsedAnswer, pred_mask: np.ndarray | None, gt: GroundTruth, gt_mask: np.ndarray, config: MaskRewardConfig
) -> MaskRewardBreakdown:
    """Score one rollout from its parsed answer and the tool's mask (None when nothing was decoded)."""
    if not parsed.ok:
        inter, union = intersection_union(None, gt_mask)
        return MaskRewardBreakdown(
            score=0.0,
            format_reward=0.0,
            mask_iou=sample_iou(inter, union) if union == 0 else 0.0,
            box_iou=0.0,
            points_in_mask=0.0,
            repeat_fraction=0.0,
            parse_ok=False,
            reason=parsed.reason,
        )
    inter, union = intersection_union(pred_mask, gt_mask)
    mask_iou = sample_iou(inter, union)
    fmt = 1.0 if parsed.has_think else 0.0
    pred_boxes = [obj.box if obj.box is not None else (0.0, 0.0, 0.0, 0.0) for obj in parsed.objects]
    box_iou = matched_mean_iou(pairwise_box_iou(pred_boxes, gt.boxes)) if config.box_iou_weight else 0.0
    points = _points_in_mask(parsed, gt_mask) if config.points_weight else 0.0
    repeats = _repeat_fraction(parsed) if config.repeat_penalty else 0.0
    score = (
        config.format_weight * fmt
        + config.mask_iou_weight * mask_iou
        + config.box_iou_weight * box_iou
        + config.points_weight * points
        - config.repeat_penalty * repeats
    )
    reasons = []
    if not parsed.has_think:
        reasons.append("no <think> block before <answer>")
    if mask_iou == 0.0:
        reasons.append("the tool's mask does not overlap the ground truth")
    return MaskRewardBreakdown(
        score=float(score),
        format_reward=config.format_weight * fmt,
        mask_iou=float(mask_iou),
        box_iou=float(box_iou),
        points_in_mask=float(points),
        repeat_fraction=float(repeats),
        parse_ok=True,
        reason="; ".join(reasons),
    )
