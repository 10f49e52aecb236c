"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grpo_tiny_cpu` end to end.

Two GRPO steps of the tiny Qwen2.5-VL through verl's V1 trainer (Ray, FSDP2 actor + reference
model with KL loss, the plugin's `hf` rollout) and a checkpoint. Resuming from verl's checkpoint, with
the rollout server serving the resumed weights, is shown with real SIGKILLs in tests/test_e2e_kill.py
(a second cold launch here would repeat it at ~70 s of CI).
"""

from __future__ import annotations

import pytest
from e2e_helpers import read_metrics, run_main_ppo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, e2e_home):
    root = tmp_path_factory.mktemp("e2e_grpo")
    out = run_main_ppo("grpo_tiny_cpu", e2e_home, root / "runs", root / "m1.jsonl", [])
    return root, out, e2e_home


def test_two_grpo_steps_learn_signal(first_run):
    root = first_run[0]
    metrics = read_metrics(root / "m1.jsonl")
    assert sorted(metrics) == [1, 2]
    for step, m in metrics.items():
        assert m["actor/grad_norm"] > 0, f"step {step}: zero gradient"
        assert max(abs(m["critic/advantages/max"]), abs(m["critic/advantages/min"])) > 0, (
            f"step {step}: zero advantages"
        )
        assert m["actor/kl_loss"] >= 0 and "actor/kl_loss" in m  # reference model + KL loss are on
        # rollout (hf server) and actor agree on log-probs: the weight sync works
        assert m["training/rollout_probs_diff_max"] < 1e-4  # fp32 on both sides: ~2e-6 measured


def test_checkpoint_written(first_run):
    root = first_run[0]
    step_dir = root / "runs" / "grpo_tiny_cpu" / "global_step_2"
    assert (step_dir / "actor" / "model_world_size_1_rank_0.pt").is_file()
    assert (step_dir / "actor" / "optim_world_size_1_rank_0.pt").is_file()
    assert (step_dir / "data.pt").is_file()
    assert (root / "runs" / "grpo_tiny_cpu" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
