"""The SAM2 tool in its own verl resource pool, so its update can run while the actor updates.

Colocated (:class:`~verl_grto.tool.worker.ActorRolloutRefToolWorker`, the default) the tool shares
the actor's processes: a Ray actor runs one call at a time, so the tool update and the actor
update can only take turns. Here the tool gets processes (and, on GPU hosts, devices) of its own:

* :class:`ToolWorker` is a plain verl ``Worker`` hosting the same ``@register``-dispatched tool
  methods (:class:`~verl_grto.tool.worker.ToolWorkerMixin`); it initialises its *own*
  ``torch.distributed`` process group over the tool's ranks only (gloo on CPU, verl's
  ``cpu:gloo,<device>:<nccl>`` pair elsewhere), which the engine's gradient all-reduce uses.
* :func:`create_tool_worker_group` places those workers with verl's own machinery
  (``ResourcePoolManager`` / ``RayResourcePool`` -> ``RayClassWithInitArgs`` -> ``RayWorkerGroup``),
  either in a pool it creates or in one the trainer's ``ResourcePoolManager`` already holds
  (:func:`register_tool_pool`), so verl's up-front GPU accounting covers the tool too.
* :func:`tool_update_async` starts ``tool_update`` on every rank and returns Ray futures: submit
  it, run the actor update, ``ray.get`` the futures.

On CPU hosts a "GPU" in a pool is a *logical* Ray GPU, one per worker process (see
:mod:`verl_grto.platform.cpu`): Ray must be started with ``num_gpus`` covering the actor's pool
*and* the tool's.
"""

from __future__ import annotations

from typing import Any

import ray
from verl.single_controller.base import Worker
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, ResourcePoolManager

from verl_grto.patches import worker_group_method_name
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.worker import ToolWorkerMixin

#: Name of the tool's pool in a ``ResourcePoolManager``'s ``resource_pool_spec``.
TOOL_POOL = "tool_pool"
#: Key of the tool in a ``ResourcePoolManager``'s ``mapping`` (verl's ``Role`` enum has no tool role;
#: the manager only uses the key to look the pool up).
TOOL_ROLE = "tool"


def _process_group_backend() -> str | None:
    """gloo on the CPU platform; ``None`` (verl's ``cpu:gloo,<device>:<nccl>`` default) elsewhere.

    Passed explicitly rather than relying on the plugin's wrapper of
    ``initialize_global_process_group_ray`` (verl_grto.patches), so the group comes up even in a
    process where verl loaded plugins selectively."""
    from verl.utils.device import get_device_name

    return "gloo" if get_device_name() == "cpu" else None


class ToolWorker(Worker, ToolWorkerMixin):
    """The tool alone in a verl worker process (one rank of the tool's data-parallel group).

    ``Worker.__init__`` reads the rank, world size and rendezvous address ``RayWorkerGroup`` put in
    the environment; the process group built from them spans the tool's ranks only, never the
    actor's, so the tool's all-reduce cannot interleave with FSDP's collectives.
    """

    def __init__(self) -> None:
        Worker.__init__(self)
        import verl.utils.distributed as dist_utils

        dist_utils.initialize_global_process_group_ray(timeout_second=None, backend=_process_group_backend())
        from verl.utils.device import get_device_id, get_device_name, get_torch_device

        if get_device_name() != "cpu":
            get_torch_device().set_device(get_device_id())


def worker_nodes(worker_group: RayWorkerGroup) -> list[str]:
    """The Ray node id of each rank of ``worker_group`` (any verl worker group, colocated or not).

    Why: verl's resource pools place one placement group per entry of a pool's spec, and Ray decides
    which node each lands on; a run on several nodes logs where its ranks went, so a reader (and
    tests/test_e2e_multinode.py) can see that a pool really spans the nodes. Ray's ``__ray_call__``
    runs the function inside each actor, so this needs no method on the worker classes."""

    def node_id(_worker: Any) -> str:
        return ray.get_runtime_context().get_node_id()

    return ray.get([w.__ray_call__.remote(node_id) for w in worker_group.workers])


