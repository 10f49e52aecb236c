"""verl-grto: GRTO / B-GRTO for verl.

verl loads ``verl_grto.registration`` through its ``verl.plugins`` entry point inside
``import verl``. Importing verl first, here, makes that order hold whichever module of this
package is imported first: otherwise importing e.g. ``verl_grto.platform.cpu`` first would start
verl's plugin loading while that module is half-initialised, the registration would fail, and
verl would swallow the error (DEBUG log only) and fall back to CUDA.
"""

import verl  # noqa: F401  (loads the plugin: see the docstring)

__version__ = "0.1.0"
