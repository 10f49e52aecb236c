"""Makes ``python -m verl.trainer.main_ppo --config-path recipes`` find this project's recipes.

Hydra resolves a relative ``--config-path`` against the folder of the module that
declares ``@hydra.main`` (verl's ``verl/trainer/``), where no ``recipes/`` exists, and
stops with "Primary config directory not found". This search-path plugin
(discovered by Hydra in the ``hydra_plugins`` namespace) re-anchors such a
*missing* primary folder on the working directory when it exists there. Any
config path that exists where Hydra looked is left alone.
"""

from __future__ import annotations

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

_FILE = "file://"


def reanchor_missing_primary(path: str, cwd: str, module_dir_candidates: list[str]) -> str | None:
    """The cwd-relative folder for a missing module-relative primary config folder, else None."""
    if os.path.isdir(path):
        return None
    for module_dir in module_dir_candidates:
        rel = os.path.relpath(path, module_dir)
        if rel.startswith(".."):
            continue
        candidate = os.path.join(cwd, rel)
        if os.path.isdir(candidate):
            return candidate
    return None


class VerlGrtoRecipesSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            import verl.trainer as verl_trainer
        except ImportError:
            return
        trainer_dir = os.path.dirname(os.path.abspath(verl_trainer.__file__))
        module_dirs = [trainer_dir, os.path.realpath(trainer_dir)]
        for element in search_path.get_path():
            if element.provider != "main" or "://" in element.path.removeprefix(_FILE):
                continue  # pkg:// and other schemes are not folders
            fixed = reanchor_missing_primary(element.path.removeprefix(_FILE), os.getcwd(), module_dirs)
            if fixed is not None:
                element.path = fixed
            primary = element.path.removeprefix(_FILE)
            if os.path.isfile(os.path.join(primary, RECIPES_MARKER)):
                check_plugin_loaded()
        if _main_is_verl_main_ppo():
            # the driver's one hook after `python -m verl.trainer.main_ppo` has defined run_ppo (any recipe
            # folder: a user's recipes may extend cpu_base, which sets ray_kwargs.task_runner_in_driver)
            from verl_grto.patches import task_runner_in_driver_for_main

            task_runner_in_driver_for_main()


def _main_is_verl_main_ppo() -> bool:
    """Whether this process runs ``python -m verl.trainer.main_ppo`` (checked without importing anything:
    this plugin is loaded by every Hydra application in the environment)."""
    import sys

    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None) == "verl.trainer.main_ppo"


#: A file in a recipes folder that marks it as verl-grto's: composing a config from it
#: first checks that verl loaded the plugin.
RECIPES_MARKER = ".verl-grto-recipes"


class PluginNotLoadedError(RuntimeError):
    pass


def check_plugin_loaded() -> None:
    """Fail at start, with the reason, if verl did not import the verl-grto plugin.

    verl swallows a plugin's import error (DEBUG log only); without the plugin a
    recipe would die much later on an unknown rollout or resolver, or train
    without the GRTO pieces."""
    import sys

    if "verl_grto.registration" in sys.modules:
        return
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if policy == "none" or (policy != "auto" and "verl_grto" not in {p.strip() for p in policy.split(",")}):
        raise PluginNotLoadedError(
            f"verl-grto recipes need the verl-grto plugin, but VERL_USE_EXTERNAL_PLUGINS={policy!r} excludes it"
        )
    try:
        import verl_grto.registration  # noqa: F401
    except Exception as exc:
        raise PluginNotLoadedError(
            f"verl could not load the verl-grto plugin: {exc!r}. Run `verl-grto doctor` for details."
        ) from exc
    raise PluginNotLoadedError(
        "verl did not load the verl-grto plugin (no `verl.plugins` entry point found?). "
        "Reinstall with `pip install -e .` and run `verl-grto doctor`."
    )
