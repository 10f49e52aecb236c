"""Kill -9, for real: the B-GRTO tiny run SIGKILLed (driver and every Ray process) and rerun.

One launch sequence of the same command, each launch stopped at a named kill point
(:mod:`verl_grto.faults`: the process that reaches it writes a marker and blocks; this test then
SIGKILLs the whole tree, as the OOM killer or a pre-empting scheduler would):

1. during the BTO buffer build, after its first part is written;
2. during BTO's tool training, after its first checkpoint;
3. while the checkpoint of GRTO step 3 is written, after that step's updates (policy and tool changed
   in memory): the step folder is whole, verl's ``latest_checkpointed_iteration.txt`` not yet
   replaced (verl_grto/patches.py makes that one rename);
4. no kill: the run completes.

After each kill nothing of the run is left running, and the next launch resumes from the last
complete checkpoint: the rows of the buffer kept, the BTO tool state (weights, optimizer, step,
RNG), then for GRTO the step counter, the policy (weights, optimizer, RNG), the tool and the
dataloader position equal what that checkpoint holds, tensor by tensor (the resumed processes write
what they loaded, :func:`verl_grto.faults.dump_after_resume`). A checkpoint being written is never
loaded.

The run is the default placement at two ranks: the actor's FSDP world size is 2 and the tool lives in
the same two processes (``grto.placement: colocated``), so the rollouts are split across the actor's
ranks, the tool's gradients are all-reduced on the actor's process group, rank 0 alone writes the
tool's checkpoint, and resume must give each rank back its *own* actor RNG (verl's
``extra_state_world_size_2_rank_<r>.pt``; the tool keeps its RNG in its own generators and never sets
the process's). Every tool update leaves the two ranks with one weight digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import kill_until_gone, read_metrics, same_grto_state, same_tool, tagged_processes

from verl_grto.algorithm.bto.buffer import RolloutBuffer
from verl_grto.algorithm.bto.train import latest_checkpoint
from verl_grto.faults import KILL_AT_ENV, MARKER_ENV, PROBE_ENV
from verl_grto.trainer.launch import REPO

pytestmark = pytest.mark.e2e

RECIPE = "bgrto_tiny_cpu"
PROMPTS, G, STEPS = 8, 2, 3
#: The smallest B-GRTO run with every stage: 8 prompts x 2 answers in two chunks, one BTO epoch of
#: one image per update (a checkpoint after each), three GRTO steps of four prompts, a checkpoint each.
OVERRIDES = [
    f"bto.max_prompts={PROMPTS}",
    "bto.prompts_per_generate=4",
    f"bto.group_size={G}",
    "bto.epochs=1",
    "bto.batch_size=1",
    "bto.checkpoint_every=1",
    "bto.min_box_iou=0.0",
    "bto.validate_after=false",
    "grto.min_box_iou=0.0",
    "data.train_batch_size=4",
    f"actor_rollout_ref.rollout.n={G}",
    f"trainer.total_training_steps={STEPS}",
    "trainer.save_freq=1",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    "data.val_files=${grto_synthetic:camouflage,val,256,8,0,1,1}",
    "trainer.logger=[console,file]",
    # the default (colocated) placement at two ranks: FSDP world size 2, the tool on the same 2 ranks
    "trainer.n_gpus_per_node=2",
    "ray_kwargs.ray_init.num_gpus=2",
    # 4 prompts x 2 answers = 8 rollouts, 4 per rank: micro-batches of 4
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
]
#: Seconds a launch may take to reach its kill point or to finish (a launch takes ~1-2 minutes).
LAUNCH_TIMEOUT = 900


class Run:
    """The same main_ppo command, launched again and again in its own session and Ray temp dir."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.home = home
        self.tag = uuid.uuid4().hex  # in the environment of every process of the run, Ray's included
        # Ray's sockets live under its temp dir: keep the path short (AF_UNIX paths max 107 bytes)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="vgk", dir="/tmp"))
        self.run_dir = root / "runs" / RECIPE
        self.launches = 0
        self.seconds: list[float] = []  # wall time of each launch, to its kill or its end

    def env(self, kill_at: str | None, probe: Path, metrics: Path) -> dict[str, str]:
        env = {
            **os.environ,
            "VERL_GRTO_HOME": str(self.home),
            "VERL_GRTO_RUNS": str(self.root / "runs"),
            "VERL_FILE_LOGGER_PATH": str(metrics),
            "HF_DATASETS_CACHE": str(self.home / "hf_datasets"),
            "RAY_DEDUP_LOGS": "0",
            # the worktree's package in the driver and, inherited through the local Ray cluster, its workers
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "VERL_GRTO_KILL_TEST_TAG": self.tag,
            MARKER_ENV: str(self.root / "killed.json"),
            PROBE_ENV: str(probe),
        }
        env.pop(KILL_AT_ENV, None)
        env.pop("RAY_ADDRESS", None)  # never join another cluster
        if kill_at:
            env[KILL_AT_ENV] = kill_at
        return env

    def launch(self, kill_at: str | None) -> tuple[str, dict[str, Any] | None, Path]:
        """Run the command; with ``kill_at``, SIGKILL its tree once the point is reached. Returns the
        output, the marker (None when the run finished) and the probe directory of this launch."""
        self.launches += 1
        k = self.launches
        probe, metrics, log = self.root / f"probe{k}", self.root / f"metrics{k}.jsonl", self.root / f"launch{k}.log"
        marker = self.root / "killed.json"
        marker.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "recipes", "--config-name", RECIPE,
            *OVERRIDES, f"+ray_kwargs.ray_init._temp_dir={self.ray_tmp}",
        ]  # fmt: skip
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env(kill_at, probe, metrics), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            try:
                while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.5)  # the kill is chosen by the marker, not by this poll
            finally:
                stopped = marker.exists() or proc.poll() is None
                if stopped:
                    self.kill_tree(proc)
                self.seconds.append(time.perf_counter() - start)
        text = log.read_text()
        if kill_at is None:
            assert proc.returncode == 0, f"launch {k} failed (rc={proc.returncode}):\n{text[-6000:]}"
            return text, None, probe
        assert marker.exists(), f"launch {k} never reached {kill_at} (rc={proc.returncode}):\n{text[-6000:]}"
        return text, json.loads(marker.read_text()), probe

    def processes(self) -> list[int]:
        """Live processes of this run: its tag in their environment or its Ray temp dir on their command line."""
        return tagged_processes(f"VERL_GRTO_KILL_TEST_TAG={self.tag}", (str(self.ray_tmp),))

    def kill_tree(self, proc: subprocess.Popen) -> None:
        """SIGKILL the launch's process group and every other process of the run, until none is left."""
        kill_until_gone(self.processes, proc)

    def cleanup(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _left_after(run: Run, seconds: float = 60.0) -> list[int]:
    """The run's processes still alive ``seconds`` after its driver exited on its own: Ray's workers and
    raylet stop after the driver, not with it (with two actor ranks that took a few seconds)."""
    deadline = time.monotonic() + seconds
    while run.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    return run.processes()


def _tracker(run_dir: Path) -> int | None:
    path = run_dir / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else None


def test_sigkill_at_each_stage_then_rerun_resumes_from_the_last_complete_checkpoint(tmp_path, e2e_home):
    run = Run(tmp_path, Path(e2e_home))
    started = time.perf_counter()
    try:
        bto = run.run_dir / "bto"

        # 1. buffer: killed after its first part (4 of 8 prompts)
        _, marker, _ = run.launch("bto.buffer.part_saved")
        assert marker["point"] == "bto.buffer.part_saved" and not run.processes()
        kept = RolloutBuffer.load(bto / "buffer")
        assert len(kept) == PROMPTS // 2 * G and not (bto / "buffer" / "rollouts.parquet").exists()
        kept_answers = {r.key: r.answer for r in kept.records}

        # 2. BTO tool: the buffer is completed from the kept rows; killed after BTO's first checkpoint
        _, marker, _ = run.launch("bto.tool.checkpoint_saved")
        assert marker["point"] == "bto.tool.checkpoint_saved" and not run.processes()
        full = RolloutBuffer.load(bto / "buffer")
        assert len(full) == PROMPTS * G
        assert {r.key: r.answer for r in full.records if r.key in kept_answers} == kept_answers  # not resampled
        ckpt = latest_checkpoint(bto / "checkpoints" / "rank0")
        assert ckpt is not None and not (bto / "report.json").exists()
        bto_ckpt = shutil.copytree(ckpt, tmp_path / "bto_ckpt")
        bto_batches = json.loads((bto_ckpt / "progress.json").read_text())["batches_done"]

        # 3. while step 3's checkpoint is written (steps 1 and 2 saved): BTO resumed from its checkpoint
        out, marker, probe = run.launch("checkpoint.tracker_unpublished#3")
        assert marker["point"] == "checkpoint.tracker_unpublished" and not run.processes()
        assert "tool initialised (colocated, 2 ranks)" in out
        same_tool(probe / "bto_tool", bto_ckpt / "tool")
        report = json.loads((bto / "report.json").read_text())
        assert report["tool"]["resumed_from_batch"] == bto_batches
        stamp = (bto / "report.json").stat().st_mtime_ns
        assert _tracker(run.run_dir) == 2 and (run.run_dir / "global_step_3" / "tool").is_dir()
        assert list(run.run_dir.glob(".latest_checkpointed_iteration.txt.*.tmp"))  # the tracker being written
        step2 = shutil.copytree(run.run_dir / "global_step_2", tmp_path / "snap" / "global_step_2")
        assert sorted(p.name for p in (step2 / "actor").glob("extra_state_*.pt")) == [
            f"extra_state_world_size_2_rank_{r}.pt" for r in (0, 1)
        ]

        # 4. no kill: resumes from step 2 (not the unpublished step 3, not what step 3 left in memory), BTO
        # not repeated, and completes
        out, marker, probe = run.launch(None)
        assert marker is None and not _left_after(run)
        same_grto_state(probe / "grto", step2)  # each actor rank's own RNG among verl's extra state files
        with pytest.raises(AssertionError, match="tool weights"):  # the comparison has teeth: the
            same_tool(probe / "grto" / "tool", bto_ckpt / "tool")  # tool moved since BTO's first checkpoint
        assert (bto / "report.json").stat().st_mtime_ns == stamp
        assert "global_step_2" in out and _tracker(run.run_dir) == STEPS
        resumed = read_metrics(tmp_path / f"metrics{run.launches}.jsonl")
        assert sorted(resumed) == [STEPS]
        # every tool update the run logged left both ranks with the same weights and step
        logged = {**read_metrics(tmp_path / "metrics3.jsonl"), **resumed}
        assert {1, 2, STEPS} <= set(logged)
        for step in (1, 2, STEPS):  # (step 0 holds BTO's record)
            m = logged[step]
            assert m["grto/tool/ranks"] == 2 and m["grto/tool/skipped"] == 0, step
            assert m["grto/tool/distinct_weights"] == 1 and m["grto/tool/distinct_steps"] == 1, step
        # the rollout server samples with the resumed policy: its log-probs are the actor's (fp32: ~2e-6)
        assert resumed[STEPS]["training/rollout_probs_diff_max"] < 1e-4
        assert (run.run_dir / "grto_summary.json").is_file()
    finally:
        leftover = run.processes()
        for pid in leftover:  # reported below; not left behind on this machine either way
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.cleanup()
        each = ", ".join(f"{s:.0f}" for s in run.seconds)
        print(f"kill test: {run.launches} launches in {time.perf_counter() - started:.0f} s ({each} s)")
    assert not leftover, f"processes of the run left running: {leftover}"
