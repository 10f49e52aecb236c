"""Everything verl-grto adds to verl, registered through verl's own extension points.

verl imports this module in every process (driver, task runner, FSDP workers,
rollout servers, agent-loop and reward workers) through the ``verl.plugins``
entry point, so a registration made here exists wherever verl looks it up.
verl swallows a plugin's import error at DEBUG level; ``verl-grto doctor`` and
the recipes' start-up check (``check_plugin_loaded`` in the Hydra search-path
plugin ``hydra_plugins/verl_grto_searchpath``, run when a config is composed from
a folder marked ``.verl-grto-recipes``) make a missing plugin loud instead.
"""

from __future__ import annotations

from verl_grto import patches
from verl_grto.console import quiet_ray_workers

REGISTERED: dict[str, list[str]] = {}


def _note(kind: str, name: str) -> None:
    REGISTERED.setdefault(kind, []).append(name)


def _register_platform() -> None:
    from verl.plugin.platform.platform_manager import PlatformRegistry

    from verl_grto.platform.cpu import PlatformCPU

    PlatformRegistry.register("cpu")(PlatformCPU)
    _note("platform", "cpu")
    from verl.utils.device import get_device_name

    if get_device_name() == "cpu":  # every process of a CPU run: freed heap pages go back to the OS
        from verl_grto.platform.cpu import start_heap_trimmer

        start_heap_trimmer()


def _register_cpu_engines() -> None:
    """verl's FSDP engines on CPU (verl's table is private: registered in :mod:`verl_grto.patches`)."""
    for name in patches.register_cpu_fsdp_engines():
        _note("engine", name)


#: ``rollout.name`` of the plugin's rollout (``verl_grto.rollout.hf_server.ROLLOUT_NAME``, checked when
#: verl loads the replica). Not imported from there: these registrations run while verl imports its
#: rollout modules, which that module itself imports.
HF_ROLLOUT = "hf"


def _register_rollout_replica() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    def _load_hf_replica() -> type:
        from verl_grto.rollout.hf_server import ROLLOUT_NAME, HFReplica

        if ROLLOUT_NAME != HF_ROLLOUT:
            raise RuntimeError(f"hf_server.ROLLOUT_NAME {ROLLOUT_NAME!r} != registration.HF_ROLLOUT {HF_ROLLOUT!r}")
        return HFReplica

    RolloutReplicaRegistry.register(HF_ROLLOUT, _load_hf_replica)
    _note("rollout", HF_ROLLOUT)


def _register_rollout_adapter() -> None:
    patches.register_rollout_server_adapter(HF_ROLLOUT, "verl_grto.rollout.hf_server.HFServerAdapter")


def _register_resolvers() -> None:
    from verl_grto.recipe_resolvers import register_resolvers

    for name in register_resolvers():
        _note("resolver", name)


def _register_algorithm() -> None:
    import verl_grto.algorithm.advantage  # noqa: F401  (@register_adv_est("grto"))

    _note("adv_estimator", "grto")


#: The modules whose ``@register_trainer`` puts the plugin's trainer modes in verl's table.
TRAINER_MODULES = {
    "grto": "verl_grto.trainer.grto_trainer",
    "bgrto": "verl_grto.trainer.bgrto_trainer",
    "grto_agent": "verl_grto.trainer.agent_trainer",
}


def _register_trainers(finished: str | None = None) -> None:
    """Import the trainer modules (their decorators register them). When one of them is being imported
    right now (it imported verl's trainer table, which ran this), importing them here would meet it half
    made: they are left to register themselves, the others right after it finishes (a hook on each, which
    names the module it ran after as ``finished``: its code has run, its import is not yet marked done)."""
    import importlib
    import sys

    if any(
        getattr(getattr(sys.modules.get(n), "__spec__", None), "_initializing", False)
        for n in TRAINER_MODULES.values()
        if n != finished
    ):
        return
    for mode, name in TRAINER_MODULES.items():
        importlib.import_module(name)
        _note("trainer", mode)


def _register_agent() -> None:
    """The multi-turn agent loop ``grto_tool_agent`` and tool-call parser ``grto_hermes`` (verl looks them up
    by name in its agent-loop workers; the segmentation tool's module registers them too). Run once verl's
    ``tool_agent_loop`` has been imported: the plugin's loop subclasses it. When the plugin's loop module
    is itself being imported (its import of verl's loop ran this), its decorators register it as it
    finishes."""
    import sys

    loop = sys.modules.get("verl_grto.agent.loop")
    if loop is not None and getattr(getattr(loop, "__spec__", None), "_initializing", False):
        return
    from verl_grto.agent.loop import AGENT_NAME, PARSER_NAME

    _note("agent_loop", AGENT_NAME)
    _note("tool_parser", PARSER_NAME)


_started = False


def register_all() -> dict[str, list[str]]:
    """Register everything; what lives in a verl module only some processes import (the FSDP engines,
    the rollout registries, the estimator and trainer tables, the patched modules) is registered when
    verl imports that module (:func:`verl_grto.patches.when_imported`), so each process imports only
    what it uses. Returns what is registered so far in this process."""
    global _started
    if _started:
        return REGISTERED
    _started = True
    quiet_ray_workers()  # before anything imports verl.workers.engine
    # The platform first: importing verl's engine modules (patches, engines) runs
    # platform detection, which must already see the CPU platform.
    _register_platform()
    patches.apply_when_imported()
    _register_resolvers()  # the driver composes the config before it imports any of the modules below
    hooks = (
        ("verl.workers.engine.fsdp.transformer_impl", _register_cpu_engines),
        ("verl.workers.rollout.replica", _register_rollout_replica),
        ("verl.workers.rollout.base", _register_rollout_adapter),
        ("verl.trainer.ppo.core_algos", _register_algorithm),
        ("verl.trainer.ppo.v1.trainer_base", _register_trainers),
        ("verl.experimental.agent_loop.tool_agent_loop", _register_agent),
    )
    for module_name, register in hooks:
        patches.when_imported(module_name, lambda module, register=register: register())
    for name in TRAINER_MODULES.values():  # whichever of them is imported first, the others follow it
        patches.when_imported(name, lambda module: _register_trainers(finished=module.__name__))
    return REGISTERED


register_all()
