"""Each patch of verl internals (verl_grto/patches.py) does what its docstring says."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import verl  # noqa: F401  (loads the plugin, which applies the patches)
from tensordict import TensorDict

from verl_grto import patches


def test_all_patches_applied_once():
    applied = patches.apply()
    assert len(applied) == len(set(applied)) == 11
    assert patches.apply() == applied  # idempotent


def test_untested_verl_version_is_refused(monkeypatch):
    monkeypatch.delenv("VERL_GRTO_ALLOW_UNTESTED_VERL", raising=False)
    with pytest.raises(patches.UntestedVerlVersionError, match="0.9.1"):
        patches.check_verl_version("0.10.0")
    monkeypatch.setenv("VERL_GRTO_ALLOW_UNTESTED_VERL", "1")
    patches.check_verl_version("0.10.0")  # allowed with the override


def test_package_requires_exactly_the_tested_verl_versions():
    """pyproject.toml's verl bound and the patches' version guard agree: pip installs no verl that
    ``check_verl_version`` would then refuse, and refuses none it would accept."""
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (verl_req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "verl"]
    for tested in patches.TESTED_VERL_VERSIONS:
        assert verl_req.specifier.contains(tested), (str(verl_req), tested)
        major, minor, micro = Version(tested).release
        for neighbour in (f"{major}.{minor}.{micro + 1}", f"{major}.{minor + 1}.0", f"{major + 1}.0.0"):
            if neighbour not in patches.TESTED_VERL_VERSIONS:
                assert not verl_req.specifier.contains(neighbour), (str(verl_req), neighbour)
        if micro > 0 and f"{major}.{minor}.{micro - 1}" not in patches.TESTED_VERL_VERSIONS:
            assert not verl_req.specifier.contains(f"{major}.{minor}.{micro - 1}"), str(verl_req)


def test_cpu_offload_policy_does_not_pin_on_cpu():
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    policy = fsdp_impl.CPUOffloadPolicy(pin_memory=True)
    assert policy.pin_memory is False
    assert isinstance(policy, torch.distributed.fsdp.CPUOffloadPolicy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_uses_plain_gloo_on_cpu(monkeypatch):
    import verl.utils.distributed as dist_utils
    import verl.workers.engine_workers as engine_workers

    assert engine_workers.initialize_global_process_group_ray is dist_utils.initialize_global_process_group_ray
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    try:
        dist_utils.initialize_global_process_group_ray(timeout_second=30)
        assert torch.distributed.get_backend() == "gloo"
        t = torch.ones(3)
        torch.distributed.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _pos(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.arange(4 * n).reshape(4, n) for n in lengths]


@pytest.mark.parametrize("lengths", [[5, 7, 9], [6, 6, 6]])
def test_nested_position_ids_survive_index_select(lengths):
    from verl.utils.tensordict_utils import index_select_tensor_dict, nested_tensor_from_tensor_list

    pieces = _pos(lengths)
    nested = nested_tensor_from_tensor_list(pieces, ragged_idx=2)
    assert nested.shape[:2] == (len(lengths), 4)
    selected = index_select_tensor_dict(TensorDict({"position_ids": nested}, batch_size=len(lengths)), [2, 0])
    got = selected["position_ids"].unbind()
    assert torch.equal(got[0], pieces[2]) and torch.equal(got[1], pieces[0])


def test_equal_length_batch_from_transfer_queue_is_rebuilt():
    """TransferQueue stacks equal-length (4, L) samples jagged along dim 1; verl's fix would corrupt it."""
    from verl.utils.tensordict_utils import index_select_tensor_dict, maybe_fix_3d_position_ids

    pieces = _pos([6, 6, 6])
    stacked = torch.nested.as_nested_tensor(pieces, layout=torch.jagged)  # what TransferQueue builds
    td = TensorDict({"position_ids": stacked}, batch_size=3)
    maybe_fix_3d_position_ids(td)
    out = index_select_tensor_dict(td, [1, 2])["position_ids"].unbind()
    assert torch.equal(out[0], pieces[1]) and torch.equal(out[1], pieces[2])


def test_pickled_ragged_position_ids_still_fixed():
    """verl's original case (ragged along the sequence) keeps working."""
    from verl.utils.tensordict_utils import maybe_fix_3d_position_ids, nested_tensor_from_tensor_list

    pieces = _pos([3, 8])
    td = TensorDict({"position_ids": nested_tensor_from_tensor_list(pieces, ragged_idx=2)}, batch_size=2)
    maybe_fix_3d_position_ids(td)
    assert [t.shape for t in td["position_ids"].unbind()] == [p.shape for p in pieces]


