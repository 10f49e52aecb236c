"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grpo_sam2_tiny_cpu` end to end.

The frozen-tool baseline: GRPO whose reward is the pre-trained tool's mask, the tool served by the
plugin's tool worker and never updated. Trainer mode `grto` (policy and tool trained together) runs
end to end in tests/test_e2e_multinode.py (and, after BTO, in tests/test_e2e_bgrto.py and
tests/test_e2e_kill.py).
"""

from __future__ import annotations

import pytest
from e2e_helpers import read_metrics, run_main_ppo

pytestmark = pytest.mark.e2e


def test_frozen_tool_baseline_runs_through_the_tool_worker(tmp_path, e2e_home):
    run_main_ppo("grpo_sam2_tiny_cpu", e2e_home, tmp_path / "runs", tmp_path / "m.jsonl", [])
    metrics = read_metrics(tmp_path / "m.jsonl")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert "grto/reward/mask_iou" in m  # rewards came from the tool's masks
        assert "grto/tool/loss" not in m  # ...and the tool was never updated
