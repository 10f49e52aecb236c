"""Every change this plugin makes to verl internals, in one place.

verl is never forked: where verl 0.9.1 has no extension point for what a CPU
run needs, a narrow wrapper is installed here, and each names the verl file
and line it works around. ``apply()`` refuses an untested verl version with a
clear error (set ``VERL_GRTO_ALLOW_UNTESTED_VERL=1`` to try anyway); the tests
in tests/test_patches.py cover each patch.

Besides the patches, the other places where verl-grto reads or writes verl's
private state live here too, behind the same version guard: the CPU engines'
registration (:func:`register_cpu_fsdp_engines`), the rollout server-adapter
table (:func:`register_rollout_server_adapter`) and the actor-side names of a
worker group's methods (:func:`worker_group_method_name`).
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

#: verl versions these patches were written against and tested with.
TESTED_VERL_VERSIONS = ("0.9.1",)
#: torch versions (major.minor) the nested-tensor patch was tested with: it exists because of how
#: torch builds jagged nested tensors (see :func:`_jagged_dim_aware_nested_tensors`).
TESTED_TORCH_VERSIONS = ("2.14",)

_applied: list[str] = []


class UntestedVerlVersionError(RuntimeError):
    pass


def check_verl_version(version: str) -> None:
    """Raise unless ``version`` is one the patches were tested on (or the override is set)."""
    if version in TESTED_VERL_VERSIONS:
        return
    if os.environ.get("VERL_GRTO_ALLOW_UNTESTED_VERL") == "1":
        logger.warning(
            "verl-grto: verl %s is untested (tested: %s); patches applied anyway", version, TESTED_VERL_VERSIONS
        )
        return
    raise UntestedVerlVersionError(
        f"verl-grto patches verl internals and was tested with verl {', '.join(TESTED_VERL_VERSIONS)}, "
        f"but verl {version} is installed. Install a tested version (pip install 'verl==0.9.1') "
        "or set VERL_GRTO_ALLOW_UNTESTED_VERL=1 to try at your own risk."
    )


def _guard() -> None:
    """The version guard, for the functions below that touch verl's internals outside ``apply()``."""
    import verl

    check_verl_version(verl.__version__)


def check_torch_version(version: str) -> bool:
    """Whether the nested-tensor patch was tested on torch ``version`` (False: a warning is logged).

    Why only a warning, unlike verl's guard: the patch builds the tensor verl means to build through
    torch's public ``nested_tensor_from_jagged(..., jagged_dim=...)``, so it is right on any torch that
    has that argument (``pyproject.toml`` allows torch >= 2.6); what is untested elsewhere is only
    whether verl's own function would also have worked. A torch without ``jagged_dim`` is refused."""
    import inspect

    import torch

    if "jagged_dim" not in inspect.signature(torch.nested.nested_tensor_from_jagged).parameters:
        raise RuntimeError(
            f"verl-grto needs torch.nested.nested_tensor_from_jagged(jagged_dim=...), which torch {version} lacks"
        )
    if ".".join(version.split("+")[0].split(".")[:2]) in TESTED_TORCH_VERSIONS:
        return True
    logger.warning(
        "verl-grto: torch %s is untested with the nested-tensor patch (tested: %s); applied anyway",
        version,
        TESTED_TORCH_VERSIONS,
    )
    return False


def _gloo_only_process_group() -> None:
    """verl/utils/distributed.py:89 (initialize_global_process_group_ray) builds the backend
    string ``f"cpu:gloo,{device}:{backend}"``; on CPU that is "cpu:gloo,cpu:gloo" and torch
    raises "Duplicate device type cpu". On CPU, use plain "gloo"; elsewhere unchanged.
    engine_workers.py imports the function by name, so its binding is replaced too."""
    import sys

    import verl.utils.distributed as dist_utils

    original = dist_utils.initialize_global_process_group_ray
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second: Any = None, backend: str | None = None) -> Any:
        from verl.utils.device import get_device_name

        if backend is None and get_device_name() == "cpu":
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    dist_utils.initialize_global_process_group_ray = initialize_global_process_group_ray
    for module_name in ("verl.workers.engine_workers",):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "initialize_global_process_group_ray"):
            module.initialize_global_process_group_ray = initialize_global_process_group_ray
    _applied.append("distributed.initialize_global_process_group_ray: gloo on CPU")


