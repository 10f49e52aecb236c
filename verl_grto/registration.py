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


def _register_cpu_engines() -> None:
    """verl's FSDP engines on CPU (verl's table is private: registered in :mod:`verl_grto.patches`)."""
    for name in patches.register_cpu_fsdp_engines():
        _note("engine", name)


def _register_rollout() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_grto.rollout.hf_server import ROLLOUT_NAME

    def _load_hf_replica() -> type:
        from verl_grto.rollout.hf_server import HFReplica

        return HFReplica

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
    patches.register_rollout_server_adapter(ROLLOUT_NAME, "verl_grto.rollout.hf_server.HFServerAdapter")
    _note("rollout", ROLLOUT_NAME)


def _register_resolvers() -> None:
    from verl_grto.recipe_resolvers import register_resolvers

    for name in register_resolvers():
        _note("resolver", name)


def _register_algorithm() -> None:
    import verl_grto.algorithm.advantage  # noqa: F401  (@register_adv_est("grto"))

    _note("adv_estimator", "grto")


def _register_trainers() -> None:
    import verl_grto.trainer.agent_trainer  # noqa: F401  (@register_trainer("grto_agent"))
    import verl_grto.trainer.bgrto_trainer  # noqa: F401  (@register_trainer("bgrto"))
    import verl_grto.trainer.grto_trainer  # noqa: F401  (@register_trainer("grto"))

    _note("trainer", "grto")
    _note("trainer", "bgrto")
    _note("trainer", "grto_agent")


def _register_agent() -> None:
    """The multi-turn agent loop ``grto_tool_agent`` and tool-call parser ``grto_hermes`` (verl looks them up
    by name in its agent-loop workers; the segmentation tool's module registers them too)."""
    from verl_grto.agent.loop import AGENT_NAME, PARSER_NAME

    _note("agent_loop", AGENT_NAME)
    _note("tool_parser", PARSER_NAME)


def register_all() -> dict[str, list[str]]:
    if REGISTERED:
        return REGISTERED
    quiet_ray_workers()  # before anything imports verl.workers.engine
    # The platform first: importing verl's engine modules (patches, engines) runs
    # platform detection, which must already see the CPU platform.
    _register_platform()
    patches.apply()
    _register_cpu_engines()
    _register_rollout()
    _register_resolvers()
    _register_algorithm()
    _register_trainers()
    _register_agent()
    return REGISTERED


register_all()
