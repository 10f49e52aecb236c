"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grto_tiny_cpu` end to end.

Policy and tool trained together for a short run through verl's V1 trainer (trainer mode `grto`):
the tool's mask reward drives GRPO, the tool learns on the same rollouts, both are checkpointed.
A resumed run restoring both, tensor by tensor, is tests/test_e2e_kill.py. Also the frozen-tool
baseline recipe `grpo_sam2_tiny_cpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
from e2e_helpers import read_metrics, run_main_ppo

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.fixture(scope="module")
def grto_run(tmp_path_factory, e2e_home):
    root = tmp_path_factory.mktemp("e2e_grto")
    overrides = [f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={STEPS}"]
    out = run_main_ppo("grto_tiny_cpu", e2e_home, root / "runs", root / "m1.jsonl", overrides)
    return root, out, e2e_home


def test_policy_and_tool_train_together(grto_run):
    root = grto_run[0]
    metrics = read_metrics(root / "m1.jsonl")
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step, m in metrics.items():
        # sampling at temperature 1 from the warm-started policy: 0.38-0.56 unparseable was measured
        assert m["grto/unparseable_fraction"] < 0.9, f"step {step}: too few parseable rollouts to train the tool"
        assert m["grto/tool/skipped"] == 0.0, f"step {step}: tool step skipped"
        assert np.isfinite(m["grto/tool/loss"]) and m["grto/tool/grad_norm"] > 0
        assert m["actor/grad_norm"] > 0
    # the pre-trained (plain-domain) tool adapts to the camouflage domain: its loss on the last
    # steps' rollouts is below its loss on the first step's, before any update
    first = metrics[1]["grto/tool/loss"]
    last = np.mean([metrics[s]["grto/tool/loss"] for s in range(STEPS - 2, STEPS + 1)])
    assert last < first, f"tool loss did not fall over {STEPS} steps: {first:.3f} -> {last:.3f}"


def test_checkpoint_holds_policy_and_tool(grto_run):
    step_dir = grto_run[0] / "runs" / "grto_tiny_cpu" / f"global_step_{STEPS}"
    assert (step_dir / "actor" / "model_world_size_1_rank_0.pt").is_file()
    for name in ("model.safetensors", "optimizer.pt", "rng.pt", "config.json"):
        assert (step_dir / "tool" / name).is_file(), name


def test_frozen_tool_baseline_runs_through_the_tool_worker(tmp_path, e2e_home):
    run_main_ppo("grpo_sam2_tiny_cpu", e2e_home, tmp_path / "runs", tmp_path / "m.jsonl", [])
    metrics = read_metrics(tmp_path / "m.jsonl")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert "grto/reward/mask_iou" in m  # rewards came from the tool's masks
        assert "grto/tool/loss" not in m  # ...and the tool was never updated
