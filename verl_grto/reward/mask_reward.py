"""Mask reward: the policy is scored by the mask the tool makes from its answer.

``score = format_weight * format + mask_iou_weight * IoU(tool mask, GT mask)
          + box_iou_weight * box IoU + points_weight * (fraction of positive points inside the GT mask)
          - repeat_penalty * (fraction of repeated objects/points)``

The extra terms are off by default. Other systems found that rewarding boxes and points together
let a policy emit few points, and that repeated objects need a penalty; the terms are here so a
recipe can turn them on, and every zero comes with a reason.

**Ignore regions** (ReasonSeg's, ``GroundTruth.ignore_rle``) count in neither intersection nor union.

**Empty-mask rule** (shared with evaluation, :mod:`verl_grto.reward.mask_iou`): a union of 0 (empty GT
and empty prediction) scores IoU 1.0; an unparseable answer is an empty prediction (IoU 0 against a
non-empty GT) and gets no format reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verl_grto.data.masks import decode_rle
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

    def logged_parts(self) -> tuple[str, ...]:
        """The reward parts worth logging: the mask IoU and the format term always, the others only when
        weighted (an unweighted part is not computed, and a logged constant 0 would read as a measurement)."""
        weighted = {
            "box_iou": self.box_iou_weight,
            "points_in_mask": self.points_weight,
            "repeat_fraction": self.repeat_penalty,
        }
        return ("mask_iou", "format_reward", *(k for k, w in weighted.items() if w))


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


def score_tool_overlap(
    parsed: ParsedAnswer,
    intersection: int,
    union: int,
    gt: GroundTruth,
    config: MaskRewardConfig,
    gt_mask: np.ndarray | None = None,
) -> MaskRewardBreakdown:
    """Score one rollout from its parsed answer and the pixel overlap of the tool's mask with the ground
    truth (``intersection``, ``union``: :func:`~verl_grto.reward.mask_iou.count_overlap`, ignore pixels
    left out). The reward equation of docs/method.md is this function.

    Why counts and not a mask: the tool's workers score the masks where they are made and send back two
    integers per rollout (an unparseable answer reaches them with no prompt and is scored as the empty
    mask, the missing-prediction rule). ``gt_mask`` (bool HxW) is read only by the points term, so the
    driver decodes ground truths only when ``config.points_weight`` is set."""
    mask_iou = sample_iou(int(intersection), int(union))
    if not parsed.ok:
        return MaskRewardBreakdown(
            score=0.0,
            format_reward=0.0,
            mask_iou=mask_iou if union == 0 else 0.0,
            box_iou=0.0,
            points_in_mask=0.0,
            repeat_fraction=0.0,
            parse_ok=False,
            reason=parsed.reason,
        )
    if config.points_weight and gt_mask is None:
        raise ValueError("the points term (points_weight > 0) needs the ground-truth mask")
    fmt = 1.0 if parsed.has_think else 0.0
    pred_boxes = [obj.box if obj.box is not None else (0.0, 0.0, 0.0, 0.0) for obj in parsed.objects]
    box_iou = matched_mean_iou(pairwise_box_iou(pred_boxes, gt.boxes)) if config.box_iou_weight else 0.0
    points = _points_in_mask(parsed, gt_mask) if config.points_weight and gt_mask is not None else 0.0
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


def score_mask_answer(
    parsed: ParsedAnswer, pred_mask: np.ndarray | None, gt: GroundTruth, gt_mask: np.ndarray, config: MaskRewardConfig
) -> MaskRewardBreakdown:
    """:func:`score_tool_overlap` from a whole mask (None when nothing was decoded), for callers that hold
    one (evaluation-style code, tests); the ground truth's ignore region is left out."""
    ignore = decode_rle(gt.ignore_rle) if gt.ignore_rle is not None else None
    inter, union = intersection_union(pred_mask if parsed.ok else None, gt_mask, ignore)
    return score_tool_overlap(parsed, inter, union, gt, config, gt_mask)