def _unpinned_cpu_offload_for_reference() -> None:
    """verl/workers/engine/fsdp/transformer_impl.py:462 forces
    ``CPUOffloadPolicy(pin_memory=True)`` on forward-only engines (the reference model);
    pinning host memory needs a CUDA driver ("Found no NVIDIA driver"). On CPU the
    parameters already live in host memory: keep the policy, drop the pinning."""
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    original = fsdp_impl.CPUOffloadPolicy
    if original is None or getattr(original, "__verl_grto_patched__", False):
        return

    class CPUOffloadPolicy(original):  # type: ignore[misc, valid-type]
        __verl_grto_patched__ = True

        def __init__(self, pin_memory: bool = True, **kwargs: Any) -> None:
            from verl.utils.device import get_device_name

            super().__init__(pin_memory=pin_memory and get_device_name() != "cpu", **kwargs)

    fsdp_impl.CPUOffloadPolicy = CPUOffloadPolicy
    _applied.append("fsdp.transformer_impl.CPUOffloadPolicy: no pinned memory on CPU")


def _merged_lora_sync_in_compute_dtype() -> None:
    """verl/workers/engine/fsdp/transformer_impl.py:1082 (FSDPEngine._merged_lora_per_tensor_param)
    casts every merged LoRA weight to bf16 before the rollout gets it (``model.lora.merge=True``).
    A rollout that serves the model in fp32 (the ``hf`` server on CPU, whose actor computes in fp32)
    then samples from bf16-rounded weights, and its log-probs drift from the actor's by ~1e-2. Cast
    to the actor's compute dtype instead (``fsdp_config.mixed_precision.param_dtype``, which the engine
    keeps as ``_autocast_dtype``): bf16 unless a recipe says otherwise, i.e. unchanged on GPU. The
    tensors are copies, as verl's cast made them (at world size 1 ``full_tensor()`` is the live
    parameter, restored to its unmerged value when the merge context exits). The rest of the method
    is verl's, line for line."""
    import torch
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    engine_cls = fsdp_impl.FSDPEngine
    original = engine_cls._merged_lora_per_tensor_param
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def _merged_lora_per_tensor_param(self: Any) -> Any:
        from torch.distributed.tensor import DTensor

        dtype = getattr(self, "_autocast_dtype", None) or torch.bfloat16
        device = fsdp_impl.get_device_id()
        try:
            with fsdp_impl.merged_lora_context(self.module, backup_adapters=True):
                params = fsdp_impl.normalize_peft_param_name(self.module.state_dict())
                params = fsdp_impl.convert_weight_keys(
                    params, getattr(self.module, "_fsdp_wrapped_module", self.module)
                )
                for name, param in params.items():
                    yield (
                        name,
                        # copy=True: at world size 1 full_tensor() is the live parameter, which the
                        # context restores to the unmerged weights on exit (verl's bf16 cast copied)
                        param.to(device, non_blocking=True).full_tensor().to(dtype, copy=True)
                        if isinstance(param, DTensor)
                        else param.detach().clone(),
                    )
        finally:
            if self._is_offload_param:
                fsdp_impl.offload_fsdp_model_to_cpu(self.module)

    _merged_lora_per_tensor_param.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    engine_cls._merged_lora_per_tensor_param = _merged_lora_per_tensor_param
    _applied.append("fsdp.transformer_impl.FSDPEngine._merged_lora_per_tensor_param: the actor's compute dtype")


