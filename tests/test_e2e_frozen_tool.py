"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grpo_sam2_tiny_cpu` end to end.

The frozen-tool baseline: GRPO whose reward is the pre-trained tool's mask, the tool served by the
plugin's tool worker and never updated. Trainer mode `grto` (policy and tool trained together) runs
end to end in tests/test_e2e_multinode.py (and, after BTO, in tests/test_e2e_bgrto.py and
tests/test_e2e_kill.py).
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

    # the tool the run started from and the one it checkpointed after its last step: bit for bit the same
    start_tool = Path(yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["grto"]["tool"]["path"])
    saved_tool = run_dir / "global_step_2" / "tool"
    assert weights_digest(saved_tool) == weights_digest(start_tool)