@pytest.mark.skipif(os.environ.get("VERL_PLATFORM", "cpu") != "cpu", reason="platform forced elsewhere")
def test_patched_functions_are_marked():
    import verl.utils.tensordict_utils as td_utils

    assert td_utils.maybe_fix_3d_position_ids.__verl_grto_patched__
    assert td_utils.nested_tensor_from_tensor_list.__verl_grto_patched__


def test_verl_still_writes_its_checkpoint_tracker_with_open():
    """The patch replaces ``open`` in the modules that write the tracker: they must still do it so."""
    import inspect

    import verl.trainer.ppo.ray_trainer as ray_trainer
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    for cls in (trainer_base.PPOTrainer, ray_trainer.RayPPOTrainer):
        source = inspect.getsource(cls._save_checkpoint)
        assert 'with open(local_latest_checkpointed_iteration, "w") as f:' in source, cls
    for module in (trainer_base, ray_trainer):
        assert getattr(module.open, "__verl_grto_patched__", False)


def test_checkpoint_tracker_is_replaced_whole_or_not_at_all(tmp_path):
    import verl.trainer.ppo.v1.trainer_base as trainer_base
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    tracker = tmp_path / patches.TRACKER_NAME
    (tmp_path / "global_step_1").mkdir()
    (tmp_path / "global_step_2").mkdir()
    with trainer_base.open(str(tracker), "w") as f:  # what verl's _save_checkpoint runs
        f.write("1")
    assert tracker.read_text() == "1" and sorted(p.name for p in tmp_path.iterdir())[-1] == patches.TRACKER_NAME
    with pytest.raises(RuntimeError), trainer_base.open(str(tracker), "w") as f:
        f.write("2")
        raise RuntimeError("the writer dies after writing, before closing")
    assert tracker.read_text() == "1" and not list(tmp_path.glob("*.tmp"))
    assert find_latest_ckpt_path(str(tmp_path)).endswith("global_step_1")
    with trainer_base.open(str(tmp_path / "other.txt"), "w") as f:  # any other file: the builtin
        f.write("x")
    assert (tmp_path / "other.txt").read_text() == "x"


