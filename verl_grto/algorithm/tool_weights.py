"""Per-rollout weights w_i of the tool loss (docs/method.md, "Tool term").

The tool is trained on the policy's own rollouts: L_tool(phi) = sum_i w_i l_i(phi) / sum_i w_i,
with l_i the segmentation loss of rollout i's mask. The weights are constants (stop-gradient):
they choose *which* rollouts the tool learns from, never how the policy is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from verl_grto.reward.geometry import Box, box_iou

Weighting = Literal["uniform", "importance", "advantage"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "importance", "advantage")


def uniform_weights(n: int) -> np.ndarray:
    """w_i = 1: the on-policy (GRTO) estimate of E_{o~pi_theta}[l(phi; o)] is the plain mean."""
    return np.ones(n, dtype=np.float64)


def importance_weights(
    target_logprobs: Sequence[np.ndarray], behaviour_logprobs: Sequence[np.ndarray], clip: float = 2.0
) -> np.ndarray:
    """w_i = min(exp(mean_t[log pi(o_it) - log mu(o_it)]), clip) for rollouts drawn from mu, trained toward pi.

    The per-token *mean* log-ratio (a geometric mean of token ratios) keeps long answers from
    exploding the weight; the clip bounds the variance (as in PPO). Used when a buffer of rollouts
    from a reference policy mu is reused for a newer policy pi (BTO).
    """
    if len(target_logprobs) != len(behaviour_logprobs):
        raise ValueError(f"{len(target_logprobs)} target vs {len(behaviour_logprobs)} behaviour log-prob rows")
    out = np.empty(len(target_logprobs), dtype=np.float64)
    for i, (t, b) in enumerate(zip(target_logprobs, behaviour_logprobs, strict=True)):
        t, b = np.asarray(t, np.float64), np.asarray(b, np.float64)
        if t.shape != b.shape:
            raise ValueError(f"rollout {i}: target log-probs {t.shape} vs behaviour {b.shape}")
        out[i] = 1.0 if t.size == 0 else min(float(np.exp(np.mean(t - b))), clip)
    return out


def advantage_weights(advantages: np.ndarray, group_ids: Sequence[object]) -> np.ndarray:
    """w_i = n_g * max(A_i, 0) / sum_{j in g} max(A_j, 0): the tool follows the better-than-group rollouts.

    Normalised within each group so every group carries the same total weight n_g; a group with no
    positive advantage (all rewards equal) falls back to uniform, so the tool still learns from it.
    """
    adv = np.asarray(advantages, dtype=np.float64)
    out = np.ones_like(adv)
    groups: dict[object, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        pos = np.maximum(adv[idx], 0.0)
        if pos.sum() > 0:
            out[idx] = len(idx) * pos / pos.sum()
    return out


def tool_loss_weights(
    weighting: str,
    *,
    n: int,
    advantages: np.ndarray | None = None,
    group_ids: Sequence[object] | None = None,
    target_logprobs: Sequence[np.ndarray] | None = None,
    behaviour_logprobs: Sequence[np.ndarray] | None = None,
    importance_clip: float = 2.0,
    parse_ok: Sequence[bool] | None = None,
) -> np.ndarray:
    """The weights for one batch; unparseable rollouts carry no tool loss (weight 0)."""
    if weighting == "uniform":
        w = uniform_weights(n)
    elif weighting == "advantage":
        if advantages is None or group_ids is None:
            raise ValueError("advantage weighting needs advantages and group ids")
        w = advantage_weights(advantages, group_ids)
    elif weighting == "importance":
        if target_logprobs is None or behaviour_logprobs is None:
            raise ValueError("importance weighting needs target and behaviour log-probs")
        w = importance_weights(target_logprobs, behaviour_logprobs, importance_clip)
    else:
        raise ValueError(f"unknown tool-loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if parse_ok is not None:
        w = np.where(np.asarray(parse_ok, dtype=bool), w, 0.0)
    return w


def prompt_points_at_object(
    prompt_boxes: Sequence[Sequence[Box]], gt_boxes: Sequence[Sequence[Box]], min_box_iou: float
) -> np.ndarray:
    """1 where rollout i's best box overlaps one of its ground-truth boxes ``gt_boxes[i]`` with IoU >=
    ``min_box_iou``, else 0.

    Why: a mask loss on a prompt that misses the object asks the tool to segment something its
    prompt does not point at; from a policy that does not localise yet, most rollouts are such, and
    training on them teaches the tool to predict background (measured: benchmarks/bto_weighting.py).
    ``min_box_iou`` 0 keeps every rollout. Rollouts without a box count as missing it (when > 0).
    """
    if len(prompt_boxes) != len(gt_boxes):
        raise ValueError(f"{len(prompt_boxes)} rollouts' boxes but {len(gt_boxes)} ground truths")
    out = np.ones(len(prompt_boxes))
    if min_box_iou <= 0:
        return out
    for i, (boxes, truths) in enumerate(zip(prompt_boxes, gt_boxes, strict=True)):
        best = max((box_iou(b, g) for b in boxes for g in truths), default=0.0)
        out[i] = 1.0 if best >= min_box_iou else 0.0
    return out
