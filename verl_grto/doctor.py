"""``verl-grto doctor``: prove, in a fresh process, that verl loads the plugin.

verl imports ``verl.plugins`` entry points inside ``import verl`` and logs a failing
plugin at DEBUG level only (verl/__init__.py ~72), so a broken install would
train silently without the CPU platform, the ``hf`` rollout or the GRTO
estimators. The doctor imports verl the way every verl process does, then reads
verl's own registries back and compares them with what this plugin promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

#: What must be visible in verl's registries after ``import verl``.
EXPECTED: dict[str, list[str]] = {
    "platform": ["cpu"],
    "rollout": ["hf"],
    "rollout_adapter": ["hf"],
    "engine": ["language_model/fsdp2@cpu"],
    "resolver": ["grto_asset", "grto_synthetic", "grto_tool_config", "grto_chat_template", "grto_agent_data"],
    "adv_estimator": ["grto"],
    "trainer": ["grto", "bgrto", "grto_agent"],
    "agent_loop": ["grto_tool_agent"],
    "tool_parser": ["grto_hermes"],
    "reward": ["verl_grto.reward.box_reward.compute_score", "verl_grto.agent.reward.compute_score"],
}


def inspect_verl() -> dict[str, Any]:
    """Read verl's registries in this process (after ``import verl`` loaded the plugins)."""
    import importlib

    import verl  # noqa: F401  (runs verl's entry-point discovery)
    from omegaconf import OmegaConf
    from verl.plugin.platform.platform_manager import PlatformRegistry
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    found: dict[str, Any] = {
        "verl_version": verl.__version__,
        "plugin_loaded": "verl_grto.registration" in sys.modules,
        "platform": list(PlatformRegistry.registered_names()),
        "rollout": sorted(RolloutReplicaRegistry._registry),
        "rollout_adapter": sorted(name for name, mode in _ROLLOUT_REGISTRY if mode == "async"),
        "engine": sorted(
            f"{model_type}/{backend}@{device}"
            for model_type, backends in EngineRegistry._engines.items()
            for backend, devices in backends.items()
            for device in devices
            if isinstance(device, str)
        ),
        "resolver": [name for name in EXPECTED["resolver"] if OmegaConf.has_resolver(name)],
        "reward": [],
    }
    for fqn in EXPECTED["reward"]:
        module_name, fn = fqn.rsplit(".", 1)
        try:
            if callable(getattr(importlib.import_module(module_name), fn, None)):
                found["reward"].append(fqn)
        except Exception as exc:  # reported as missing below, with the reason
            found.setdefault("errors", []).append(f"{fqn}: {exc!r}")
    try:
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

        found["adv_estimator"] = sorted(ADV_ESTIMATOR_REGISTRY)
        found["policy_loss"] = sorted(POLICY_LOSS_REGISTRY)
    except ImportError:
        pass
    try:
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

        found["trainer"] = sorted(TRAINER_REGISTRY)
    except ImportError as exc:
        found.setdefault("errors", []).append(f"verl V1 trainer registry: {exc!r}")
    try:  # the multi-turn loop and tool-call parser, by the names recipes and datasets use
        from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
        from verl.experimental.agent_loop.tool_parser import ToolParser

        found["agent_loop"] = sorted(_agent_loop_registry)
        found["tool_parser"] = sorted(ToolParser._registry)
    except ImportError as exc:
        found.setdefault("errors", []).append(f"verl agent loop registries: {exc!r}")
    found["extras"] = inspect_extras()
    if not found["plugin_loaded"]:
        try:
            importlib.import_module("verl_grto.registration")
        except Exception as exc:
            found.setdefault("errors", []).append(f"import verl_grto.registration failed: {exc!r}")
    return found


#: Optional extras: the package that marks the extra installed, and the modules its code paths
#: import. An extra that is absent is fine; one that is installed but does not import (a
#: dependency missing after a ``--no-deps`` install, as iopath's portalocker once was) is an error.
EXTRAS: dict[str, tuple[str, list[str]]] = {
    "sam2": ("sam2", ["sam2.build_sam", "sam2.modeling.backbones.hieradet"]),
}


def inspect_extras() -> dict[str, str]:
    """``{extra: "ok" | "not installed" | "broken: <error>"}`` for every optional extra."""
    import importlib
    import importlib.util

    status: dict[str, str] = {}
    for extra, (package, modules) in EXTRAS.items():
        if importlib.util.find_spec(package) is None:
            status[extra] = "not installed"
            continue
        try:
            for module in modules:
                importlib.import_module(module)
            status[extra] = "ok"
        except Exception as exc:
            status[extra] = f"broken: {exc!r}"
    return status


def missing(found: dict[str, Any]) -> list[str]:
    """Every expected registration absent from ``found``, as 'kind: name'."""
    out = [] if found.get("plugin_loaded") else ["plugin: verl did not import verl_grto.registration"]
    for kind, names in EXPECTED.items():
        out.extend(f"{kind}: {name}" for name in names if name not in found.get(kind, []))
    out.extend(
        f"extra {extra}: {state}" for extra, state in found.get("extras", {}).items() if state.startswith("broken")
    )
    return out


def run_doctor() -> int:
    """Inspect a fresh interpreter; print the report; 0 when complete, 1 otherwise."""
    proc = subprocess.run(
        [sys.executable, "-c", "import json, verl_grto.doctor as d; print(json.dumps(d.inspect_verl()))"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"verl-grto doctor: a fresh `import verl` failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
        return 1
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"verl {found['verl_version']}; plugin loaded by verl: {found['plugin_loaded']}")
    kinds = (
        "platform",
        "rollout",
        "rollout_adapter",
        "engine",
        "trainer",
        "agent_loop",
        "tool_parser",
        "adv_estimator",
        "policy_loss",
        "resolver",
        "reward",
    )
    for kind in kinds:
        print(f"  {kind:16s} {', '.join(found.get(kind, [])) or '-'}")
    for extra, state in found.get("extras", {}).items():
        print(f"  extra {extra:10s} {state}")
    for err in found.get("errors", []):
        print(f"  error: {err}")
    gaps = missing(found)
    if gaps:
        print("MISSING:\n  " + "\n  ".join(gaps), file=sys.stderr)
        return 1
    print("OK: everything verl-grto registers is visible to verl")
    return 0