def test_checkpoint_tracker_survives_sigkill_while_written(tmp_path):
    """A process SIGKILLed after writing the new tracker, before publishing it: the old one stands."""
    import signal
    import subprocess
    import sys
    import time

    from verl_grto import faults

    tracker, marker = tmp_path / patches.TRACKER_NAME, tmp_path / "killed.json"
    tracker.write_text("1")
    code = (
        "import verl, verl.trainer.ppo.v1.trainer_base as tb\n"
        f"with tb.open({str(tracker)!r}, 'w') as f:\n    f.write('2')\n"
    )
    env = {**os.environ, faults.KILL_AT_ENV: "checkpoint.tracker_unpublished", faults.MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"never reached the kill point (rc={proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tracker.read_text() == "1"
    (tmp,) = tmp_path.glob(f".{patches.TRACKER_NAME}.*.tmp")
    assert tmp.read_text() == "2"  # the new content was complete, just not yet moved onto the tracker


def test_torch_version_check_names_the_tested_versions(caplog):
    """The nested-tensor patch depends on torch's behaviour: a tested torch passes quietly, another
    one is patched with a warning that names the tested versions."""
    tested = patches.TESTED_TORCH_VERSIONS[0]
    assert patches.check_torch_version(f"{tested}.1+cpu") is True
    with caplog.at_level("WARNING", logger=patches.logger.name):
        assert patches.check_torch_version("9.0.0") is False
    assert "torch 9.0.0 is untested" in caplog.text and tested in caplog.text


def test_verl_internals_outside_the_patches_are_behind_the_version_guard(monkeypatch):
    """The rollout-adapter table, the engine table and the worker-group method names are verl's
    private state: reaching them on an untested verl fails as ``apply()`` does."""
    monkeypatch.delenv("VERL_GRTO_ALLOW_UNTESTED_VERL", raising=False)
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    for touch in (
        lambda: patches.register_rollout_server_adapter("x", "m.C"),
        patches.register_cpu_fsdp_engines,
        lambda: patches.worker_group_method_name(object(), "tool_update"),
    ):
        with pytest.raises(patches.UntestedVerlVersionError):
            touch()


def test_cpu_engines_and_the_hf_adapter_are_registered_in_verls_tables():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import get_rollout_class

    assert patches.register_cpu_fsdp_engines() == ["language_model/fsdp2@cpu", "value_model/fsdp2@cpu"]  # again: no-op
    assert "cpu" in EngineRegistry._engines["language_model"]["fsdp2"]
    assert get_rollout_class("hf").__name__ == "HFServerAdapter"


def test_worker_group_method_name_reads_verls_functor_class_name():
    """verl names the class of a group's bound method after the actor method (func_generator)."""

    class Group:
        tool_update = type("actor_tool_update", (), {})()  # a colocated group: <role>_<method>
        tool_predict = type("tool_predict", (), {})()
        init_tool = staticmethod(lambda: None)  # not verl's functor: the method's own name

    assert patches.worker_group_method_name(Group(), "tool_update") == "actor_tool_update"
    assert patches.worker_group_method_name(Group(), "tool_predict") == "tool_predict"
    assert patches.worker_group_method_name(Group(), "init_tool") == "init_tool"


class _Counter:
    """A stand-in actor class: one plain method, one coroutine method, state per instance."""

    made = 0

    def __init__(self, start: int) -> None:
        type(self).made += 1
        self.value = start

    def bump(self, by: int = 1) -> int:
        self.value += by
        return self.value

    async def bump_later(self, by: int) -> int:
        return self.bump(by)


def test_in_process_actor_runs_methods_in_the_calling_process_with_awaitable_results():
    import asyncio
    import pickle

    handle = patches.InProcessActor(_Counter, 10)
    made_before = _Counter.made
    assert handle._obj is None  # made lazily, on the first call
    handle.bump.remote(5)  # fire-and-forget still takes effect, as release_server needs
    assert _Counter.made == made_before + 1

    async def calls() -> tuple[int, int]:
        return await handle.bump.remote(), await handle.bump_later.remote(100)

    assert asyncio.run(calls()) == (16, 116)
    copy = pickle.loads(pickle.dumps(handle))  # sent to another process: its own instance, from (cls, args)
    assert asyncio.run(_await(copy.bump.remote())) == 11
    assert not hasattr(copy, "_private_name")  # private names are not actor methods (pickle probes them)


async def _await(awaitable):
    return await awaitable


def test_reward_workers_zero_scores_in_the_asking_process(monkeypatch):
    """reward.num_workers 0: one in-process RewardLoopWorker stand-in instead of reward actors; with a
    colocated reward model (which verl reaches with ray.get) it is refused."""
    from types import SimpleNamespace

    import verl.experimental.reward_loop.reward_loop as reward_loop
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"reward": {"num_workers": 0, "reward_model": {"enable": False}}})
    manager = SimpleNamespace(config=cfg, reward_router_address=None)
    reward_loop.RewardLoopManager._init_reward_loop_workers(manager)
    (worker,) = manager.reward_loop_workers
    assert isinstance(worker, patches.InProcessActor) and worker._cls is reward_loop.RewardLoopWorker
    assert worker._obj is None  # nothing loaded here: the agent-loop worker it is sent to makes it
    cfg.reward.reward_model.enable = True
    with pytest.raises(ValueError, match="reward_model.enable: false"):
        reward_loop.RewardLoopManager._init_reward_loop_workers(manager)


def test_one_rollout_server_on_cpu_is_balanced_in_process(monkeypatch):
    """One server on CPU: verl's own GlobalRequestLoadBalancer, in the calling process, routes every
    request to it; two servers (or a custom balancer) still get verl's Ray actor."""
    import asyncio

    import verl.workers.rollout.router as router

    server = object()
    handle = router.get_router_handle({"s0": server})
    assert isinstance(handle, patches.InProcessActor) and handle._cls is router.GlobalRequestLoadBalancer

    async def route() -> tuple:
        fields = await handle.require_acquire_fields.remote()
        first = await handle.acquire_server.remote(request_id="r1")
        handle.release_server.remote(server_id="s0", request_id="r1")
        return fields, first, await handle.acquire_server.remote(request_id="r2")

    fields, first, second = asyncio.run(route())
    assert first == second == ("s0", server) and isinstance(fields, list)
    actors = []
    monkeypatch.setattr(router, "_create_global_sticky_inflight", lambda **kw: actors.append(kw) or "actor")
    assert router.get_router_handle({"s0": server, "s1": server}) == "actor" and len(actors) == 1


