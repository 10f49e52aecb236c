"""More than one process per role, on more than one node: GRTO on a 2-node Ray cluster.

The test starts a Ray cluster of two nodes on this machine (``ray start --head``, then ``ray start
--address``; each node with two logical GPUs, which the CPU platform maps to worker slots), then runs
the unchanged entry point against it, as on a real cluster (docs/recipes.md, "A real cluster")::

    python -m verl.trainer.main_ppo --config-path recipes --config-name grto_tiny_cpu \\
        trainer.nnodes=2 trainer.n_gpus_per_node=1 grto.placement=separate \\
        +ray_kwargs.ray_init.address=<head>:<port> ...

so the actor (with its reference and rollout) is FSDP2 at world size 2, one rank per node, over
gloo, and the tool has a pool of its own, one rank per node (data-parallel over 2 ranks, gloo).
One launch: five steps and a checkpoint written by both actor ranks (one FSDP shard each) and the
tool. Resume is shown elsewhere, each at two ranks: by tests/test_e2e_kill.py with real SIGKILLs
(FSDP world size 2, the tool colocated on both ranks; each rank's own RNG, tensor by tensor), and for
a tool in a pool of its own by tests/test_tool_pool.py (two tool workers save and load in sync).

After every tool update the tool's ranks hold identical weights (``grto/tool/distinct_weights``).
Over the five steps the pre-trained (plain-domain) tool adapts to the camouflage domain of the
rollouts: its loss on steps 4-5 is below its loss on step 1's rollouts, before any update. This is
also the end-to-end test of trainer mode ``grto`` (``grto_tiny_cpu``); the colocated placement runs
end to end in tests/test_e2e_bgrto.py and tests/test_e2e_kill.py, whose GRTO stage is the same code.
Both nodes are stopped by the test, and no process of the cluster is left.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import LocalRayCluster, read_metrics, run_main_ppo

from verl_grto.trainer.launch import REPO

pytestmark = pytest.mark.e2e

RECIPE = "grto_tiny_cpu"
STEPS = 5
#: Logical resources per node: 2 GPUs (one actor rank and one tool rank each), CPUs for verl's
#: CPU-only actors (task runner, TransferQueue, agent loop, reward) beside the pools' bundles.
NODE_CPUS, NODE_GPUS = 16, 2
LAUNCH_TIMEOUT = 900


def _overrides(address: str, metrics: Path, steps: int) -> list[str]:
    """The multi-node settings on top of the recipe. Per-launch environment (the metrics file) goes to
    the job's workers through Ray's runtime_env: they run on the cluster's nodes, not under the
    launching shell."""
    env = {"VERL_FILE_LOGGER_PATH": str(metrics)}
    return [
        f"+ray_kwargs.ray_init.address={address}",
        # an existing cluster brings its own resources: ray.init refuses num_cpus / num_gpus then
        "ray_kwargs.ray_init.num_cpus=null",
        "ray_kwargs.ray_init.num_gpus=null",
        # ...and any _system_config (the cluster's own, set by `ray start`)
        "~ray_kwargs.ray_init._system_config",
        *(f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}={v}" for k, v in env.items()),
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=1",
        "grto.placement=separate",
        "grto.tool_workers_per_node=1",
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={STEPS}",
    ]


def _placement(out: str) -> tuple[list[str], list[str]]:
    """The nodes of the actor's and the tool's ranks, from the trainer's placement line."""
    found = re.search(r"placement on \d+ Ray nodes: actor ranks on \[([^\]]*)\]; tool ranks on \[([^\]]*)\]", out)
    assert found, "no placement line in the output"
    return found.group(1).split(", "), found.group(2).split(", ")


def _check_tool_in_sync(metrics: dict[str, float], step: int) -> None:
    assert metrics["grto/tool/ranks"] == 2, f"step {step}: the tool should have 2 ranks"
    assert metrics["grto/tool/distinct_weights"] == 1, f"step {step}: tool ranks hold different weights"
    assert metrics["grto/tool/distinct_steps"] == 1, f"step {step}: tool ranks at different steps"
    assert metrics["grto/tool/nodes"] == 2, f"step {step}: the tool's ranks should span both nodes"


