"""The tool in its own resource pool: real Ray workers (CPU, gloo, logical GPUs) built by verl's
pool machinery answer the same calls as the colocated actor group, and stay in sync."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from tool_helpers import make_batch, shape_scene
from verl.single_controller.ray import RayWorkerGroup

from verl_grto.assets.build import build_tiny_sam2
from verl_grto.data.masks import decode_rle
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.pool import (
    TOOL_POOL,
    TOOL_ROLE,
    create_tool_worker_group,
    register_tool_pool,
    tool_update_async,
    worker_nodes,
)
from verl_grto.tool.worker import ToolSettings, fingerprint_metrics

#: The Ray tests start worker processes that each import verl, torch and transformers (~20 s each on
#: the shared 2-core test machine): marked like the repo's other slow, multi-process tests.
slow = pytest.mark.e2e


@pytest.fixture(scope="module")
def local_ray():
    # logical GPUs: one per tool worker (the CPU platform's Ray resource is "GPU"); VERL_PLATFORM
    # keeps the workers on the CPU platform even on a host with a real GPU
    ray.init(
        num_cpus=4,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> ToolSettings:
    path = build_tiny_sam2(tmp_path_factory.mktemp("tiny_sam2"))
    return ToolSettings(path=str(path), lr=1e-3, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def tool_group(local_ray) -> RayWorkerGroup:
    """Two tool workers in a pool of their own, placed the way GRTOTrainer would place them: the
    pool registered in a ResourcePoolManager (as the trainer's would be), then the group in it.

    One group only: each worker process imports verl, torch and transformers (~20 s of CPU each,
    and verl's rendezvous task one more), which is most of this module's time."""
    from verl.single_controller.ray import ResourcePoolManager

    manager = ResourcePoolManager(resource_pool_spec={}, mapping={}, max_colocate_count=1)
    register_tool_pool(manager, n_gpus_per_node=2)
    manager.create_resource_pool()
    return create_tool_worker_group(resource_pool=manager.get_resource_pool(TOOL_ROLE), name_prefix="tooltest")


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        create_tool_worker_group()
    with pytest.raises(ValueError, match="at least|>= 1"):
        create_tool_worker_group(0)


class _StubGroup:
    """verl's bound group method is an instance of a class named after the actor method; a colocated
    (spawned) group binds ``tool_update`` to ``<role>_tool_update``."""

    world_size = 2

    def __init__(self, actor_method: str) -> None:
        self.tool_update = type(actor_method, (), {})()
        self.calls: list[tuple] = []

    def execute_all_async(self, method, *args):
        self.calls.append((method, *args))
        return ["ref0", "ref1"]


def test_register_tool_pool_adds_a_pool_to_the_trainers_manager():
    from verl.single_controller.ray import ResourcePoolManager

    spec, mapping = {"global_pool": [2]}, {"actor": "global_pool"}
    manager = ResourcePoolManager(resource_pool_spec=spec, mapping=mapping)
    register_tool_pool(manager, n_gpus_per_node=2, nnodes=2)
    assert spec == {"global_pool": [2], TOOL_POOL: [2, 2]} and mapping[TOOL_ROLE] == TOOL_POOL
    assert manager.get_n_gpus() == 6  # verl's throughput metrics divide by every pool's GPUs
    with pytest.raises(ValueError):
        register_tool_pool(manager, n_gpus_per_node=0)


def test_fingerprint_metrics_count_what_differs_between_ranks():
    same = [{"digest": "a", "step": 3, "node": "n0"}, {"digest": "a", "step": 3, "node": "n1"}]
    assert fingerprint_metrics(same) == {
        "grto/tool/ranks": 2.0,
        "grto/tool/distinct_weights": 1.0,
        "grto/tool/distinct_steps": 1.0,
        "grto/tool/nodes": 2.0,
    }
    drifted = [{"digest": "a", "step": 3, "node": "n0"}, {"digest": "b", "step": 2, "node": "n0"}]
    m = fingerprint_metrics(drifted)
    assert (m["grto/tool/distinct_weights"], m["grto/tool/distinct_steps"], m["grto/tool/nodes"]) == (2.0, 2.0, 1.0)


@pytest.mark.parametrize("actor_method", ["tool_update", "actor_rollout_tool_update"])
def test_tool_update_async_targets_the_actor_method(actor_method):
    group = _StubGroup(actor_method)
    batches = [ToolBatch([], [], [], []), ToolBatch([], [], [], [])]
    assert tool_update_async(group, batches, [[], []], loss_scale=0.5) == ["ref0", "ref1"]
    assert group.calls == [(actor_method, batches, [[], []], [0.5, 0.5])]  # lambda: one copy per rank
    with pytest.raises(ValueError, match="one batch and one weight list per rank"):
        tool_update_async(group, batches[:1], [[]])


@slow
def test_two_tool_workers_train_in_sync_and_checkpoint(tool_group, settings, tmp_path):
    start = time.monotonic()
    wg = tool_group
    assert wg.world_size == 2
    sizes = wg.init_tool(settings)
    assert len(sizes) == 2 and sizes[0] == sizes[1] > 0
    info = wg.tool_fingerprint()
    assert [i["rank"] for i in info] == [0, 1]
    assert {i["world_size"] for i in info} == {2} and {i["backend"] for i in info} == {"gloo"}
    assert {i["device"] for i in info} == {"cpu"}
    assert info[0]["digest"] == info[1]["digest"]  # same checkpoint, same weights
    assert [i["node"] for i in info] == worker_nodes(wg) and len(info[0]["node"]) > 0  # one local Ray node
    initial = info[0]["digest"]

    rng = np.random.default_rng(0)
    scenes = [shape_scene(rng, 96, 128) for _ in range(3)]
    # rank 0 gets two images, rank 1 one: different shards, so only the all-reduce keeps them equal
    batches = [make_batch(scenes[:2], rng, prefix="a"), make_batch(scenes[2:], rng, prefix="b")]

    wg.tool_begin_step()
    scores = wg.tool_predict(batches, [[0], []], [False, False])
    assert [s.num_rollouts for s in scores] == [4, 2]
    assert [len(s.intersection) for s in scores] == [4, 2] and all(s.fill_intersection is None for s in scores)
    assert list(scores[0].masks) == [0] and scores[1].masks == {}  # masks only where asked, as RLE
    assert decode_rle(scores[0].masks[0]).shape == (96, 128)

    refs = tool_update_async(wg, batches, [[1.0] * 4, [1.0] * 2])  # what the trainer overlaps with the actor
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    metrics = ray.get(refs)
    assert [m["skipped"] for m in metrics] == [0.0, 0.0]
    assert metrics[0]["grad_norm"] == metrics[1]["grad_norm"]  # the norm of the averaged gradient
    after = wg.tool_fingerprint()
    assert after[0]["digest"] == after[1]["digest"] != initial
    assert [i["step"] for i in after] == [1, 1]

    ckpt = str(tmp_path / "tool")
    wg.tool_save(ckpt)
    saved = after[0]["digest"]
    # the blocking call, as the trainer makes it today
    second = wg.tool_update(batches, [[1.0] * 4, [1.0] * 2])
    assert [m["skipped"] for m in second] == [0.0, 0.0]
    moved = wg.tool_fingerprint()
    assert moved[0]["digest"] == moved[1]["digest"] != saved
    assert wg.tool_load(ckpt) == [1, 1]
    restored = wg.tool_fingerprint()
    assert [i["digest"] for i in restored] == [saved, saved]
    assert wg.tool_settings()[0]["lr"] == settings.lr
    print(f"2-worker group: {time.monotonic() - start:.1f} s after start-up")
