"""`python -m verl.trainer.main_ppo --config-path recipes --config-name bgrto_tiny_cpu` end to end.

B-GRTO through verl's V1 trainer (trainer mode `bgrto`), on a small slice of the main job: the
buffer from verl's rollout servers, BTO in the tool workers, validation through the tool before BTO,
after it and after GRTO, the summary; then a crash in each stage is resumed:

* stage 1 (buffer): the buffer of a crashed build keeps its rows; only the missing rows are sampled;
* stage 2 (tool): with the buffer complete and no report, the tool resumes from BTO's checkpoint;
* GRTO: after a GRTO checkpoint, BTO is not repeated and policy and tool come back from it.
"""

from __future__ import annotations

import json
import shutil

import pytest
from e2e_helpers import read_metrics, run_main_ppo

from verl_grto.algorithm.bto.buffer import RolloutBuffer

pytestmark = pytest.mark.e2e

RECIPE = "bgrto_tiny_cpu"
PROMPTS, G, EPOCHS, BATCH = 8, 4, 2, 4
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


#: The resume runs skip validation (the first run checks it): each one costs a few rollouts' time.
NO_VALIDATION = ["trainer.val_before_train=false", "trainer.test_freq=-1", "bto.validate_after=false"]


def _run(root, home, name: str, steps: int, extra: tuple[str, ...] = ()) -> str:
    overrides = [*SMALL, f"trainer.total_training_steps={steps}", *extra]
    return run_main_ppo(RECIPE, home, root / "runs", root / f"{name}.jsonl", overrides)


def _forget_after_bto(run_dir) -> None:
    """What a crash before the first GRTO checkpoint leaves behind: no step folders, no tracker."""
    for p in run_dir.glob("global_step_*"):
        shutil.rmtree(p)
    (run_dir / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)


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
    assert "==== verl-grto bgrto summary ====" in out

    metrics = read_metrics(root / "a.jsonl")
    assert metrics[1]["grto/tool/skipped"] == 0.0 and metrics[1]["actor/grad_norm"] > 0
    assert "bto/tool_s" in metrics[0] and "val-grto/gIoU" in metrics[1]
    assert (run_dir / "global_step_1" / "tool" / "model.safetensors").is_file()
    assert any((run_dir / "bto" / "checkpoints" / "rank0").glob("bto-*"))


def test_a_crash_in_each_stage_resumes_there(bgrto_run):
    root, _, home, run_dir = bgrto_run
    bto = run_dir / "bto"
    full = RolloutBuffer.load(bto / "buffer")

    # stage 1: a crashed build kept the first half of the rows' answers (and nothing after it)
    kept = sorted(full.done_sample_ids())[: PROMPTS // 2]
    shutil.rmtree(bto)
    RolloutBuffer(full.meta, [r for r in full.records if r.sample_id in kept]).save(bto / "buffer")
    _forget_after_bto(run_dir)
    _run(root, home, "b", 1, NO_VALIDATION)
    resumed = RolloutBuffer.load(bto / "buffer")
    assert len(resumed) == PROMPTS * G
    before = {r.key: r.answer for r in full.records if r.sample_id in kept}
    assert {r.key: r.answer for r in resumed.records if r.sample_id in kept} == before  # not sampled again
    report_b = json.loads((bto / "report.json").read_text())
    assert report_b["tool"]["resumed_from_batch"] is None

    # stage 2: the buffer is complete, the tool's BTO checkpoints are there, the report is not
    (bto / "report.json").unlink()
    _forget_after_bto(run_dir)
    _run(root, home, "c", 2, NO_VALIDATION)
    report_c = json.loads((bto / "report.json").read_text())
    assert report_c["tool"]["resumed_from_batch"] == report_b["tool"]["batches"]
    assert report_c["tool"]["epoch_losses"] == report_b["tool"]["epoch_losses"]
    assert RolloutBuffer.load(bto / "buffer").fingerprint() == resumed.fingerprint()
    assert sorted(read_metrics(root / "c.jsonl")) == [0, 1, 2]  # BTO's metrics at step 0, then GRTO

    # GRTO: resumes from global_step_2 (policy and tool); BTO is behind the run and not repeated
    stamp = (bto / "report.json").stat().st_mtime_ns
    out = _run(root, home, "d", 3, NO_VALIDATION)
    assert "Resumed the tool from" in out and "global_step_2" in out
    assert (bto / "report.json").stat().st_mtime_ns == stamp
    assert sorted(read_metrics(root / "d.jsonl")) == [3]
