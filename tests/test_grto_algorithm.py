"""GRTO's algorithm: the policy side is GRPO on the tool's mask rewards, the tool side the weighted tool loss.

The policy side is checked against GRPO written out by hand (not against verl's ``grpo`` estimator,
which ``algorithm/advantage.py`` calls), and on what the actor optimises in training: verl's policy
loss with the main recipe's settings. The tool side's objective, ``ToolEngine.objective``, is
checked in tests/test_tool_loss_scale.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

import verl_grto.algorithm.advantage  # noqa: F401  (registers "grto")
from verl_grto.algorithm.tool_weights import (
    advantage_weights,
    get_weighting,
    importance_weights,
    register_weighting,
    tool_loss_weights,
    weighting_names,
)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


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


def _grpo_by_hand(token_rewards: torch.Tensor, index: np.ndarray, mask: torch.Tensor, norm: bool, eps: float = 1e-6):
    """GRPO's advantage written out from its definition (docs/method.md, eq. "advantage"), in float64
    numpy, sharing no code with verl's estimator: r_i = the rollout's summed token rewards; within
    each group A_i = (r_i - mean) / (sample std + eps), or r_i - mean without the std; a group of one
    keeps r_i / (1 + eps); A_i on every response token. Returns ``(bs, response_length)``."""
    r = token_rewards.double().numpy().sum(-1)
    adv = np.empty_like(r)
    for g in dict.fromkeys(index):
        members = index == g
        if members.sum() == 1:
            adv[members] = r[members] / (1.0 + eps)
            continue
        mean, std = r[members].mean(), r[members].std(ddof=1)
        adv[members] = (r[members] - mean) / (std + eps) if norm else r[members] - mean
    return adv[:, None] * mask.double().numpy()


def test_grto_advantage_on_a_hand_worked_group():
    """One group of four, mask IoU rewards 1, 0, 0, 0 on the last token: mean 0.25, sample std 0.5."""
    token_rewards = torch.zeros(4, 3)
    token_rewards[0, -1] = 1.0
    adv, returns = get_adv_estimator_fn("grto")(token_rewards, torch.ones(4, 3), np.array(["p"] * 4, dtype=object))
    assert adv[:, 0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert torch.equal(adv, returns) and torch.all(adv == adv[:, :1])  # one value per rollout, on every token


@pytest.mark.parametrize("norm", [True, False])
def test_grto_advantage_is_the_group_normalised_reward_computed_independently(norm):
    token_rewards, mask, index = _rollouts(groups=4)
    index = np.array([*index[:13], "lone", "p3", "p3"], dtype=object)  # groups of 4, 4, 4, 3 and 1
    token_rewards[4:8] = token_rewards[4:8].sum(-1, keepdim=True).mean() * (token_rewards[4:8] != 0)  # equal rewards
    adv, _ = get_adv_estimator_fn("grto")(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    expected = _grpo_by_hand(token_rewards, index, mask, norm)
    assert np.allclose(adv.double().numpy(), expected, atol=1e-5)
    assert np.allclose(expected[4:8], 0.0)  # a group of equal rewards: no signal for the policy
    assert not np.allclose(expected, 0.0)


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


def _main_job_actor_config():
    """The actor config verl builds from the main job's recipe (its policy-loss mode and aggregation)."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        cfg = compose(config_name="bgrto_tiny_cpu")
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_the_policy_step_training_takes_is_grpos_on_the_mask_rewards():
    """What the actor optimises in the main job: verl's policy loss (the recipe's mode and aggregation)
    on the ``grto`` advantages of the tool's mask rewards. On policy (ratio 1, nothing clipped) its
    gradient must be GRPO's, written out by hand: -sum_i A_i sum_t d log pi(o_i,t) / #tokens with A_i
    the group-normalised reward of :func:`_grpo_by_hand`. The rewards come from the tool under no-grad
    (sg(T_phi)), so the policy's loss gives the tool no gradient.

    A toy policy: independent softmaxes over 5 tokens at each of 4 positions (logits theta); a toy tool:
    one mask logit per pixel (phi); the reward is the tool's mask IoU when the rollout's first token is
    even, half of it otherwise, so rewards differ within groups.
    """
    cfg, actor_cfg = _main_job_actor_config()
    torch.manual_seed(0)
    n, length, vocab = 8, 4, 5
    theta = torch.randn(length, vocab, requires_grad=True)
    phi = torch.randn(6, 6, requires_grad=True)
    gt = torch.zeros(6, 6, dtype=torch.bool)
    gt[1:4, 2:5] = True
    tokens = torch.randint(0, vocab, (n, length))
    response_mask = torch.ones(n, length)
    response_mask[1, -1] = response_mask[6, -2:] = 0  # ragged responses
    with torch.no_grad():  # sg(T_phi)
        mask_iou = ((phi > 0) & gt).sum() / ((phi > 0) | gt).sum().clamp(min=1)
    rewards = torch.where(tokens[:, 0] % 2 == 0, mask_iou, mask_iou / 2) + 0.1 * torch.arange(n) / n
    index = np.array([f"g{i // 4}" for i in range(n)], dtype=object)
    last = response_mask.sum(-1).long() - 1
    token_rewards = torch.zeros(n, length)
    token_rewards[torch.arange(n), last] = rewards  # where the trainer puts the mask reward

    adv, _ = get_adv_estimator_fn(cfg.algorithm.adv_estimator)(token_rewards, response_mask, index)
    logp = torch.log_softmax(theta, -1)[torch.arange(length), tokens]  # (n, length)
    loss_fn = get_policy_loss_fn(actor_cfg.policy_loss.loss_mode)
    loss, _ = loss_fn(logp.detach(), logp, adv, response_mask, actor_cfg.loss_agg_mode, actor_cfg)
    (g_theta,) = torch.autograd.grad(loss, theta, retain_graph=True)

    a_hand = torch.from_numpy(_grpo_by_hand(token_rewards, index, response_mask, norm=True)).float()
    by_hand = -(a_hand * logp * response_mask).sum() / response_mask.sum()
    (g_hand,) = torch.autograd.grad(by_hand, theta)
    assert g_theta.abs().sum() > 0
    assert torch.allclose(g_theta, g_hand, atol=1e-6), (g_theta - g_hand).abs().max()
    assert torch.autograd.grad(loss, phi, allow_unused=True)[0] is None  # the tool learns only from its own loss


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