def test_grto_on_two_nodes_trains_and_checkpoints(tmp_path, e2e_home):
    home = Path(e2e_home)
    runs = tmp_path / "runs"
    # what every node's processes must see (on a real cluster: exported on each node before `ray start`)
    node_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "VERL_GRTO_HOME": str(home),
        "VERL_GRTO_RUNS": str(runs),
        "HF_DATASETS_CACHE": str(home / "hf_datasets"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "RAY_DEDUP_LOGS": "0",
    }
    cluster = LocalRayCluster(node_env)
    started = time.perf_counter()
    seconds: list[float] = []
    try:
        cluster.start_node(NODE_CPUS, NODE_GPUS)  # the head
        cluster.start_node(NODE_CPUS, NODE_GPUS)  # the second node
        assert len(cluster.processes()) > 0  # the tag finds the nodes: the leftover check below has teeth

        # ---- five steps, a checkpoint at step 5 ----
        t0 = time.perf_counter()
        m1 = tmp_path / "m1.jsonl"
        out = run_main_ppo(
            RECIPE,
            home,
            runs,
            m1,
            _overrides(cluster.address, m1, STEPS),
            timeout=LAUNCH_TIMEOUT,
            env=cluster.client_env,
        )
        seconds.append(time.perf_counter() - t0)
        assert "tool initialised (separate, 2 ranks)" in out
        actor_nodes, tool_nodes = _placement(out)
        print(f"placement: actor ranks on {actor_nodes}, tool ranks on {tool_nodes}")
        assert len(actor_nodes) == 2 and len(set(actor_nodes)) == 2, f"actor ranks: {actor_nodes}"
        assert len(tool_nodes) == 2 and len(set(tool_nodes)) == 2, f"tool ranks: {tool_nodes}"
        metrics = read_metrics(m1)
        assert sorted(metrics) == list(range(1, STEPS + 1))
        for step, m in metrics.items():
            # sampling at temperature 1 from the warm-started policy: 0-0.06 unparseable measured
            assert m["grto/unparseable_fraction"] < 0.9, f"step {step}: too few parseable rollouts to train the tool"
            assert m["grto/tool/skipped"] == 0.0, f"step {step}: tool step skipped"
            assert np.isfinite(m["grto/tool/loss"]) and m["grto/tool/grad_norm"] > 0 and m["actor/grad_norm"] > 0
            # the tool's update was submitted before the actor's and collected after it
            assert "timing_s/update_tool_submit" in m and "timing_s/update_tool" in m
            _check_tool_in_sync(m, step)

        run_dir = runs / RECIPE
        step_dir = run_dir / f"global_step_{STEPS}"
        actor_files = sorted(p.name for p in (step_dir / "actor").glob("*.pt"))
        for kind in ("model", "optim", "extra_state"):  # one FSDP shard per actor rank
            assert [f for f in actor_files if f.startswith(kind)] == [
                f"{kind}_world_size_2_rank_{r}.pt" for r in (0, 1)
            ], actor_files
        for name in ("model.safetensors", "optimizer.pt", "rng.pt", "config.json"):
            assert (step_dir / "tool" / name).is_file(), name
        assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)

        # the tool adapted over the five steps (losses measured on this recipe: 0.67 at step 1, 0.54 / 0.49
        # at steps 4-5)
        first, last = metrics[1]["grto/tool/loss"], np.mean([metrics[s]["grto/tool/loss"] for s in (STEPS - 1, STEPS)])
        assert last < first, f"tool loss did not fall over {STEPS} steps: {first:.3f} -> {last:.3f}"
    finally:
        cluster.stop()
        leftover = cluster.processes()
        each = ", ".join(f"{s:.0f}" for s in seconds)
        print(f"multinode test: {len(seconds)} launches in {time.perf_counter() - started:.0f} s ({each} s)")
    assert not leftover, f"processes of the cluster left running: {leftover}"