def _jagged_dim_aware_nested_tensors() -> None:
    """verl/utils/tensordict_utils.py:162 (nested_tensor_from_tensor_list) concatenates
    samples along ``ragged_idx - 1`` but builds the nested tensor without telling torch
    which dimension is jagged, then sets ``_ragged_idx`` afterwards. With torch 2.14 the
    shape is fixed at construction, so Qwen2.5-VL's (4, seq) mrope position ids come
    back as (B, j, 4*...) and the first mini-batch split fails in ``split_with_sizes``.
    Passing ``jagged_dim`` builds the same tensor verl intends. Depends on torch's
    behaviour: :func:`check_torch_version` (tested: :data:`TESTED_TORCH_VERSIONS`)."""
    import sys

    import torch
    import verl.utils.tensordict_utils as td_utils

    check_torch_version(torch.__version__)

    original = td_utils.nested_tensor_from_tensor_list
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def nested_tensor_from_tensor_list(tensors: list[torch.Tensor], ragged_idx: int | None = None) -> torch.Tensor:
        sample_dim = tensors[0].dim()
        ragged_idx = sample_dim if ragged_idx is None else ragged_idx
        if sample_dim == 1 or ragged_idx == 1:
            return original(tensors, ragged_idx=ragged_idx)
        assert 1 <= ragged_idx <= sample_dim, f"ragged_idx must be in [1, {sample_dim}], got {ragged_idx}"
        cat_dim = ragged_idx - 1
        values = torch.cat(tensors, dim=cat_dim)
        lengths = torch.tensor([t.shape[cat_dim] for t in tensors], dtype=torch.long, device=values.device)
        offsets = torch.zeros(len(tensors) + 1, dtype=torch.long, device=values.device)
        torch.cumsum(lengths, dim=0, out=offsets[1:])
        return torch.nested.nested_tensor_from_jagged(values=values, offsets=offsets, jagged_dim=ragged_idx)

    nested_tensor_from_tensor_list.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    td_utils.nested_tensor_from_tensor_list = nested_tensor_from_tensor_list
    dataset_utils = sys.modules.get("verl.utils.dataset.dataset_utils")
    if dataset_utils is not None:
        dataset_utils.nested_tensor_from_tensor_list = nested_tensor_from_tensor_list
    _applied.append("tensordict_utils.nested_tensor_from_tensor_list: jagged_dim for (4, seq) position ids")


def _rebuild_equal_length_position_ids() -> None:
    """verl/utils/tensordict_utils.py:910 (maybe_fix_3d_position_ids) sets ``_ragged_idx = 2``
    on every 3-D nested ``position_ids`` to undo a pickling bug. But when every sequence
    of a batch has the same length (common at the start of RL: every response hits
    max length), TransferQueue's stacking makes the *first* dim the jagged one (values
    (B*4, L)), and forcing ``_ragged_idx = 2`` corrupts it. Decide from the stored
    layout which dimension is jagged and rebuild the tensor with jagged dim 2."""
    import sys

    import torch
    import verl.utils.tensordict_utils as td_utils

    original = td_utils.maybe_fix_3d_position_ids
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def maybe_fix_3d_position_ids(data: Any) -> None:
        if "position_ids" not in data.keys():  # noqa: SIM118  (a TensorDict)
            return
        pos = data["position_ids"]
        if not (isinstance(pos, torch.Tensor) and pos.is_nested and pos.dim() == 3):
            return
        values, total = pos.values(), int(pos.offsets()[-1])
        if values.dim() == 2 and values.shape[0] == total and values.shape[1] != total:
            # jagged along dim 1: each component is (4, L); re-nest with the sequence jagged
            pieces = list(pos.unbind())
            data["position_ids"] = td_utils.nested_tensor_from_tensor_list(pieces, ragged_idx=2)
        else:
            original(data)

    maybe_fix_3d_position_ids.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    td_utils.maybe_fix_3d_position_ids = maybe_fix_3d_position_ids
    for name in ("verl.workers.engine_workers", "verl.workers.engine.base", "verl.workers.engine_workers_tinker"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "maybe_fix_3d_position_ids"):
            module.maybe_fix_3d_position_ids = maybe_fix_3d_position_ids
    _applied.append("tensordict_utils.maybe_fix_3d_position_ids: equal-length batches")


