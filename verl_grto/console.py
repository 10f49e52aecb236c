"""What a run prints: verl's once-per-process warnings once per run, not once per Ray worker.

A tiny CPU run starts about eight Python processes (driver, task runner, actor/ref worker, rollout
server, agent-loop and reward workers...). Each imports ``verl.workers.engine`` and so prints the
same five "<engine> engine is not available" warnings (two lines each): ~80 lines saying nothing the
driver has not said already. Ray starts its workers with ``RAY_RAYLET_PID`` in their environment
(ray/_private/process_watcher.py reads it); a driver does not have it. So a process that has it
drops exactly those warnings; the driver still prints each once, and every other warning is
untouched. ``VERL_GRTO_VERBOSE=1`` turns this (and the config dump to a file, patches.py) off.
"""

from __future__ import annotations

import os
import warnings

#: verl/workers/engine/__init__.py:32-69 warns with "<name> engine is not available: <import error>".
ENGINE_UNAVAILABLE = r".* engine is not available"


def verbose() -> bool:
    """``VERL_GRTO_VERBOSE=1``: print everything verl prints, in every process."""
    return os.environ.get("VERL_GRTO_VERBOSE", "") == "1"


def in_ray_worker() -> bool:
    return "RAY_RAYLET_PID" in os.environ


def quiet_ray_workers() -> bool:
    """In a Ray worker, ignore the engine-availability warnings the driver has shown; True if so."""
    if verbose() or not in_ray_worker():
        return False
    warnings.filterwarnings("ignore", message=ENGINE_UNAVAILABLE, category=UserWarning)
    return True
