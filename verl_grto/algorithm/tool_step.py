"""The tool's step on a set of rollouts, written once for GRTO and BTO (docs/method.md, "Tool term").

GRTO (``trainer/grto_trainer.py``) trains the tool on the step's on-policy rollouts, BTO
(``algorithm/bto/train.py``) on a buffer of the reference policy's; both do the same three things,
and do them here:

* **group** the rollouts by image and cut the images into :class:`~verl_grto.tool.engine.ToolBatch`es
  (:func:`group_by_image`, :func:`shard_by_image`, :func:`tool_batch`): an image's rollouts stay in
  one batch, so the tool encodes the image once for all of them, and rows that show the same image
  (RefCOCO's sentences) are one group: the key is the image's, not the row's;
* **weigh** them (:func:`tool_step_weights`): the registered weighting, 0 for unparseable answers,
  and, with ``min_box_iou`` > 0, 0 for answers whose box misses the object;
* **score** the tool's masks from their overlap counts (:func:`overlap_ious`, :func:`mean_overlap_iou`): IoU
  under the empty-mask rule.

Pure functions of their inputs (no workers, no files), so both callers and the tests use them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from verl_grto.algorithm.tool_weights import prompt_points_at_object, tool_loss_weights
from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ToolPrompt
from verl_grto.reward.geometry import Box
from verl_grto.reward.mask_iou import sample_iou
from verl_grto.tool.engine import ToolBatch, ToolTarget
from verl_grto.tool.preprocess import ImageLike

T = TypeVar("T")


@dataclass(frozen=True)
class ImageGroup:
    """One image's rollouts: ``rows`` are their indices into the caller's list of rollouts, in order."""

    image_key: str
    rows: tuple[int, ...]


def group_by_image(image_keys: Sequence[str], keep: Sequence[bool] | np.ndarray | None = None) -> list[ImageGroup]:
    """Rollout ``i`` (of image ``image_keys[i]``) grouped with the other rollouts of its image, images in
    order of first appearance. ``keep[i]`` False leaves rollout i out (BTO: a weight-0 rollout adds
    nothing to a weighted mean, so it is not decoded); an image with no rollout kept has no group."""
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(image_keys):
        if keep is None or keep[i]:
            rows.setdefault(str(key), []).append(i)
    return [ImageGroup(key, tuple(r)) for key, r in rows.items()]


def tool_target(gt: GroundTruth) -> ToolTarget:
    """A row's ground truth as the tool receives it: the mask and ignore region as COCO RLE (decoded on the
    tool's workers, once per row), never decoded on the driver."""
    return ToolTarget(gt.mask_rle, gt.ignore_rle)


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
    prompt_of: Callable[[int], Sequence[ToolPrompt]],
    target_of: Callable[[int], tuple[Hashable, ToolTarget]] | None = None,
    images: Sequence[ImageLike | None] | None = None,
) -> ToolBatch:
    """The :class:`ToolBatch` of ``groups``' rollouts, in :func:`rollout_rows` order.

    ``prompt_of(i)`` is rollout i's parsed prompts; ``target_of(i)`` its dataset row's key (e.g. the
    sample id) and ground truth (:func:`tool_target`): the rollouts of one row share one target, sent
    once. ``images[j]`` is ``groups[j]``'s image (HxWx3), None (or no ``images`` at all) where the
    engine reads it itself (its cache, or its ``image_loader`` on the tool's workers). Without
    ``target_of`` the batch can be predicted but neither scored nor trained on."""
    if images is not None and len(images) != len(groups):
        raise ValueError(f"{len(images)} images for {len(groups)} image groups")
    rows = rollout_rows(groups)
    targets: list[ToolTarget] | None = None
    target_index: list[int] | None = None
    if target_of is not None:
        position: dict[Hashable, int] = {}
        targets, target_index = [], []
        for i in rows:
            key, target = target_of(i)
            if key not in position:
                position[key] = len(targets)
                targets.append(target)
            target_index.append(position[key])
    return ToolBatch(
        image_keys=[g.image_key for g in groups],
        images=list(images) if images is not None else [None] * len(groups),
        image_index=[j for j, g in enumerate(groups) for _ in g.rows],
        prompts=[prompt_of(i) for i in rows],
        targets=targets,
        target_index=target_index,
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


def overlap_ious(intersection: Sequence[int] | np.ndarray, union: Sequence[int] | np.ndarray) -> np.ndarray:
    """The IoU of each of the tool's masks from its pixel overlap with the ground truth (what the tool's
    workers send back, :class:`~verl_grto.tool.worker.ToolScores`), under the empty-mask rule
    (:mod:`verl_grto.reward.mask_iou`: a union of 0 scores 1; a rollout sent with no prompt was scored as
    the empty mask, a missing prediction). Shape ``(n,)``."""
    return np.array([sample_iou(int(i), int(u)) for i, u in zip(intersection, union, strict=True)], dtype=np.float64)


def mean_overlap_iou(
    intersection: Sequence[int] | np.ndarray, union: Sequence[int] | np.ndarray, include: Sequence[bool] | None = None
) -> float:
    """Mean of :func:`overlap_ious` (gIoU) over the rollouts with ``include`` True (None: all); NaN when none."""
    ious = overlap_ious(intersection, union)
    if include is not None and len(include) != len(ious):
        raise ValueError(f"include has {len(include)} entries for {len(ious)} rollouts")
    counted = ious if include is None else ious[np.asarray(include, dtype=bool)]
    return float(counted.mean()) if len(counted) else float("nan")


#: How a trajectory's tool weight is shared by its calls (``grto_agent.call_weighting``).
CALL_WEIGHTINGS = ("split", "each")


def tool_call_weights(
    weighting: str,
    row_trajectory: Sequence[int],
    row_prompts: Sequence[Sequence[ToolPrompt]],
    gt_boxes: Sequence[Sequence[Box]],
    *,
    call_weighting: str = "split",
    min_box_iou: float = 0.0,
    importance_clip: float = 2.0,
    **inputs: Any,
) -> np.ndarray:
    """w of every tool row of a multi-turn step, shape ``(m,)`` (docs/method.md, "Multi-turn").

    A multi-turn trajectory i makes several masks: one per valid call, and the answer's when its final
    mask comes from the answer. Each is a row of the tool's update (``row_trajectory[r]`` = i; a row with
    no prompt, ``row_prompts[r]`` empty, is a trajectory without any mask, weighted 0). The trajectory's
    weight w_i is the registered ``weighting`` over the ``n = len(gt_boxes)`` trajectories with their
    inputs (``advantages`` ``(n,)`` and ``group_ids``: the trajectory's GRPO advantage), a trajectory
    without a mask counting as unparseable; its rows share it:

        w_{i,c} = w_i / m_i   (``split``: every trajectory weighs the same, however many calls it made)
        w_{i,c} = w_i         (``each``: every call weighs the same)

    with m_i the trajectory's rows with a prompt; times 1[the row's best box has IoU >= ``min_box_iou``
    with one of the trajectory's ``gt_boxes``], as single-turn GRTO's rollouts
    (:func:`tool_step_weights`). Relative weights: the tool's loss is their weighted mean."""
    if call_weighting not in CALL_WEIGHTINGS:
        raise ValueError(f"grto_agent.call_weighting must be one of {CALL_WEIGHTINGS}, got {call_weighting!r}")
    rows = np.asarray(row_trajectory, dtype=np.int64)
    if len(rows) != len(row_prompts):
        raise ValueError(f"{len(rows)} row trajectories for {len(row_prompts)} rows")
    n = len(gt_boxes)
    if len(rows) and not (rows.min() >= 0 and rows.max() < n):
        raise ValueError(f"row trajectories outside the {n} trajectories")
    has_prompt = np.array([len(p) > 0 for p in row_prompts], dtype=bool)
    per_trajectory = np.bincount(rows[has_prompt], minlength=n)
    w_traj = tool_loss_weights(weighting, n=n, parse_ok=per_trajectory > 0, importance_clip=importance_clip, **inputs)
    weights = np.where(has_prompt, w_traj[rows], 0.0) if len(rows) else np.zeros(0)
    if call_weighting == "split" and len(rows):
        weights = weights / np.maximum(per_trajectory[rows], 1)
    boxes = [[o.box for o in p if o.box is not None] for p in row_prompts]
    return weights * prompt_points_at_object(boxes, [gt_boxes[i] for i in rows], min_box_iou)
