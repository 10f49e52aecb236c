"""`python -m verl.trainer.main_ppo --config-path recipes --config-name grto_agent_tiny_cpu` end to end.

The tool as a call (trainer mode ``grto_agent``): the tiny multi-turn policy calls the tiny SAM2 inside
verl's multi-turn agent loop, through the job's tool router, on the tool workers GRTO trains. One launch
of two GRTO steps with a validation and a checkpoint after step 2 (resume is trainer mode ``grto``'s own
code, which this mode inherits untouched; tests/test_e2e_kill.py kills and resumes it). Checked from the
run's metrics, its trajectory traces (``agent_trace/step_<N>.json``: each response cut where verl's
loss mask changes) and its summary:

* trajectories with at least two policy turns; the tool's reply (its image: 64 vision tokens, and its
  text) between them, in the input of the second turn, with loss mask 0; the policy's turns with loss
  mask 1 and no image token;
* the tool's update consumed every call: every valid call of the step was a row of the update
  (``grto/agent/calls_trained`` == ``grto/agent/valid_calls``) and the engine trained on every row
  (``grto/tool/num_rollouts`` == ``grto/agent/tool_rows``), and it took its step;
* the calls were served by the weights GRTO trains: at step 2, after step 1's update, the masks the
  policy was shown are the updated tool's (``grto/agent/call_mask_agreement``); the checkpoint holds
  the tool after its two updates.
"""

from __future__ import annotations

import json

import pytest
import torch
from e2e_helpers import read_metrics, run_main_ppo

pytestmark = pytest.mark.e2e

RECIPE = "grto_agent_tiny_cpu"
SMALL = [
    "trainer.total_training_steps=2",
    "trainer.save_freq=2",
    "trainer.test_freq=2",
    "trainer.val_before_train=false",
    # quoted: hydra's override grammar does not nest interpolations; OmegaConf resolves the string
    "data.val_files='${grto_agent_data:${grto_synthetic:camouflage,val,256,8,0,1,1}}'",
    "data.val_batch_size=8",
    # every trajectory of a step traced (4 prompts x 4 answers): sampled at temperature 1, some end after
    # one malformed call, and the test looks for those that called, saw the mask and answered
    "grto_agent.trace_rows=16",
]


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, e2e_home):
    root = tmp_path_factory.mktemp("e2e_agent")
    out = run_main_ppo(RECIPE, e2e_home, root / "runs", root / "a.jsonl", SMALL)
    return root, out, root / "runs" / RECIPE


def test_the_policy_calls_sees_the_mask_and_answers(agent_run) -> None:
    _, _, run_dir = agent_run
    trace = json.loads((run_dir / "agent_trace" / "step_1.json").read_text())
    multi = [t for t in trace if sum(s["loss_mask"] for s in t["segments"]) >= 2]
    # sampled at temperature 1: some first calls are malformed (a text error comes back, or verl's own
    # "Unknown function" for a garbled name); those whose first call was valid saw the mask
    shown = [t for t in multi if t["calls"] and t["calls"][0]["kind"] == "ok"]
    assert shown, [t["segments"] for t in trace]
    for t in multi:
        segments = t["segments"]
        first_turn = next(k for k, s in enumerate(segments) if s["loss_mask"] == 1)
        assert segments[first_turn]["text"].startswith("<tool_call>")
        reply = next(s for s in segments[first_turn + 1 :] if s["loss_mask"] == 0)  # masked out of the loss
        assert "<|im_start|>tool" in reply["text"]
        assert any(s["loss_mask"] == 1 for s in segments[segments.index(reply) + 1 :])  # the policy went on
        assert all("<|image_pad|>" not in s["text"] for s in segments if s["loss_mask"] == 1)
        if t in shown:  # the tool's image and text, in the input of the next turn
            assert "<|vision_start|><|image_pad|>x64<|vision_end|>" in reply["text"] and "mask:" in reply["text"]


def test_the_tool_update_consumes_every_call(agent_run) -> None:
    root, out, run_dir = agent_run
    metrics = read_metrics(root / "a.jsonl")
    assert sorted(k for k in metrics if k > 0) == [1, 2], sorted(metrics)
    for step in (1, 2):
        m = metrics[step]
        assert m["grto/agent/valid_calls"] > 0 and m["grto/agent/multi_turn_fraction"] > 0
        assert m["grto/agent/calls_trained"] == m["grto/agent/valid_calls"]
        assert m["grto/tool/num_rollouts"] == m["grto/agent/tool_rows"]
        assert m["grto/tool/skipped"] == 0.0 and m["actor/grad_norm"] > 0
    summary = json.loads((run_dir / "grto_summary.json").read_text())
    last = summary["validations"][-1]
    assert last["label"] == "after GRTO step 2" and last["val-grto/n"] == 8
    assert 0.0 <= last["val-agent/first_call_gIoU"] <= 1.0 and last["val-agent/calls_per_trajectory"] > 0
    assert "==== verl-grto grto_agent summary ====" in out


def test_the_calls_are_served_by_the_weights_grto_trains(agent_run) -> None:
    root, _, run_dir = agent_run
    metrics = read_metrics(root / "a.jsonl")
    # step 1: the initial tool; step 2: the tool after step 1's update answered the calls
    assert metrics[1]["grto/agent/call_mask_agreement"] >= 0.99
    assert metrics[2]["grto/agent/call_mask_agreement"] >= 0.99
    state = torch.load(run_dir / "global_step_2" / "tool" / "optimizer.pt", weights_only=True)
    assert state["step"] == 2  # two updates, one per step
    assert (run_dir / "agent_trace" / "step_2.json").is_file()
