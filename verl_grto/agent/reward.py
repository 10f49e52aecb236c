"""A verl reward function for multi-turn pipelines that use the segmentation tool without GRTO.

``reward.custom_reward_function: {path: pkg://verl_grto.agent.reward, name: compute_score}``. verl's
reward workers pass a trajectory's ``extra_fields`` in ``extra_info``, so the calls the tool recorded
(:data:`~verl_grto.agent.calls.CALLS_KEY`, each with the mask the policy was shown, at the original
size) are scored here without running the tool again::

    score = format_weight * [the trajectory ends with <think>...</think><answer>...</answer>]
            + IoU(mask of the last valid call, ground truth) - sum of the calls' penalties

A trajectory without a valid call has no mask: IoU 0 (the empty-mask rule of
:mod:`verl_grto.reward.mask_iou`). The grto_agent trainer does not use this function: it scores the
final mask on the tool's workers, with the final mask chosen by ``grto_agent.final_mask``.
"""

from __future__ import annotations

from typing import Any

from verl_grto.agent.calls import calls_of, final_answer_text, final_mask
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.reward.box_reward import FORMAT_REWARD
from verl_grto.reward.mask_iou import intersection_union, sample_iou


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """verl's custom reward signature; ``format_weight`` may be set in ``reward_kwargs``."""
    gt = GroundTruth.from_row(ground_truth, extra_info)
    calls = calls_of(extra_info)
    final = final_mask(calls, final_answer_text(solution_str), gt.answer_frame, gt.image_size, "last_call")
    mask = None
    if final.source == "call":
        mask = decode_rle(next(c for c in calls if c.index == final.call_index).mask_rle)  # type: ignore[arg-type]
    ignore = decode_rle(gt.ignore_rle) if gt.ignore_rle is not None else None
    inter, union = intersection_union(mask, decode_rle(gt.mask_rle), ignore)
    iou = sample_iou(inter, union)
    fmt = float(kwargs.get("format_weight", FORMAT_REWARD)) if final.well_formed else 0.0
    penalty = sum(c.penalty for c in calls)
    return {
        "score": fmt + iou - penalty,
        "mask_iou": iou,
        "format_reward": fmt,
        "penalty": penalty,
        "calls": len(calls),
        "valid_calls": sum(c.ok for c in calls),
    }
