"""The tool's step on a set of rollouts, written once for GRTO and BTO (docs/method.md, "Tool term").

GRTO (``trainer/grto_trainer.py``) trains the tool on the step's on-policy rollouts, BTO
(``algorithm/bto/train.py``) on a buffer of the reference policy's; both do the same three things,
and do them here:

* **group** the rollouts by image and cut the images into :class:`~verl_grto.tool.engine.ToolBatch`es
  (:func:`group_by_image`, :func:`shard_by_image`, :func:`tool_batch`): an image's rollouts stay in
  one batch, so the tool encodes the image once for all of them;
* **weigh** them (:func:`tool_step_weights`): the registered weighting, 0 for unparseable answers,
  and, with ``min_box_iou`` > 0, 0 for answers whose box misses the object;
* **score** the tool's masks (:func:`mask_ious`, :func:`mean_mask_iou`): IoU under the empty-mask rule.

Pure functions of their inputs (no workers, no files), so both callers and the tests use them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from verl_grto.algorithm.tool_weights import prompt_points_at_object, tool_loss_weights
from verl_grto.reward.answer import ToolPrompt
from verl_grto.reward.geometry import Box
from verl_grto.reward.mask_iou import intersection_union, sample_iou
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.preprocess import ImageLike

T = TypeVar("T")


@dataclass(frozen=True)
class ImageGroup:
    """One image's rollouts: ``rows`` are their indices into the caller's list of rollouts, in order."""

    sample_id: str
    rows: tuple[int, ...]


def group_by_image(sample_ids: Sequence[str], keep: Sequence[bool] | np.ndarray | None = None) -> list[ImageGroup]:
    """Rollout ``i`` (of image ``sample_ids[i]``) grouped with the other rollouts of its image, images in
    order of first appearance. ``keep[i]`` False leaves rollout i out (BTO: a weight-0 rollout adds
    nothing to a weighted mean, so it is not decoded); an image with no rollout kept has no group."""
    rows: dict[str, list[int]] = {}
    for i, sid in enumerate(sample_ids):
        if keep is None or keep[i]:
            rows.setdefault(str(sid), []).append(i)
    return [ImageGroup(sid, tuple(r)) for sid, r in rows.items()]


def shard_by_image(groups: Sequence[ImageGroup], world: int, equal: bool = False) -> list[list[ImageGroup]]:
    """Image k to data-parallel rank k % ``world``: one list of groups per rank.

    ``equal`` first drops the last ``len(groups) % world`` images, so that every rank holds the same
    number (BTO: every rank then runs the same number of updates, which the engine's all-reduce needs;
    GRTO's one update per step needs no such cut: a rank may even get no image)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if equal:
        groups = groups[: len(groups) // world * world]
    return [list(groups[rank::world]) for rank in range(world)]


def rollout_rows(groups: Sequence[ImageGroup]) -> list[int]:
    """The rollout indices of ``groups``, in the order :func:`tool_batch` lays the rollouts out."""
    return [i for g in groups for i in g.rows]


def tool_batch(
    groups: Sequence[ImageGroup],
    images: Sequence[ImageLike | None],
    prompt_of: Callable[[int], Sequence[ToolPrompt]],
    gt_mask_of: Callable[[ImageGroup], np.ndarray] | None = None,
) -> ToolBatch:
    """The :class:`ToolBatch` of ``groups``' rollouts, in :func:`rollout_rows` order.

    ``images[j]`` is ``groups[j]``'s image (HxWx3, or None when the engine's cache already holds its
    features); ``prompt_of(i)`` rollout i's parsed prompts; ``gt_mask_of(group)`` the image's
    ground-truth mask (bool HxW), shared by its rollouts (they answer one dataset row). Without
    ``gt_mask_of`` the batch can be predicted but not trained on."""
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images for {len(groups)} image groups")
    image_index = [j for j, g in enumerate(groups) for _ in g.rows]
    gt_masks = None
    if gt_mask_of is not None:
        gt_masks = []
        for g in groups:
            mask = gt_mask_of(g)
            gt_masks += [mask] * len(g.rows)
    return ToolBatch(
        sample_ids=[g.sample_id for g in groups],
        images=list(images),
        image_index=image_index,
        prompts=[prompt_of(i) for i in rollout_rows(groups)],
        gt_masks=gt_masks,
    )


def in_rollout_order(n: int, rows: Sequence[Sequence[int]], values: Sequence[Sequence[T]]) -> list[T | None]:
    """Per-batch outputs (``values[b][k]`` belongs to rollout ``rows[b][k]``) as one list of ``n`` in rollout
    order; rollouts in no batch get None."""
    out: list[T | None] = [None] * n
    for batch_rows, batch_values in zip(rows, values, strict=True):
        for i, v in zip(batch_rows, batch_values, strict=True):
            out[i] = v
    return out


def tool_step_weights(
    weighting: str,
    prompts: Sequence[Sequence[ToolPrompt]],
    gt_boxes: Sequence[Sequence[Box]],
    parse_ok: Sequence[bool],
    *,
    min_box_iou: float = 0.0,
    importance_clip: float = 2.0,
    **inputs: Any,
) -> np.ndarray:
    """w_i of every rollout, shape ``(n,)``: the registered ``weighting`` (its inputs, e.g. ``advantages``
    ``(n,)`` and ``group_ids``, or ``target_logprobs`` / ``behaviour_logprobs``, as keywords), 0 where
    ``parse_ok`` is False, times 1[the rollout's best box has IoU >= ``min_box_iou`` with one of its
    ``gt_boxes``] (:func:`~verl_grto.algorithm.tool_weights.prompt_points_at_object`; 0 keeps all).

    Relative weights: the tool's loss is their weighted mean, and lambda is applied after it."""
    weights = tool_loss_weights(weighting, n=len(prompts), parse_ok=parse_ok, importance_clip=importance_clip, **inputs)
    boxes = [[o.box for o in p if o.box is not None] for p in prompts]
    return weights * prompt_points_at_object(boxes, gt_boxes, min_box_iou)


def mask_ious(masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]) -> list[float]:
    """The IoU of each of the tool's masks (bool HxW) against its ground truth, under the empty-mask rule
    (:mod:`verl_grto.reward.mask_iou`: a None mask is a missing prediction, a union of 0 scores 1)."""
    return [sample_iou(*intersection_union(m, gt)) for m, gt in zip(masks, gt_masks, strict=True)]


def mean_mask_iou(
    masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray], include: Sequence[bool] | None = None
) -> float:
    """Mean of :func:`mask_ious` (gIoU) over the rollouts with ``include`` True (None: all); NaN when none."""
    if include is not None and len(include) != len(masks):
        raise ValueError(f"include has {len(include)} entries for {len(masks)} masks")
    ious = mask_ious(masks, gt_masks)
    counted = [v for k, v in enumerate(ious) if include is None or include[k]]
    return float(np.mean(counted)) if counted else float("nan")