#: verl's checkpoint tracker: resume reads the step of the newest complete checkpoint from it.
TRACKER_NAME = "latest_checkpointed_iteration.txt"


class _AtomicTrackerFile:
    """A text file written under a temporary name and renamed onto the tracker on close."""

    def __init__(self, path: str) -> None:
        import tempfile

        directory = os.path.dirname(path) or "."
        fd, self._tmp = tempfile.mkstemp(prefix=f".{TRACKER_NAME}.", suffix=".tmp", dir=directory)
        self._path = path
        self._file = os.fdopen(fd, "w")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def __enter__(self) -> _AtomicTrackerFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from verl_grto.faults import kill_point

        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is not None:
            os.unlink(self._tmp)
            return
        kill_point("checkpoint.tracker_unpublished")  # the step folder is whole, the tracker not yet moved
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._path)
        directory = os.open(os.path.dirname(self._path) or ".", os.O_RDONLY)
        try:  # the rename itself survives a power cut or a lost node, not only a killed process
            os.fsync(directory)
        finally:
            os.close(directory)


def _atomic_checkpoint_tracker(module_name: str = "verl.trainer.ppo.v1.trainer_base") -> None:
    """verl/trainer/ppo/v1/trainer_base.py:1024 (``_save_checkpoint``, also
    verl/trainer/ppo/ray_trainer.py:1049) writes ``latest_checkpointed_iteration.txt`` with
    ``open(path, "w")``: the file is truncated first, so a kill between the truncation and the write
    leaves it empty and every restart then fails in ``find_latest_ckpt_path``
    (verl/utils/checkpoint/checkpoint_manager.py:245, ``int(b"")``). The tracker is the commit point of a
    checkpoint (it is written after the step folder is whole), so it must change in one step. Each of
    those two modules (``module_name``; :data:`_TRACKER_WRITERS`) gets its own ``open`` that writes the
    tracker to a temporary file and renames it onto the tracker; any other ``open`` there is the builtin."""
    import builtins
    import importlib

    module = importlib.import_module(module_name)
    if getattr(module.__dict__.get("open"), "__verl_grto_patched__", False):
        return

    def tracker_aware_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "w" and not args and not kwargs and os.path.basename(str(file)) == TRACKER_NAME:
            return _AtomicTrackerFile(str(file))
        return builtins.open(file, mode, *args, **kwargs)

    tracker_aware_open.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    module.open = tracker_aware_open  # type: ignore[attr-defined]
    _applied.append(f"{module_name.rsplit('.', 1)[-1]}: latest_checkpointed_iteration.txt written atomically")


#: The modules whose ``open`` writes verl's checkpoint tracker (:func:`_atomic_checkpoint_tracker`).
_TRACKER_WRITERS = ("verl.trainer.ppo.v1.trainer_base", "verl.trainer.ppo.ray_trainer")


#: verl/trainer/main_ppo.py, the file whose ``TaskRunnerV1.run`` dumps the resolved config.
_MAIN_PPO_FILE = os.path.join("verl", "trainer", "main_ppo.py")
RESOLVED_CONFIG_NAME = "resolved_config.yaml"


def _called_from_task_runner(depth: int = 2) -> bool:
    import sys

    code = sys._getframe(depth).f_code
    return code.co_name == "run" and code.co_filename.endswith(_MAIN_PPO_FILE)


def pprint_config_to_file(obj: Any, *args: Any, **kwargs: Any) -> None:
    """``pprint.pprint``, except for verl's config dump: see ``_config_dump_to_file``."""
    import pprint as pprint_module

    from verl_grto.console import verbose

    is_config = isinstance(obj, dict) and isinstance(obj.get("trainer"), dict)
    if verbose() or not is_config or args or kwargs or not _called_from_task_runner():
        pprint_module.PrettyPrinter(*args, **kwargs).pprint(obj)
        return
    from omegaconf import OmegaConf

    from verl_grto.atomic import atomic_file

    out = os.path.join(str(obj["trainer"].get("default_local_dir") or "."), RESOLVED_CONFIG_NAME)
    text = OmegaConf.to_yaml(OmegaConf.create(obj))
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    print(
        f"verl config (resolved, {text.count(chr(10))} lines) written to {os.path.abspath(out)}; "
        "VERL_GRTO_VERBOSE=1 prints it here",
        flush=True,
    )


