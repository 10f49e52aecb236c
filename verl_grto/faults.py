"""Named kill points: where a fault-injection test stops a run, chosen by name, never by timing.

A run is meant to survive ``kill -9`` at any moment (pre-emption, the OOM killer, a lost node). To
prove that for the moments that matter (mid buffer build, mid BTO, mid tool update, mid checkpoint
write) a test must stop the run exactly there, every time; a sleep-then-kill test would hit a
different place on every machine. The code calls :func:`kill_point` at those moments; it does
nothing unless ``VERL_GRTO_KILL_AT`` names the point. When it does, the process writes a marker
file (``VERL_GRTO_KILL_MARKER``) saying where it stopped and blocks there for good; the test sees
the marker and SIGKILLs the whole process tree (driver and Ray workers), as the kernel or a
scheduler would. Blocking rather than killing itself keeps the kill external and whole: the
process that hit the point cannot race the others to their deaths.

``VERL_GRTO_KILL_AT=name`` stops at the first call of ``name`` in a process; ``name#k`` at the k-th
(counted per process: a Ray worker and the driver count separately).

:func:`dump_after_resume` is the other half of such a test: with ``VERL_GRTO_RESUME_PROBE`` set, a
resumed run writes the state it just loaded, so the test can compare it tensor by tensor with the
checkpoint it resumed from.

Layer 0: imports nothing of verl_grto, so any module may call it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

KILL_AT_ENV = "VERL_GRTO_KILL_AT"
MARKER_ENV = "VERL_GRTO_KILL_MARKER"
PROBE_ENV = "VERL_GRTO_RESUME_PROBE"

_hits: Counter[str] = Counter()
_lock = threading.Lock()


def _wanted() -> tuple[str, int] | None:
    spec = os.environ.get(KILL_AT_ENV, "").strip()
    if not spec:
        return None
    name, _, nth = spec.partition("#")
    return name, int(nth) if nth else 1


def kill_point(name: str) -> None:
    """Stop here for good if ``VERL_GRTO_KILL_AT`` names this point (and this is its k-th call).

    Writes the marker (JSON: point, hit, pid, time) atomically, then blocks this thread forever;
    whoever set the variable is expected to SIGKILL the process tree. A no-op otherwise (one
    environment lookup)."""
    wanted = _wanted()
    if wanted is None or wanted[0] != name:
        return
    with _lock:
        _hits[name] += 1
        hit = _hits[name]
    if hit != wanted[1]:
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"point": name, "hit": hit, "pid": os.getpid(), "time": time.time()}, f)
        os.replace(tmp, marker)
    threading.Event().wait()  # blocks until the test's SIGKILL; there is no way out


def dump_after_resume(name: str, save: Callable[[str], None]) -> None:
    """With ``VERL_GRTO_RESUME_PROBE`` set, call ``save(<probe dir>/<name>)`` (right after a resume).

    Why: "the run resumed from the last complete checkpoint" is only shown by comparing what the
    resumed process holds (weights, optimizer, RNG, step) with what the checkpoint holds; ``save``
    writes the in-memory state in the checkpoint's own format. A no-op when the variable is unset."""
    root = os.environ.get(PROBE_ENV)
    if root:
        save(os.path.join(root, name))
