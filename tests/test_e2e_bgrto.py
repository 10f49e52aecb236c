"""`python -m verl.trainer.main_ppo --config-path recipes --config-name bgrto_tiny_cpu` end to end.

B-GRTO through verl's V1 trainer (trainer mode `bgrto`), on a small slice of the main job: the
buffer from verl's rollout servers, BTO in the tool workers, validation through the tool before BTO,
after it and after GRTO, the summary. Resuming after a crash in each stage (the buffer keeps its
rows, the tool resumes from BTO's checkpoint, GRTO from its step checkpoint without repeating BTO) is
shown with real SIGKILLs in tests/test_e2e_kill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_helpers import read_metrics, run_main_ppo, weights_digest

from verl_grto.algorithm.bto.buffer import RolloutBuffer

pytestmark = pytest.mark.e2e

RECIPE = "bgrto_tiny_cpu"
PROMPTS, G, EPOCHS, BATCH = 8, 4, 4, 4
SMALL = [
    f"bto.max_prompts={PROMPTS}",
    f"bto.epochs={EPOCHS}",
    f"bto.batch_size={BATCH}",
    "bto.checkpoint_every=1",
    "bto.min_box_iou=0.0",  # 8 prompts of a policy that rarely localises: keep every parseable answer
    f"actor_rollout_ref.rollout.n={G}",
    "trainer.save_freq=1",
    "trainer.test_freq=1",
    "data.val_files=${grto_synthetic:camouflage,val,256,8,0,1,1}",
]
#: What BTO must add to validation gIoU in this slice (test_bto_raises_the_tools_validation_giou). Seen:
#: 0.174 -> 0.507 with these settings, 0.174 -> 0.405 with 2 epochs; a BTO that trains nothing adds
#: exactly 0 (the same greedy answers, the same tool: benchmarks/results/mutation_check.json).
BTO_MARGIN = 0.15


def _run(root, home, name: str, steps: int, extra: tuple[str, ...] = ()) -> str:
    overrides = [*SMALL, f"trainer.total_training_steps={steps}", *extra]
    return run_main_ppo(RECIPE, home, root / "runs", root / f"{name}.jsonl", overrides)


@pytest.fixture(scope="module")
def bgrto_run(tmp_path_factory, e2e_home):
    root = tmp_path_factory.mktemp("e2e_bgrto")
    out = _run(root, e2e_home, "a", 1)
    return root, out, e2e_home, root / "runs" / RECIPE


def test_bto_then_grto_with_validation_before_and_after(bgrto_run):
    root, out, _, run_dir = bgrto_run
    report = json.loads((run_dir / "bto" / "report.json").read_text())
    assert report["buffer"]["rows"] == PROMPTS and report["buffer"]["rollouts"] == PROMPTS * G
    assert report["tool"]["epochs"] == EPOCHS and len(report["tool"]["epoch_losses"]) == EPOCHS
    usable = report["tool"]["usable_rollouts"]
    assert usable > 0, "no parseable answer in the buffer: BTO had nothing to train on"
    # every image encoded once for the whole stage, however many epochs
    assert report["tool"]["images_encoded"] == report["tool"]["distinct_images"]
    buffer = RolloutBuffer.load(run_dir / "bto" / "buffer")
    assert len(buffer) == PROMPTS * G and buffer.meta.group_size == G
    assert all(len(r.logprobs) == len(r.response_ids) > 0 for r in buffer.records)  # verl's rollout log-probs

    summary = json.loads((run_dir / "grto_summary.json").read_text())
    steps = [int(v["step"]) for v in summary["validations"]]
    assert steps == [0, 0, 1], steps  # before BTO, after BTO, after the GRTO step
    labels = [v["label"] for v in summary["validations"]]
    assert labels == ["before BTO", "after BTO", "after GRTO step 1"], labels
    for v in summary["validations"]:
        assert 0.0 <= v["val-grto/gIoU"] <= 1.0 and v["val-grto/n"] == 8
        assert "val-grto/box_fill_gIoU" in v and 0.0 <= v["val-grto/policy_box_iou"] <= 1.0
    assert summary["bto"]["tool"]["epochs"] == EPOCHS and summary["bto_fraction_of_grto_epoch"] > 0
    # cpu_base's ray_kwargs.task_runner_in_driver: the trainer printed from the driver itself (no Ray
    # actor prefix), and TransferQueue took the recipe's TQ_NUM_THREADS=1 (with its import-time default of
    # 8 on a 2-core machine it warns at every put and get, in the driver and in its storage actor)
    assert "==== verl-grto bgrto summary ====" in out.splitlines() and "(TaskRunnerV1 pid=" not in out
    assert "should not exceed total physical CPU cores" not in out

    metrics = read_metrics(root / "a.jsonl")
    assert metrics[1]["grto/tool/skipped"] == 0.0 and metrics[1]["actor/grad_norm"] > 0
    assert "bto/tool_s" in metrics[0] and "val-grto/gIoU" in metrics[1]
    assert (run_dir / "global_step_1" / "tool" / "model.safetensors").is_file()
    assert any((run_dir / "bto" / "checkpoints" / "rank0").glob("bto-*"))


def test_the_runs_checkpoint_evaluates_through_the_command_line(bgrto_run, tmp_path, capsys):
    """docs/recipes.md, "From a checkpoint to numbers": `verl-grto evaluate --checkpoint` and `predict
    --checkpoint` on this run's folder. The policy evaluated is the trained actor's (its weights equal
    the FSDP shard's, tensor by tensor), and without the `hf_model` weights the shards are merged by
    verl's own merger into the same weights, rounded to bf16."""
    import shutil

    import pyarrow.parquet as pq
    import torch
    import yaml

    from verl_grto.cli import main
    from verl_grto.eval.checkpoint import checkpoint_models
    from verl_grto.policy.load import load_policy

    _, _, _, run_dir = bgrto_run
    step = run_dir / "global_step_1"
    val = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["data"]["val_files"]
    out = tmp_path / "eval"
    common = ["--max-new-tokens", "32", "--device", "cpu"]
    assert (
        main(["evaluate", "--checkpoint", str(run_dir), "--split", val, "--out", str(out), "--limit", "4", *common])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["checkpoint"] == str(step) and report["models"]["policy_from"] == "actor/huggingface"
    assert report["models"]["tool"] == str(step / "tool") and report["models"]["adapter"] is None
    assert report["n"] == 4 and report["policy"]["answered"] == 4
    assert 0.0 <= report["scores"]["prediction"]["gIoU"] <= 1.0 and "box_fill" in report["scores"]

    shard = torch.load(step / "actor" / "model_world_size_1_rank_0.pt", weights_only=False)  # this run's file
    shard = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in shard.items()}
    evaluated = load_policy(report["models"]["policy"])[0].state_dict()
    assert sorted(evaluated) == sorted(shard)
    assert all(torch.equal(evaluated[k], shard[k]) for k in shard), "evaluated policy != the actor's checkpoint"

    # the same step without the hf_model weights (verl's default save_contents): merged from the shards
    bare = tmp_path / "bare" / "global_step_1"
    shutil.copytree(step, bare)
    for weights in (bare / "actor" / "huggingface").glob("model.safetensors*"):
        weights.unlink()
    models = checkpoint_models(bare, tmp_path / "merged")
    assert models.policy_from == "merged FSDP shards"
    merged = load_policy(str(models.policy))[0].state_dict()
    assert all(torch.equal(merged[k], shard[k].bfloat16().float()) for k in shard)

    row = pq.read_table(val).to_pylist()[0]
    image = tmp_path / "scene.png"
    image.write_bytes(row["images"][0]["bytes"])
    tiny = [
        "--instruction",
        "short",
        "--min-pixels",
        "3136",
        "--max-pixels",
        "50176",
    ]  # the tiny world's prompt and frame
    args = ["predict", "--checkpoint", str(step), "--image", str(image), "--prompt", row["extra_info"]["expression"]]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "mask.png"), *tiny, *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (tmp_path / "mask.png").is_file() and printed["answer"]