def _config_dump_to_file() -> None:
    """verl/trainer/main_ppo.py:144 (``TaskRunnerV1.run``) pprints the whole resolved config: about
    960 of the ~1700 lines a tiny CPU run prints. It is written to
    ``<trainer.default_local_dir>/resolved_config.yaml`` instead, with one line naming the file.

    main_ppo.py:16 binds ``from pprint import pprint`` when it is imported, and importing it always
    imports the ``verl`` package first, which loads this plugin: so the function installed here
    at ``pprint.pprint`` is the one that module binds (in the driver and in the task runner's Ray
    worker). It acts only on a config dict printed from a function ``run`` in verl's main_ppo.py;
    every other call is the standard ``pprint.pprint``."""
    import pprint as pprint_module

    if pprint_module.pprint is pprint_config_to_file:
        return
    pprint_module.pprint = pprint_config_to_file
    _applied.append("main_ppo.TaskRunnerV1.run: resolved config to a file, one line on the console")


class _Ready:
    """An awaitable that is already done: what :class:`InProcessActor` returns for a plain method."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value
        yield  # noqa: RET503  (makes this a generator: ``await`` needs one)


class _InProcessMethod:
    def __init__(self, owner: InProcessActor, name: str) -> None:
        self._owner, self._name = owner, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        import inspect

        method = getattr(self._owner._instance(), self._name)
        if inspect.iscoroutinefunction(method):
            return method(*args, **kwargs)  # the caller awaits it
        return _Ready(method(*args, **kwargs))  # runs now: a fire-and-forget call still happens


class InProcessActor:
    """A stand-in for a Ray actor handle whose actor lives inside each process that calls it.

    ``InProcessActor(cls, *args, **kwargs).method.remote(...)`` calls ``method`` on one ``cls(*args,
    **kwargs)`` made on first use in the calling process. A coroutine method returns its coroutine (the
    caller awaits it, as it would await an ``ObjectRef``); a plain method runs at once and returns an
    awaitable of its result, so fire-and-forget calls still take effect. The handle pickles as
    ``(cls, args, kwargs)``: each process it is sent to makes its own instance.

    Why: on CPU every Ray actor is a process importing torch, transformers and verl (0.6 GiB of PSS
    each, docs/benchmarks.md, "Main job memory"). Two of verl's side actors hold no state that must be
    shared between processes in a CPU run: the reward-loop worker (a reward function) and the load
    balancer in front of a single rollout server. Only for ``await``-style callers (verl's agent loop
    and LLM server client); ``ray.get`` on its results is not supported.
    """

    def __init__(self, cls: type, *args: Any, **kwargs: Any) -> None:
        self._cls, self._args, self._kwargs = cls, args, kwargs
        self._obj: Any = None

    def _instance(self) -> Any:
        if self._obj is None:
            self._obj = self._cls(*self._args, **self._kwargs)
        return self._obj

    def __getattr__(self, name: str) -> _InProcessMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _InProcessMethod(self, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_in_process_actor, (self._cls, self._args, self._kwargs))

    def __repr__(self) -> str:
        return f"InProcessActor({self._cls.__name__})"


def _rebuild_in_process_actor(cls: type, args: tuple, kwargs: dict) -> InProcessActor:
    return InProcessActor(cls, *args, **kwargs)


def _in_process_reward_workers() -> None:
    """verl/experimental/reward_loop/reward_loop.py:324 (``RewardLoopManager._init_reward_loop_workers``)
    starts ``reward.num_workers`` ``RewardLoopWorker`` actors, one process each; 0 leaves an empty list,
    on which the agent loop's ``random.choice`` (verl/experimental/agent_loop/agent_loop.py:1025) fails.
    With ``reward.num_workers: 0`` and no reward model, the one "worker" is an :class:`InProcessActor`:
    each agent-loop worker scores its own rollouts with verl's ``RewardLoopWorker``, in its own process.
    Only ``compute_score`` (awaited by the agent loop) is called on it while rewards stream; the
    trainer's colocated path (``compute_rm_score``), which ``ray.get``s, is used only with a colocated
    reward model, which this refuses."""
    import verl.experimental.reward_loop.reward_loop as reward_loop

    manager = reward_loop.RewardLoopManager
    original = manager._init_reward_loop_workers
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def _init_reward_loop_workers(self: Any) -> None:
        if int(self.config.reward.num_workers) != 0:
            return original(self)
        if self.config.reward.reward_model.enable:
            raise ValueError(
                "reward.num_workers: 0 (rewards in the agent-loop workers) needs reward.reward_model.enable: false"
            )
        self.reward_loop_workers = [
            InProcessActor(reward_loop.RewardLoopWorker, self.config, self.reward_router_address)
        ]
        return None

    _init_reward_loop_workers.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    manager._init_reward_loop_workers = _init_reward_loop_workers
    _applied.append("reward_loop.RewardLoopManager: reward.num_workers 0 scores in the agent-loop workers")


def _in_process_load_balancer_for_one_server() -> None:
    """verl/workers/rollout/router.py:397 (``get_router_handle``) always starts the
    ``GlobalRequestLoadBalancer`` as a Ray actor (router.py:322), one process routing requests among
    the rollout servers. With a single server every request goes to it, whatever the routing state, so
    on the CPU platform, with one server and verl's default balancer (no ``router_config_path``, no
    custom class), each caller gets an :class:`InProcessActor` of the same class instead."""
    import verl.workers.rollout.router as router

    original = router.get_router_handle
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def get_router_handle(
        servers: dict[str, Any],
        router_config_path: str | None = None,
        full_determinism: bool = False,
        load_balancer_cls: type | None = None,
    ) -> Any:
        from verl.utils.device import get_device_name

        if len(servers) == 1 and not router_config_path and load_balancer_cls is None and get_device_name() == "cpu":
            return InProcessActor(
                router.GlobalRequestLoadBalancer,
                servers=servers,
                max_cache_size=router.DEFAULT_ROUTING_CACHE_SIZE,
                full_determinism=full_determinism,
            )
        return original(servers, router_config_path, full_determinism, load_balancer_cls)

    get_router_handle.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    router.get_router_handle = get_router_handle
    _applied.append("router.get_router_handle: one server on CPU, balanced in the calling process")


#: The recipe key that runs verl's task runner in the driver process (cpu_base.yaml sets it).
TASK_RUNNER_IN_DRIVER_KEY = "task_runner_in_driver"


class _InDriverHandle:
    """What ``task_runner_class.remote()`` returns in the driver: ``handle.run.remote(config)`` runs the
    task runner's ``run`` right here and returns an ``ObjectRef`` of its result, so verl's ``ray.get``
    waits as it would on the actor."""

    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from types import SimpleNamespace

        import ray

        method = getattr(self._instance, name)
        return SimpleNamespace(remote=lambda *args, **kwargs: ray.put(method(*args, **kwargs)))


class _InDriverActorClass:
    """A stand-in for verl's ``@ray.remote`` task-runner class: ``.remote()`` builds the class itself in
    this process, with the job's runtime-env variables in ``os.environ`` (what Ray gives the actor)."""

    def __init__(self, actor_class: Any) -> None:
        self._cls = actor_class.__ray_actor_class__

    def options(self, **_: Any) -> _InDriverActorClass:  # verl passes only nsight profiler options
        return self

    def remote(self) -> _InDriverHandle:
        import ray

        take_task_runner_environment(ray.get_runtime_context().runtime_env.get("env_vars") or {})
        return _InDriverHandle(self._cls())


