"""The GRTO surrogate (docs/method.md, eq. "surrogate").

    J(theta, phi) = L_GRPO(theta; A(r(x, o; sg(T_phi)))) + lambda * sum_i sg(w_i) l_i(phi) / sum_i sg(w_i)

Rewards use the tool under stop-gradient and the weights are constants, so
d/d theta J = d/d theta L_GRPO (GRTO's policy update *is* GRPO's) and
d/d phi J = lambda * d/d phi of the weighted tool loss (the tool learns only from its own loss).
In the trainer the two terms go to two optimisers (the actor's and the tool's; the tool's term,
lambda applied after the weighted mean, is `verl_grto.tool.engine.ToolEngine.objective`); this
function is the same objective written once, so tests can check both gradients with autograd.
"""

from __future__ import annotations

import torch

from verl_grto.tool.losses import weighted_mean


def tool_term(per_rollout_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i sg(w_i) l_i / sum_i sg(w_i) (0 when every weight is 0).

    ``per_rollout_losses`` and ``weights`` are ``(n,)``, one entry per rollout; returns a scalar ``()``.
    """
    return weighted_mean(per_rollout_losses, weights.detach())


def grto_surrogate(
    policy_loss: torch.Tensor, per_rollout_tool_losses: torch.Tensor, weights: torch.Tensor, tool_loss_coef: float
) -> torch.Tensor:
    """L_GRPO + lambda * tool term; with lambda = 0 it is exactly the GRPO loss.

    ``policy_loss`` is a scalar ``()``; ``per_rollout_tool_losses`` and ``weights`` are ``(n,)``;
    ``tool_loss_coef`` is lambda. Returns a scalar ``()``.
    """
    if tool_loss_coef == 0:
        return policy_loss
    return policy_loss + tool_loss_coef * tool_term(per_rollout_tool_losses, weights)
