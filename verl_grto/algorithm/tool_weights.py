"""Per-rollout weights w_i of the tool loss (docs/method.md, "Tool term").

The tool is trained on the policy's own rollouts: L_tool(phi) = sum_i w_i l_i(phi) / sum_i w_i,
with l_i the segmentation loss of rollout i's mask. The weights are constants (stop-gradient):
they choose *which* rollouts the tool learns from, never how the policy is scored.

The weightings a recipe can name (``grto.weighting``, BTO's ``weighting``) are a registry, as verl's
advantage estimators are (``@register_adv_est``): :func:`register_weighting` adds one under its
name, with the optional inputs it reads, so a new weighting is one decorated function, and every
caller (:func:`tool_loss_weights`, the config check, BTO) learns of it from the registry alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from verl_grto.reward.geometry import Box, box_iou

#: What a weighting may read besides ``n`` (the number of rollouts): the keyword inputs of
#: :func:`tool_loss_weights` that a caller may leave as None.
OPTIONAL_INPUTS = ("advantages", "group_ids", "target_logprobs", "behaviour_logprobs")

#: A registered weighting: called with keywords ``n``, ``importance_clip`` and every name of
#: :data:`OPTIONAL_INPUTS` (those it does not need may be None); returns w, shape ``(n,)``.
WeightingFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Weighting:
    """One registered weighting: its name, its function, and the optional inputs it cannot do without."""

    name: str
    fn: WeightingFn
    needs: tuple[str, ...] = ()


_WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str, needs: Sequence[str] = ()) -> Callable[[WeightingFn], WeightingFn]:
    """Decorator: register ``fn`` as the tool-loss weighting ``name`` (``needs``: names of
    :data:`OPTIONAL_INPUTS` it reads, checked before it is called). A name is registered once."""
    unknown = sorted(set(needs) - set(OPTIONAL_INPUTS))
    if unknown:
        raise ValueError(f"weighting {name!r} needs unknown inputs {unknown}; known: {', '.join(OPTIONAL_INPUTS)}")

    def decorator(fn: WeightingFn) -> WeightingFn:
        if name in _WEIGHTINGS and _WEIGHTINGS[name].fn is not fn:
            raise ValueError(f"tool-loss weighting {name!r} is already registered ({_WEIGHTINGS[name].fn})")
        _WEIGHTINGS[name] = Weighting(name, fn, tuple(needs))
        return fn

    return decorator


def get_weighting(name: str) -> Weighting:
    """The registered weighting ``name``; a ValueError listing the known names for any other."""
    try:
        return _WEIGHTINGS[name]
    except KeyError:
        raise ValueError(f"unknown tool-loss weighting {name!r}; known: {', '.join(_WEIGHTINGS)}") from None


def weighting_names() -> tuple[str, ...]:
    """The registered weightings' names, in registration order."""
    return tuple(_WEIGHTINGS)


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


# ---- the registry's entries: adapters from the common keywords to each weighting's own arguments


@register_weighting("uniform")
def _uniform(*, n: int, **_: Any) -> np.ndarray:
    return uniform_weights(n)


@register_weighting("importance", needs=("target_logprobs", "behaviour_logprobs"))
def _importance(
    *,
    target_logprobs: Sequence[np.ndarray],
    behaviour_logprobs: Sequence[np.ndarray],
    importance_clip: float,
    **_: Any,
) -> np.ndarray:
    return importance_weights(target_logprobs, behaviour_logprobs, importance_clip)


@register_weighting("advantage", needs=("advantages", "group_ids"))
def _advantage(*, advantages: np.ndarray, group_ids: Sequence[object], **_: Any) -> np.ndarray:
    return advantage_weights(advantages, group_ids)


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
    """The weights ``(n,)`` for one batch under the registered ``weighting``; unparseable rollouts
    carry no tool loss (weight 0). ``advantages``: ``(n,)``, one per rollout (its sequence advantage)."""
    spec = get_weighting(weighting)
    optional = {
        "advantages": advantages,
        "group_ids": group_ids,
        "target_logprobs": target_logprobs,
        "behaviour_logprobs": behaviour_logprobs,
    }
    missing = [k for k in spec.needs if optional[k] is None]
    if missing:
        raise ValueError(f"{weighting} weighting needs {' and '.join(missing)}")
    w = spec.fn(n=n, importance_clip=importance_clip, **optional)
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