def test_bto_raises_the_tools_validation_giou(bgrto_run):
    """BTO adapts the plain-scene tool to the camouflage scenes: on the same validation scenes and the
    same (reference) policy's answers, gIoU right after BTO beats gIoU before it by BTO_MARGIN."""
    summary = json.loads((bgrto_run[3] / "grto_summary.json").read_text())
    before, after = (v for v in summary["validations"] if v["label"] in ("before BTO", "after BTO"))
    assert before["val-grto/policy_box_iou"] == after["val-grto/policy_box_iou"]  # same answers, only the tool moved
    gain = after["val-grto/gIoU"] - before["val-grto/gIoU"]
    assert gain > BTO_MARGIN, (
        f"BTO moved validation gIoU by {gain:+.3f} ({before['val-grto/gIoU']:.3f} -> {after['val-grto/gIoU']:.3f})"
    )


def test_verls_advantages_come_from_the_mask_rewards(bgrto_run):
    """Per GRTO step, verl's critic/score (the batch mean of the rm_scores its advantages are computed
    from) is the batch mean of the mask rewards the trainer computed (grto/reward/score), not the agent
    loop's box reward; and the tool's own update changed its weights after BTO."""
    root, _, _, run_dir = bgrto_run
    metrics = read_metrics(root / "a.jsonl")
    steps = [s for s in metrics if s >= 1]
    assert steps == [1], steps
    for step in steps:
        m = metrics[step]
        assert m["critic/score/mean"] == pytest.approx(m["grto/reward/score"], abs=1e-5), (
            f"step {step}: verl's critic/score {m['critic/score/mean']:.5f} is not the mask reward"
            f" {m['grto/reward/score']:.5f} the trainer computed"
        )
    bto_tool = Path(json.loads((run_dir / "bto" / "report.json").read_text())["tool"]["tool_dir"])
    assert weights_digest(run_dir / "global_step_1" / "tool") != weights_digest(bto_tool)
