"""lambda (``grto.tool_loss_coef``) scales the tool's loss after the weighted mean, and the mean is global.

`ToolEngine.objective` back-propagates lambda * sum_i w_i l_i / sum_i w_i: the weights are
relative (w and c * w give the same gradient), lambda multiplies the result (it used to be folded
into the weights, where the division cancelled it). Over data-parallel ranks the mean is the
weighted mean of all ranks' rollouts, not the mean of the ranks' weighted means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tool_helpers import make_batch, shape_scene, tiny_tool

from verl_grto.tool.engine import ToolBatch, ToolEngine, ToolEngineConfig


def fresh_engine(seed: int = 0, **config) -> ToolEngine:
    return ToolEngine(tiny_tool(seed=seed), ToolEngineConfig(**config))


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps the gradients it was given (parameter differences lose digits to rounding)."""

    def step(self, closure=None):
        self.seen = [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.param_groups[0]["params"]
        ]
        return super().step(closure)


def sgd_engine(seed: int = 0, lr: float = 1.0) -> ToolEngine:
    """An engine whose step is plain SGD without clipping: the step is exactly -lr * gradient."""
    engine = fresh_engine(seed=seed, max_grad_norm=0.0)
    engine.optimizer = RecordingSGD(engine.params, lr=lr)
    return engine


def snapshot(engine: ToolEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.params]


def gradients(engine: ToolEngine, batch: ToolBatch, weights: list[float], loss_scale: float) -> list[torch.Tensor]:
    """d(objective)/d(trainable parameters), through the same function `update` back-propagates."""
    engine.optimizer.zero_grad(set_to_none=True)
    engine.objective(batch, weights, loss_scale).loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in engine.params]
    engine.optimizer.zero_grad(set_to_none=True)
    return grads


def all_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol) -> bool:
    return all(torch.allclose(x, y, **tol) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def batch() -> ToolBatch:
    rng = np.random.default_rng(0)
    return make_batch([shape_scene(rng, 96, 128) for _ in range(2)], rng)


WEIGHTS = [1.0, 2.0, 0.5, 0.0]  # uneven, one rollout left out


def test_gradient_is_linear_in_loss_scale_and_invariant_to_weight_scale(batch):
    engine = fresh_engine()
    g1 = gradients(engine, batch, WEIGHTS, 1.0)
    assert any(g.abs().sum() > 0 for g in g1)
    g2 = gradients(engine, batch, WEIGHTS, 2.0)
    assert all_close(g2, [2 * g for g in g1], rtol=1e-5, atol=1e-8)
    g1_w3 = gradients(engine, batch, [3 * w for w in WEIGHTS], 1.0)  # the mean divides the 3 out...
    assert all_close(g1_w3, g1, rtol=1e-5, atol=1e-8)
    g2_w3 = gradients(engine, batch, [3 * w for w in WEIGHTS], 2.0)  # ...but not lambda
    assert all_close(g2_w3, [2 * g for g in g1], rtol=1e-5, atol=1e-8)


def test_sgd_step_is_linear_in_loss_scale(batch):
    steps, metrics = [], []
    for weights, scale in ((WEIGHTS, 1.0), ([3 * w for w in WEIGHTS], 2.0)):
        engine = sgd_engine(lr=0.1)
        before = snapshot(engine)
        metrics.append(engine.update(batch, weights, loss_scale=scale))
        assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(engine), strict=True))
        steps.append(engine.optimizer.seen)  # SGD's step is -lr * this
    assert metrics[0]["skipped"] == metrics[1]["skipped"] == 0
    assert all_close(steps[1], [2 * s for s in steps[0]], rtol=1e-5, atol=1e-12)
    # logged: the unscaled weighted mean (the same for w and 3w), and lambda times it
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-6)
    assert metrics[1]["scaled_loss"] == pytest.approx(2 * metrics[0]["loss"], rel=1e-6)
    assert metrics[0]["scaled_loss"] == pytest.approx(metrics[0]["loss"])
    assert metrics[1]["grad_norm"] == pytest.approx(2 * metrics[0]["grad_norm"], rel=1e-4)
    assert metrics[1]["weight_sum"] == pytest.approx(3 * sum(WEIGHTS))