class _Runner:
    """What verl's TaskRunnerV1 looks like to run_ppo: made with no arguments, ``run(config)``."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def run(self, config) -> tuple[int, str | None]:
        return self.pid, os.environ.get("TQ_NUM_THREADS")


def _fake_main_ppo(main_globals=None):
    """A module with verl's run_ppo shape (main_ppo.py:92-93: ``runner = cls.remote()``, then
    ``ray.get(runner.run.remote(config))``); ``ray.get`` replaced by the identity in these tests."""
    from types import ModuleType

    module = ModuleType("fake_main_ppo")

    def run_ppo(config, task_runner_class):
        return task_runner_class.remote().run.remote(config)

    module.run_ppo = run_ppo
    return module


def _in_driver_config(enabled: bool, env_vars: dict[str, str]):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "ray_kwargs": {"task_runner_in_driver": enabled, "ray_init": {"runtime_env": {"env_vars": env_vars}}},
            "actor_rollout_ref": {"actor": {"strategy": "fsdp2"}},
            "global_profiler": {"tool": None},
        }
    )


def test_task_runner_in_driver_runs_verls_runner_in_this_process_with_its_environment(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "put", lambda value: value)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    runtime_env = {"env_vars": {"TQ_NUM_THREADS": "1"}}
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"runtime_env": runtime_env})())
    for name in ("TQ_NUM_THREADS", "MALLOC_ARENA_MAX"):  # set by the code under test: restored after it
        monkeypatch.setenv(name, "")  # recorded (delenv of an unset variable records nothing to undo)
        monkeypatch.delenv(name)
    import transfer_queue.client as tq_client
    import transfer_queue.storage.simple_storage as tq_storage

    from verl_grto.platform import cpu

    for tq_module in (tq_client, tq_storage):  # what they read when imported, with no TQ_NUM_THREADS set
        monkeypatch.setattr(tq_module, "TQ_NUM_THREADS", 8)
    arena_caps = []
    monkeypatch.setattr(cpu, "cap_malloc_arenas", arena_caps.append)
    runtime_env["env_vars"]["MALLOC_ARENA_MAX"] = "2"
    module = _fake_main_ppo()
    patches._task_runner_in_driver(module)
    from types import SimpleNamespace

    actor_made = []

    def make_actor():
        actor_made.append(1)
        return SimpleNamespace(run=SimpleNamespace(remote=lambda config: "ran in the actor"))

    remote_class = SimpleNamespace(__ray_actor_class__=_Runner, remote=make_actor)

    # off: verl's actor class is used as it is
    assert module.run_ppo(_in_driver_config(False, {}), remote_class) == "ran in the actor"
    assert actor_made == [1]
    # on: the runner's own class, built and run here, with the job's variables: in os.environ, re-read
    # where TransferQueue keeps its import-time copy, and glibc's arena cap
    pid, threads = module.run_ppo(_in_driver_config(True, {"TQ_NUM_THREADS": "1"}), remote_class)
    assert pid == os.getpid() and threads == "1" and actor_made == [1]
    assert tq_client.TQ_NUM_THREADS == tq_storage.TQ_NUM_THREADS == 1 and arena_caps == [2]
    patches._task_runner_in_driver(module)  # installed once
    assert module.run_ppo.__wrapped__.__name__ == "run_ppo" and not hasattr(module.run_ppo.__wrapped__, "__wrapped__")


def test_the_cli_drivers_main_module_gets_the_in_driver_runner_from_the_hydra_hook(monkeypatch):
    """``python -m verl.trainer.main_ppo`` runs verl's file as ``__main__`` (no import hook sees it): the
    recipes' Hydra search-path plugin installs the patch there while the config is composed, for any
    recipe folder; another program's ``__main__`` is left alone."""
    import sys
    from types import SimpleNamespace

    from hydra_plugins.verl_grto_searchpath import VerlGrtoRecipesSearchPath

    main = _fake_main_ppo()
    verls_run_ppo = main.run_ppo
    main.__spec__ = SimpleNamespace(name="some.other.program")
    monkeypatch.setitem(sys.modules, "__main__", main)
    search_path = SimpleNamespace(get_path=lambda: [])  # no folders: only the __main__ hook acts
    VerlGrtoRecipesSearchPath().manipulate_search_path(search_path)
    assert main.run_ppo is verls_run_ppo
    main.__spec__ = SimpleNamespace(name="verl.trainer.main_ppo")
    VerlGrtoRecipesSearchPath().manipulate_search_path(search_path)
    assert main.run_ppo is not verls_run_ppo and main.run_ppo.__wrapped__ is verls_run_ppo
