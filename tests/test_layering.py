"""No upward imports: every module of ``verl_grto`` imports only from its own layer or the layers below.

Why: a lower layer that reaches up (a reward importing the evaluation, the tool's worker importing
the BTO loop) ties pieces together that should be usable and testable alone, and invites import
cycles. The table is docs/architecture.md's; a new subpackage or top-level module must be given a
place in it (:func:`test_every_module_has_a_layer`). Every import counts, including the lazy ones
inside functions and those under ``TYPE_CHECKING``: they are dependencies all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "verl_grto"

#: Lowest first. A unit is a subpackage or a top-level module of ``verl_grto``; units of one layer may
#: import each other, units of a layer never import a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves (atomic file writes; batched requests; console output; verl's CPU platform and patches; named
    # kill points for fault tests): import nothing of a higher layer
    ("__init__", "atomic", "batching", "console", "platform", "patches", "faults"),
    ("data",),  # the row schema, masks, synthetic scenes, converters
    ("reward", "tool", "policy"),  # scoring an answer; the SAM2 tool; the policy's inputs and loading
    ("rollout",),  # the `hf` rollout server (a policy behind verl's server interface)
    ("eval",),  # metrics, baselines, inference and evaluation
    ("agent",),  # the segmentation tool as a verl tool call (multi-turn agent loop; draws with eval's overlay)
    ("assets", "algorithm"),  # tiny-model building and warm start (probes with eval); GRTO / BTO
    ("trainer", "recipe_resolvers"),  # verl trainer modes; the recipes' OmegaConf resolvers (build assets)
    ("registration", "doctor", "cli"),  # entry points: verl's plugin, its health check, the command line
)

LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    """``verl_grto/tool/worker.py`` -> ``verl_grto.tool.worker``; a package's ``__init__`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer unit of a ``verl_grto`` module: its subpackage or top-level module (the root: ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every ``verl_grto`` import in ``source``, wherever it stands.

    ``from verl_grto import patches`` names the module ``verl_grto.patches``; relative imports are
    resolved against ``module``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "verl_grto":  # `from verl_grto import x`: x is the unit
                found += [(node.lineno, f"verl_grto.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "verl_grto" or name.startswith("verl_grto.")]


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """A message for every import in ``source`` (the text of ``module``) from a layer above it."""
    own = unit_of(module)
    out = []
    for line, target in imported_modules(source, module, is_package):
        other = unit_of(target)
        if other not in LAYER_OF:
            out.append(f"{module}:{line} imports {target}, whose unit {other!r} has no layer")
        elif LAYER_OF[other] > LAYER_OF[own]:
            out.append(
                f"{module}:{line} imports {target}: {other!r} (layer {LAYER_OF[other]}) "
                f"is above {own!r} (layer {LAYER_OF[own]})"
            )
    return out


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = sorted({unit_of(module_name(p)) for p in package_modules()} - set(LAYER_OF))
    assert not missing, f"give these verl_grto units a layer in LAYERS and docs/architecture.md: {missing}"
    assert len(LAYER_OF) == sum(len(units) for units in LAYERS), "a unit is listed in two layers"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in package_modules():
        violations += upward_imports(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not violations, "upward imports (see docs/architecture.md):\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        # lazy, inside a function: counted
        ("def f():\n    from verl_grto.algorithm.bto import train\n", "verl_grto.tool.worker", "verl_grto.algorithm"),
        ("import verl_grto.eval.metrics as m\n", "verl_grto.reward.mask_reward", "verl_grto.eval.metrics"),
        ("from verl_grto import cli\n", "verl_grto.data.schema", "verl_grto.cli"),
        # relative: `..eval` from verl_grto/reward/x.py is verl_grto.eval
        ("from ..eval import metrics\n", "verl_grto.reward.x", "verl_grto.eval"),
    ],
)
def test_the_check_finds_an_upward_import(source, module, expected):
    (message,) = upward_imports(source, module)
    assert message.startswith(f"{module}:") and expected in message


def test_the_check_allows_downward_and_same_layer_imports():
    source = (
        "from verl_grto.data.schema import GroundTruth\nfrom verl_grto.reward import answer\nfrom . import engine\n"
    )
    assert upward_imports(source, "verl_grto.tool.worker") == []
    assert upward_imports("import os\nimport verl\n", "verl_grto.atomic") == []
