"""verl-grto: GRTO / B-GRTO for verl.

verl loads ``verl_grto.registration`` through its ``verl.plugins`` entry point inside
``import verl``. Importing verl first, here, makes that order hold whichever module of this
package is imported first: otherwise importing e.g. ``verl_grto.platform.cpu`` first would start
verl's plugin loading while that module is half-initialised, the registration would fail, and
verl would swallow the error (DEBUG log only) and fall back to CUDA.

Without verl installed the verl-free modules (``tool/`` but its worker and pool, ``data/``,
``reward/``, ``policy/``) still import: ``benchmarks/gpu/device_check.py`` runs on a GPU machine that
has torch and transformers only.
"""

try:
    import verl  # noqa: F401  (loads the plugin: see the docstring)
except ModuleNotFoundError as exc:  # verl itself absent; a module verl fails to import still raises
    if exc.name != "verl":
        raise

__version__ = "0.1.0"