def test_adam_step_is_nearly_scale_free(batch):
    """What docs/method.md warns about: AdamW's first step is lr * g / (|g| + eps) ~ lr * sign(g),
    whatever lambda is. Only gradient entries not much above eps (1e-8) see lambda; entries that
    are rounding noise (this tiny tool has many, ~1e-17) are left out of the comparison."""
    grad = gradients(fresh_engine(), batch, WEIGHTS, 1.0)
    steps = []
    for scale in (1.0, 10.0):
        engine = fresh_engine(lr=1e-3, max_grad_norm=0.0, weight_decay=0.0)
        before = snapshot(engine)
        engine.update(batch, WEIGHTS, loss_scale=scale)
        steps.append([a - b for a, b in zip(snapshot(engine), before, strict=True)])
    large = [g.abs() >= 1e-6 for g in grad]
    assert sum(int(m.sum()) for m in large) > 100
    for a, b, m in zip(*steps, large, strict=True):  # |difference| <= lr * eps / |g| = 1e-5
        assert torch.allclose(a[m], b[m], rtol=0.0, atol=2e-5)
        assert torch.allclose(a[m].abs(), torch.full_like(a[m], 1e-3), rtol=0.0, atol=2e-5)  # 10x lambda, same step


def test_loss_scale_zero_freezes_the_tool(batch):
    engine = fresh_engine(lr=1e-3)
    before = snapshot(engine)
    metrics = engine.update(batch, WEIGHTS, loss_scale=0.0)
    assert metrics["skipped"] == 1 and metrics["scaled_loss"] == 0.0 and metrics["loss"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(engine), strict=True))
    assert engine.step == 0 and not engine.optimizer.state


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_loss_scale_is_refused(batch, scale):
    with pytest.raises(ValueError, match="loss_scale"):
        fresh_engine().update(batch, WEIGHTS, loss_scale=scale)


# ---- two data-parallel ranks whose shards have different weight sums ---------------------------

RANK_WEIGHTS = ([1.0, 3.0], [0.25, 0.25])  # weight sums 4 and 0.5
DP_SCALE = 2.0


def _rank_batch(rank: int) -> ToolBatch:
    rng = np.random.default_rng(20 + rank)
    return make_batch([shape_scene(rng, 64, 64)], rng, group=2)


def _global_mean_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        engine = sgd_engine(seed=0)
        metrics = engine.update(_rank_batch(rank), RANK_WEIGHTS[rank], loss_scale=DP_SCALE)
        keep = {k: metrics[k] for k in ("loss", "weight_sum", "skipped")}
        # "step": the all-reduced gradient SGD stepped with
        torch.save({"step": engine.optimizer.seen, **keep}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_loss_is_the_global_weighted_mean(tmp_path):
    """Two gloo ranks: the step is lambda * d/dphi [sum_all w_i l_i / sum_all w_i].

    The mean of the ranks' own weighted means (what averaging per-rank losses would give) weighs
    rank 1's rollouts 8x more here (weight sums 4 vs 0.5); the test checks that it differs.
    """
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers)
    torch.multiprocessing.start_processes(
        _global_mean_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # single-process reference: each shard's weighted sum of losses and its gradient
    sums, grad_sums, weight_sums = [], [], []
    for rank in range(2):
        engine = fresh_engine(seed=0)
        weight_sum = sum(RANK_WEIGHTS[rank])
        local_mean_grad = gradients(engine, _rank_batch(rank), RANK_WEIGHTS[rank], 1.0)
        grad_sums.append([g * weight_sum for g in local_mean_grad])
        sums.append(float(engine.objective(_rank_batch(rank), RANK_WEIGHTS[rank]).mean) * weight_sum)
        weight_sums.append(weight_sum)
    total_weight = sum(weight_sums)
    expected = [DP_SCALE * (a + b) / total_weight for a, b in zip(*grad_sums, strict=True)]
    mean_of_means = [DP_SCALE * (a / weight_sums[0] + b / weight_sums[1]) / 2 for a, b in zip(*grad_sums, strict=True)]

    for r in results:
        assert r["skipped"] == 0.0
        assert r["weight_sum"] == pytest.approx(total_weight)
        assert r["loss"] == pytest.approx(sum(sums) / total_weight, rel=1e-5)
        assert all_close(r["step"], expected, rtol=1e-4, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["step"], results[1]["step"], strict=True))
    assert not all_close(mean_of_means, expected, rtol=1e-2, atol=1e-6)
