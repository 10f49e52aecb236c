"""GRTO's algorithm: the policy side equals verl's GRPO, the tool side is the weighted tool loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

import verl_grto.algorithm.advantage  # noqa: F401  (registers "grto")
from verl_grto.algorithm.objective import grto_surrogate, tool_term
from verl_grto.algorithm.tool_weights import (
    advantage_weights,
    get_weighting,
    importance_weights,
    register_weighting,
    tool_loss_weights,
    weighting_names,
)
from verl_grto.tool.losses import LossConfig, segmentation_losses


def _rollouts(seed: int = 0, groups: int = 3, n: int = 4, length: int = 5):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(groups * n, generator=g)
    mask = torch.ones(groups * n, length)
    mask[:, -1] = (torch.rand(groups * n, generator=g) > 0.5).float()
    token_rewards = torch.zeros(groups * n, length)
    last = mask.sum(-1).long() - 1
    token_rewards[torch.arange(groups * n), last] = rewards
    index = np.array([f"p{i // n}" for i in range(groups * n)], dtype=object)
    return token_rewards, mask, index


@pytest.mark.parametrize("norm", [True, False])
def test_grto_advantage_equals_grpo_bit_for_bit(norm):
    token_rewards, mask, index = _rollouts()
    grpo = get_adv_estimator_fn("grpo")(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    grto = get_adv_estimator_fn("grto")(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    for a, b in zip(grpo, grto, strict=True):
        assert torch.equal(a, b)


def test_all_equal_rewards_give_zero_advantage_but_tool_still_trains():
    token_rewards, mask, index = _rollouts()
    token_rewards[:4] = 0.0
    token_rewards[:4, -1] = 0.7 * mask[:4, -1]
    token_rewards[:4, -2] = 0.7 * (1 - mask[:4, -1])  # same score at each rollout's last token
    adv, _ = get_adv_estimator_fn("grto")(token_rewards, mask, index)
    assert torch.all(adv[:4] == 0)
    seq_adv = adv[:, 0].numpy()
    w = tool_loss_weights("advantage", n=12, advantages=seq_adv, group_ids=list(index))
    assert np.allclose(w[:4], 1.0)  # no positive advantage in the group: uniform, not zero
    assert tool_loss_weights("uniform", n=12).sum() == 12


def test_advantage_weights_follow_better_than_group_rollouts():
    w = advantage_weights(np.array([1.0, -1.0, 3.0, -3.0]), ["a", "a", "a", "a"])
    assert w.tolist() == pytest.approx([1.0, 0.0, 3.0, 0.0])
    assert w.sum() == pytest.approx(4)


def test_importance_weights_are_clipped_geometric_ratios():
    target = [np.log([0.5, 0.5]), np.log([0.9]), np.log([0.1, 0.1])]
    behaviour = [np.log([0.5, 0.5]), np.log([0.1]), np.log([0.2, 0.2])]
    w = importance_weights(target, behaviour, clip=2.0)
    assert w.tolist() == pytest.approx([1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="behaviour"):
        importance_weights([np.zeros(2)], [np.zeros(3)])


def test_unparseable_rollouts_carry_no_tool_loss():
    w = tool_loss_weights("uniform", n=4, parse_ok=[True, False, True, False])
    assert w.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown tool-loss weighting 'greedy'; known: uniform, importance, advantage"):
        tool_loss_weights("greedy", n=2)


def test_weightings_are_a_registry_that_checks_what_each_needs(monkeypatch):
    assert weighting_names() == ("uniform", "importance", "advantage")  # the order error messages list them in
    assert get_weighting("advantage").needs == ("advantages", "group_ids")
    with pytest.raises(ValueError, match="advantage weighting needs group_ids"):
        tool_loss_weights("advantage", n=2, advantages=np.zeros(2))
    with pytest.raises(ValueError, match="importance weighting needs target_logprobs and behaviour_logprobs"):
        tool_loss_weights("importance", n=2)

    # a new weighting is one decorated function; the registry is restored afterwards
    from verl_grto.algorithm import tool_weights

    monkeypatch.setattr(tool_weights, "_WEIGHTINGS", dict(tool_weights._WEIGHTINGS))

    @register_weighting("first_half")
    def first_half(*, n, **_):
        return (np.arange(n) < n / 2).astype(np.float64)

    assert tool_loss_weights("first_half", n=4, parse_ok=[False, True, True, True]).tolist() == [0.0, 1.0, 0.0, 0.0]
    register_weighting("first_half")(first_half)  # registering the same function again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_weighting("first_half")(lambda **_: np.zeros(0))
    with pytest.raises(ValueError, match="unknown inputs"):
        register_weighting("rewards", needs=("rewards",))


def test_surrogate_gradients_split_into_grpo_and_weighted_tool_loss():
    """Autograd on a toy: a softmax policy over 3 answers, a 1-parameter-per-pixel 'tool'."""
    torch.manual_seed(0)
    n, length, hw = 8, 4, (6, 6)
    theta = torch.randn(3, requires_grad=True)  # policy logits over 3 candidate answers
    phi = torch.randn(*hw, requires_grad=True)  # tool: one mask logit per pixel, shared by rollouts
    answers = torch.randint(0, 3, (n,))
    gt = torch.zeros(hw, dtype=torch.bool)
    gt[1:4, 2:5] = True

    # rewards from the tool under stop-gradient (sg(T_phi)), scaled by the chosen answer
    with torch.no_grad():
        mask_iou = ((phi > 0) & gt).sum() / ((phi > 0) | gt).sum().clamp(min=1)
    rewards = (answers.float() + 1) / 3 * (0.5 + mask_iou)
    index = np.array([f"g{i // 4}" for i in range(n)], dtype=object)
    response_mask = torch.ones(n, length)
    token_rewards = torch.zeros(n, length)
    token_rewards[:, -1] = rewards
    adv, _ = get_adv_estimator_fn("grto")(token_rewards, response_mask, index)

    logp = torch.log_softmax(theta, -1)[answers][:, None].expand(n, length)
    old_logp = logp.detach()
    policy_loss_fn = get_policy_loss_fn("vanilla")

    from verl.workers.config import ActorConfig

    actor_cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1)
    pg_loss, _ = policy_loss_fn(old_logp, logp, adv, response_mask, "token-mean", actor_cfg)

    logits = phi[None].expand(n, *hw)
    per_rollout = segmentation_losses(logits, [gt] * n, None, LossConfig(resolution="low_res")).total
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 0.0, 3.0])
    lam = 0.7

    total = grto_surrogate(pg_loss, per_rollout, weights, lam)
    g_theta, g_phi = torch.autograd.grad(total, [theta, phi], retain_graph=True)
    grpo_theta = torch.autograd.grad(pg_loss, theta, retain_graph=True)[0]
    tool_phi = torch.autograd.grad(lam * tool_term(per_rollout, weights), phi, retain_graph=True)[0]
    assert torch.allclose(g_theta, grpo_theta, atol=1e-7)
    assert torch.allclose(g_phi, tool_phi, atol=1e-7)
    assert g_phi.abs().sum() > 0 and g_theta.abs().sum() > 0
    # lambda = 0 is GRPO exactly, and the policy loss never reaches phi
    assert grto_surrogate(pg_loss, per_rollout, weights, 0.0) is pg_loss
    assert torch.autograd.grad(pg_loss, phi, allow_unused=True)[0] is None


def test_prompts_that_miss_the_object_can_be_left_out_of_the_tool_loss():
    from verl_grto.algorithm.tool_weights import prompt_points_at_object

    gt = [(10.0, 10.0, 50.0, 50.0)]
    boxes = [[(10.0, 10.0, 50.0, 50.0)], [(60.0, 60.0, 90.0, 90.0)], [], [(12.0, 12.0, 40.0, 40.0), (0, 0, 5, 5)]]
    assert prompt_points_at_object(boxes, [gt] * 4, 0.3).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert prompt_points_at_object(boxes, [gt] * 4, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]  # off: everything counts
    # each rollout is matched against its own ground truth: the second's box hits its own object
    assert prompt_points_at_object(boxes[:2], [gt, [(60.0, 60.0, 90.0, 90.0)]], 0.3).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 rollouts' boxes but 1 ground truths"):
        prompt_points_at_object(boxes[:2], [gt], 0.3)
