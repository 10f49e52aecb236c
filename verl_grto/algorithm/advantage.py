"""The policy side of GRTO: GRPO's group-relative advantage (docs/method.md, eq. "advantage").

GRTO changes *what* is rewarded (the tool's mask, computed with sg(T_phi)) and adds a tool term
with its own parameters; the policy advantage itself is exactly GRPO's. Registering it under its
own name makes the choice explicit in recipes and lets tests pin the equality with verl's ``grpo``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, register_adv_est


@register_adv_est("grto")
def compute_grto_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean_g r) / (std_g r + eps) per group g of rollouts of one prompt; same call as ``grpo``.

    The outcome reward r_i of rollout i is the sum of its token-level rewards (the mask reward sits on
    the last response token); A_i is broadcast over the rollout's response tokens. A group of one
    rollout keeps its raw reward (verl's ``grpo`` uses mean 0, std 1 there).

    Args:
        token_level_rewards: ``(bs, response_length)``, the rewards per response token.
        response_mask: ``(bs, response_length)``, 1 on response tokens, 0 on padding.
        index: ``(bs,)``, the group id of each rollout (verl's ``uid``: one per prompt).
        epsilon: added to the group's std so a group of equal rewards gets advantage 0, not NaN.
        norm_adv_by_std_in_grpo: divide by the group's std (GRPO) or not (Dr.GRPO).
        config: verl's ``AlgoConfig``, passed through to ``grpo`` (which does not read it).
        **kwargs: whatever else verl's trainer passes to an estimator (ignored).

    Returns:
        ``(advantages, returns)``, both ``(bs, response_length)`` and equal (outcome supervision:
        no value function), zero on padding.
    """
    return compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        config=config,
    )