#: Variables a module reads once, when imported, and where it keeps them (verl's main_ppo imports these
#: modules before the plugin loads): transfer_queue 0.1.11 client.py:42 and storage/simple_storage.py:73.
#: Ray pickles the ``@ray.remote`` storage class by value, so its actors carry the creating process's value.
_READ_AT_IMPORT = {"TQ_NUM_THREADS": ("transfer_queue.client", "transfer_queue.storage.simple_storage")}


def take_task_runner_environment(env_vars: dict[str, Any]) -> None:
    """Give the driver what Ray gives the task-runner actor: the job's runtime-env variables, in
    ``os.environ`` for what is read from now on, re-read where a loaded module keeps an import-time copy
    (``_READ_AT_IMPORT``), and glibc's arena cap (``MALLOC_ARENA_MAX``, read at process start) through
    ``mallopt``."""
    for key, value in env_vars.items():
        os.environ[str(key)] = str(value)
        for module_name in _READ_AT_IMPORT.get(str(key), ()):
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, key):
                setattr(module, key, type(getattr(module, key))(value))  # as the module parsed it
    if "MALLOC_ARENA_MAX" in env_vars:
        from verl_grto.platform.cpu import cap_malloc_arenas

        cap_malloc_arenas(int(env_vars["MALLOC_ARENA_MAX"]))


