"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grto_qwen3vl_tiny_cpu` end to end.

A tiny Qwen3-VL (randomly initialised, verl_grto/assets/qwen3vl.py) as the policy of GRTO, two steps
of 4 prompts x 2 answers: verl's FSDP2 actor and reference with its Qwen3-VL patches (4-row position
ids), the `hf` rollout, rows in Qwen3-VL's frame (norm1000, 32-px resize) checked at start against the
recipe and the processor, the tool scoring every rollout. The policy is untrained, so its answers do
not parse and its rewards are 0: this run checks the Qwen3-VL plumbing, not learning. What it asserts
beyond "it ran": the data check ran in Qwen3-VL's frame (convention and factor read from the recipe
and the processor), and the rollout's log-probs agree with the actor's (tests/test_qwen3vl.py shows
that 1-D positions would move them by far more than the tolerance).
"""

from __future__ import annotations

import json

import pytest
from e2e_helpers import read_metrics, run_main_ppo

pytestmark = pytest.mark.e2e


def test_tiny_qwen3vl_runs_grto_through_main_ppo(tmp_path, e2e_home):
    runs = tmp_path / "runs"
    run_main_ppo("grto_qwen3vl_tiny_cpu", e2e_home, runs, tmp_path / "m.jsonl", [])
    metrics = read_metrics(tmp_path / "m.jsonl")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert "grto/reward/mask_iou" in m  # the tool's masks gave the rewards
        assert m["rollout_corr/log_ppl_abs_diff"] < 1e-4  # `hf` rollout and FSDP actor: same positions, same log-probs
    report = json.loads((runs / "grto_qwen3vl_tiny_cpu" / "data_check" / "report.json").read_text())
    frames = [entry["policy_frame"] for entry in report["files"].values()]
    assert len(frames) == 2 and all(f["coords"] == "norm1000" and f["factor"] == 32 for f in frames)
    assert all(not entry["problems"] for entry in report["files"].values())