def register_tool_pool(resource_pool_manager: ResourcePoolManager, n_gpus_per_node: int, nnodes: int = 1) -> None:
    """Add the tool's pool to a trainer's ``ResourcePoolManager`` before ``create_resource_pool()``.

    Why through the trainer's manager: ``create_resource_pool`` checks that the Ray cluster holds
    the GPUs of *all* pools at once, so a cluster too small for actor + tool fails at start-up
    rather than hanging on a placement group. Then pass
    ``resource_pool_manager.get_resource_pool(TOOL_ROLE)`` to :func:`create_tool_worker_group`.
    """
    if n_gpus_per_node <= 0 or nnodes <= 0:
        raise ValueError(f"the tool pool needs >= 1 worker per node and >= 1 node, got {n_gpus_per_node} x {nnodes}")
    resource_pool_manager.resource_pool_spec[TOOL_POOL] = [n_gpus_per_node] * nnodes
    resource_pool_manager.mapping[TOOL_ROLE] = TOOL_POOL


def create_tool_worker_group(
    n_workers: int | None = None,
    *,
    nnodes: int = 1,
    resource_pool: RayResourcePool | None = None,
    name_prefix: str | None = None,
    device_name: str | None = None,
    worker_env: dict[str, str] | None = None,
) -> RayWorkerGroup:
    """Start :class:`ToolWorker` processes in a resource pool of their own; returns their group.

    Give either ``n_workers`` (per node, on ``nnodes`` nodes: a new pool is created with verl's
    ``ResourcePoolManager``, which checks the cluster has the GPUs) or ``resource_pool`` (one the
    trainer's manager created, see :func:`register_tool_pool`). Each worker takes one (logical on
    CPU) GPU bundle. ``name_prefix`` prefixes the Ray actor names, which must be unique among live
    actors (default: ``"tool"`` plus a random suffix). ``device_name`` defaults to verl's current
    platform; ``worker_env`` adds environment variables to the workers (e.g. ``OMP_NUM_THREADS``).

    The group answers the same calls as the colocated actor group: ``init_tool(settings)``,
    ``tool_begin_step()``, ``tool_predict([batch per rank])``, ``tool_update([batch per rank],
    [weights per rank])``, ``tool_save(dir)``, ``tool_load(dir)``, ``tool_settings()``, plus
    ``tool_fingerprint()``; the tool is built only by ``init_tool``.
    """
    from verl.single_controller.ray.base import get_random_string
    from verl.utils.device import get_device_name

    if (n_workers is None) == (resource_pool is None):
        raise ValueError("give exactly one of n_workers and resource_pool")
    if resource_pool is None:
        assert n_workers is not None
        if n_workers <= 0 or nnodes <= 0:
            raise ValueError(f"need >= 1 tool worker per node and >= 1 node, got {n_workers} x {nnodes}")
        # max_colocate_count=1: nothing else shares these bundles, and each bundle then reserves
        # 1 CPU instead of the manager's default 3 (RayResourcePool's own default is 10)
        manager = ResourcePoolManager(
            resource_pool_spec={TOOL_POOL: [n_workers] * nnodes}, mapping={TOOL_ROLE: TOOL_POOL}, max_colocate_count=1
        )
        manager.create_resource_pool()
        resource_pool = manager.get_resource_pool(TOOL_ROLE)
    kwargs: dict[str, Any] = {"device_name": device_name or get_device_name()}
    if worker_env:
        kwargs["worker_env"] = dict(worker_env)
    return RayWorkerGroup(
        resource_pool=resource_pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(ToolWorker)),
        name_prefix=name_prefix if name_prefix is not None else f"tool{get_random_string(6)}",
        **kwargs,
    )


def tool_update_async(
    worker_group: RayWorkerGroup, batches: list[ToolBatch], weights: list[list[float]], loss_scale: float = 1.0
) -> list[ray.ObjectRef]:
    """Start ``tool_update`` on every rank without waiting; ``ray.get`` the list for per-rank metrics.

    Why: the registered ``tool_update`` is blocking (``@register``'s default); verl's
    ``execute_all_async`` sends ``batches[i]`` and ``weights[i]`` to rank i (exactly what
    ``Dispatch.DP_COMPUTE`` does) and returns the futures. Calls a driver makes to the same Ray
    actor run in submission order, so several epochs, a ``tool_predict`` or a ``tool_save`` may be
    queued behind it. Overlap needs the tool in its own pool: on a colocated group the same
    processes would run the tool and the actor updates one after the other anyway. ``loss_scale``
    (lambda, ``ToolEngine.objective``) goes to every rank.
    """
    world = worker_group.world_size
    if len(batches) != world or len(weights) != world:
        raise ValueError(f"need one batch and one weight list per rank ({world}), got {len(batches)}, {len(weights)}")
    method = worker_group_method_name(worker_group, "tool_update")
    return worker_group.execute_all_async(method, batches, weights, [float(loss_scale)] * world)