def _task_runner_in_driver(main_ppo: Any) -> None:
    """verl/trainer/main_ppo.py:92 (``run_ppo``) starts ``TaskRunnerV1`` as a Ray actor and waits for it:
    the driver (``python -m verl.trainer.main_ppo``) and the task runner are two processes that each
    import verl, torch and transformers (0.71 GiB of PSS each in the tiny CPU run, docs/benchmarks.md,
    "Main job memory"), and the driver does nothing but wait. With ``ray_kwargs.task_runner_in_driver``
    the task runner runs in the driver instead: one process, the same code, the same named actors
    (owned by the driver, which outlives them as the task runner did).

    ``main_ppo`` is either the imported module or ``__main__`` when verl's entry point runs as
    ``python -m`` (its functions look ``run_ppo`` up in that module's globals at call time)."""
    original = main_ppo.run_ppo
    if getattr(original, "__verl_grto_patched__", False):
        return

    @functools.wraps(original)
    def run_ppo(config: Any, task_runner_class: Any) -> Any:
        if config.get("ray_kwargs", {}).get(TASK_RUNNER_IN_DRIVER_KEY, False):
            task_runner_class = _InDriverActorClass(task_runner_class)
        return original(config, task_runner_class)

    run_ppo.__verl_grto_patched__ = True  # type: ignore[attr-defined]
    main_ppo.run_ppo = run_ppo
    _applied.append("main_ppo.run_ppo: ray_kwargs.task_runner_in_driver runs the task runner in the driver")


#: ``python -m verl.trainer.main_ppo`` runs verl's file as ``__main__``: no import hook sees it finish.
_MAIN_PPO_MODULE = "verl.trainer.main_ppo"


def task_runner_in_driver_for_main() -> None:
    """Install :func:`_task_runner_in_driver` on ``__main__``, which the caller has found to be verl's
    ``main_ppo`` (the recipes' Hydra search-path plugin, while Hydra composes the config: after the whole
    file has run, before its ``main`` calls ``run_ppo``)."""
    main = sys.modules["__main__"]
    if hasattr(main, "run_ppo"):
        _task_runner_in_driver(main)


def register_cpu_fsdp_engines() -> list[str]:
    """Register verl's FSDP engines for the CPU device; returns what is registered.

    verl registers them for cuda/npu only (verl/workers/engine/fsdp/transformer_impl.py:1143, :1594);
    the same classes run on CPU. ``EngineRegistry.register`` (verl/workers/engine/base.py:351) asserts
    that a key is new (base.py:389) and verl has no lookup that says whether it is, so its private
    table ``EngineRegistry._engines`` (base.py:348) is read to register once per process."""
    _guard()
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    names = []
    for model_type, engine_cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("fsdp2", {}):
            EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(engine_cls)
        names.append(f"{model_type}/fsdp2@cpu")
    return names


