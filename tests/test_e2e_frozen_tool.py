"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grpo_sam2_tiny_cpu` end to end.

The frozen-tool baseline: GRPO whose reward is the pre-trained tool's mask, the tool served by the
plugin's tool worker and never updated. Trainer mode `grto` (policy and tool trained together) runs
end to end in tests/test_e2e_multinode.py (and, after BTO, in tests/test_e2e_bgrto.py and
tests/test_e2e_kill.py).

This launch is also the CI's GRPO run: two GRPO steps of the tiny Qwen2.5-VL through verl's V1 trainer
(Ray, FSDP2 actor and a reference model with the KL loss, the plugin's `hf` rollout) and a checkpoint.
`grpo_tiny_cpu` (the box reward, verl's own `sync` trainer mode, which trainer mode `grto` subclasses)
is not launched in CI: tests/test_recipes.py checks what verl builds from it, and its launch would
repeat this one with another reward at ~60 s of CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from e2e_helpers import read_metrics, run_main_ppo, weights_digest

pytestmark = pytest.mark.e2e

RECIPE = "grpo_sam2_tiny_cpu"


def test_frozen_tool_baseline_rewards_with_the_tools_masks_and_never_changes_it(tmp_path, e2e_home):
    run_main_ppo(RECIPE, e2e_home, tmp_path / "runs", tmp_path / "m.jsonl", [])
    run_dir = tmp_path / "runs" / RECIPE
    metrics = read_metrics(tmp_path / "m.jsonl")
    assert sorted(metrics) == [1, 2]
    for step, m in metrics.items():
        # the rewards verl's advantages were computed from are the tool's mask rewards, step by step:
        # verl's critic/score is the batch mean of rm_scores, the trainer's grto/reward/score the mean
        # of the mask rewards it wrote there (the agent loop's box reward would differ)
        assert m["critic/score/mean"] == pytest.approx(m["grto/reward/score"], abs=1e-5), (
            f"step {step}: verl's critic/score {m['critic/score/mean']:.5f} is not the mask reward"
            f" {m['grto/reward/score']:.5f} the trainer computed"
        )
        assert "grto/tool/loss" not in m  # no tool update was made
        assert m["actor/grad_norm"] > 0, f"step {step}: zero gradient"
        assert max(abs(m["critic/advantages/max"]), abs(m["critic/advantages/min"])) > 0, (
            f"step {step}: zero advantages"
        )
        assert "actor/kl_loss" in m and m["actor/kl_loss"] >= 0  # reference model + KL loss are on
        # rollout (hf server) and actor agree on log-probs: the weight sync works (fp32 both sides: ~2e-6)
        assert m["training/rollout_probs_diff_max"] < 1e-4
    step_dir = run_dir / "global_step_2"
    for name in ("model_world_size_1_rank_0.pt", "optim_world_size_1_rank_0.pt"):
        assert (step_dir / "actor" / name).is_file(), name
    assert (step_dir / "data.pt").is_file()
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    # the tool the run started from and the one it checkpointed after its last step: bit for bit the same
    start_tool = Path(yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["grto"]["tool"]["path"])
    saved_tool = run_dir / "global_step_2" / "tool"
    assert weights_digest(saved_tool) == weights_digest(start_tool)