def register_rollout_server_adapter(name: str, fqdn: str) -> None:
    """Make ``rollout.name: <name>`` find its server adapter, the class at ``fqdn`` (module.Class).

    verl/workers/rollout/base.py:89: the server-adapter table ``_ROLLOUT_REGISTRY``, which
    ``get_rollout_class`` (base.py:96-110) reads, has no register function; the entry is written
    into it. (The replica has a public registry, ``RolloutReplicaRegistry.register``.)"""
    _guard()
    from verl.workers.rollout import base as rollout_base

    rollout_base._ROLLOUT_REGISTRY[(name, "async")] = fqdn


def worker_group_method_name(worker_group: Any, method: str) -> str:
    """The actor-side name of a worker-group method: ``method`` itself on a group of one worker class,
    ``<role>_<method>`` on a colocated group built by verl's ``create_colocated_worker_cls`` / ``spawn``.

    Why: ``execute_all_async`` needs the actor-side name, which verl exposes nowhere; its
    ``func_generator`` (verl/single_controller/ray/base.py:49-67) names each bound method's class
    after the actor method it calls, so the name is read from there."""
    _guard()
    bound = getattr(worker_group, method)
    name = type(bound).__name__
    return name if name.endswith(method) else method


#: Each patch and the verl module it changes: :func:`apply_when_imported` installs it right after verl
#: imports that module (so a process that never imports it never pays for importing it).
_PATCHES: tuple[tuple[str, Any], ...] = (
    ("verl.utils.distributed", lambda module: _gloo_only_process_group()),
    ("verl.workers.engine.fsdp.transformer_impl", lambda module: _unpinned_cpu_offload_for_reference()),
    ("verl.workers.engine.fsdp.transformer_impl", lambda module: _merged_lora_sync_in_compute_dtype()),
    ("verl.utils.tensordict_utils", lambda module: _jagged_dim_aware_nested_tensors()),
    ("verl.utils.tensordict_utils", lambda module: _rebuild_equal_length_position_ids()),
    *((name, lambda module: _atomic_checkpoint_tracker(module.__name__)) for name in _TRACKER_WRITERS),
    ("pprint", lambda module: _config_dump_to_file()),
    ("verl.experimental.reward_loop.reward_loop", lambda module: _in_process_reward_workers()),
    ("verl.workers.rollout.router", lambda module: _in_process_load_balancer_for_one_server()),
    (_MAIN_PPO_MODULE, _task_runner_in_driver),
)


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module is first executed (a finder first on ``sys.meta_path``)."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Any]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, self.hooks.pop(fullname))
        return spec


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, hooks: list[Any]) -> None:
        self._loader, self._hooks = loader, hooks

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        for hook in self._hooks:
            hook(module)

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, get_resource_reader, ...
        return getattr(self._loader, name)


_post_import = _PostImportHooks()


def when_imported(module_name: str, hook: Any) -> None:
    """Call ``hook(module)`` right after ``module_name`` is first imported, or now if it already is.

    Why: the plugin is imported by every process of a run (verl's entry point), but most of what it
    patches and registers lives in modules only some processes import (the trainer in the task
    runner, the FSDP engines in the actor workers). Importing them all eagerly cost every process
    ~0.2 GiB (docs/benchmarks.md, "Main job memory"). A hook that raises fails the import it is
    attached to, naming the plugin's code, so a broken registration is not silent."""
    module = sys.modules.get(module_name)
    if module is not None and module_name not in _post_import.hooks:
        hook(module)
        return
    if _post_import not in sys.meta_path:
        sys.meta_path.insert(0, _post_import)
    _post_import.hooks.setdefault(module_name, []).append(hook)


def apply_when_imported() -> None:
    """Install each patch when verl imports the module it patches (what the plugin does in every process)."""
    import verl

    check_verl_version(verl.__version__)
    for module_name, patch in _PATCHES:
        when_imported(module_name, patch)


def apply() -> list[str]:
    """Install every patch now (importing what they patch); returns the names of all installed."""
    import importlib

    import verl

    check_verl_version(verl.__version__)
    for module_name, patch in _PATCHES:
        patch(importlib.import_module(module_name))
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)
