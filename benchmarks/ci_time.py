"""How long each phase of ``.ci/run`` takes on a clean clone: install, unit tests, e2e tests.

    .venv/bin/python benchmarks/ci_time.py                  # clones HEAD into a temporary folder
    .venv/bin/python benchmarks/ci_time.py --out benchmarks/results/ci_time/<date>.json

``.ci/run`` is ``bash scripts/install.sh && .venv/bin/pytest -q`` on a fresh clone. This runs the same
two commands one after another in a fresh ``git clone`` of the current commit, timing each. The tests run
as one pytest process, as in CI: a test that leaves state behind for a later module fails here as it
does there (split runs of the unit and e2e suites once hid such a failure). The unit/e2e split is
reported from pytest's per-test durations (``tests_by_mark``). ``VERL_GRTO_HOME`` points into the clone, so no cached asset or dataset from an
earlier run is reused. Prints one line per phase and the total against the 20-minute target, and writes
a JSON with the command, the commit, the date, the phases and the slowest tests pytest reported. A measurement, not a test: run
it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 20 * 60
PHASES = (
    ("install", ["bash", "scripts/install.sh"]),
    ("tests", [".venv/bin/pytest", "-q", "--junitxml=junit.xml"]),
)


def seconds_by_mark(junit: Path, e2e_ids: set[str]) -> dict[str, float]:
    """Seconds of test time (setup + call + teardown, as junit records them) in e2e and other tests."""
    import xml.etree.ElementTree as ET

    split = {"e2e": 0.0, "unit": 0.0}
    for case in ET.parse(junit).iter("testcase"):
        node = f"{case.get('classname', '').replace('.', '/')}.py::{(case.get('name') or '').split('[')[0]}"
        split["e2e" if node in e2e_ids else "unit"] += float(case.get("time") or 0.0)
    return {k: round(v, 1) for k, v in split.items()}


def e2e_test_ids(clone: Path, env: dict[str, str]) -> set[str]:
    """The node ids ``pytest -m e2e`` selects (collection only, not timed)."""
    proc = subprocess.run(
        [".venv/bin/pytest", "-q", "--collect-only", "-m", "e2e"], cwd=clone, env=env, capture_output=True, text=True
    )
    return {ln.split("[")[0] for ln in proc.stdout.splitlines() if "::" in ln}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.repo, capture_output=True, text=True, check=True)
    work = Path(tempfile.mkdtemp(prefix="ci_time_"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
    # the commit measured, whichever branch the clone's default is (a linked worktree's HEAD may not be it)
    subprocess.run(["git", "checkout", "-q", commit.stdout.strip()], cwd=clone, check=True)
    env = {**os.environ, "VERL_GRTO_HOME": str(work / "home")}
    env.pop("VIRTUAL_ENV", None)
    result: dict = {
        "command": " ".join([".venv/bin/python", "benchmarks/ci_time.py", *sys.argv[1:]]),
        "commit": commit.stdout.strip(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "phases": {},
        "slowest": {},
    }
    for name, cmd in PHASES:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        summary = next((ln for ln in reversed(proc.stdout.splitlines()) if re.search(r"passed|failed|error", ln)), "")
        result["phases"][name] = {"seconds": round(seconds, 1), "rc": proc.returncode, "summary": summary.strip()}
        result["slowest"][name] = re.findall(r"^\d+\.\d+s (?:call|setup|teardown) .+$", proc.stdout, flags=re.M)[:15]
        print(f"{name:8s} {seconds:7.1f} s  rc {proc.returncode}  {summary.strip()}", flush=True)
        if proc.returncode:
            break
    if (clone / "junit.xml").is_file():
        result["tests_by_mark"] = seconds_by_mark(clone / "junit.xml", e2e_test_ids(clone, env))
        print(f"         tests by mark (s): {result['tests_by_mark']}", flush=True)
    total = sum(p["seconds"] for p in result["phases"].values())
    result["total_s"] = round(total, 1)
    result["ratio_to_20_min"] = round(total / TARGET_S, 3)
    result["logs"] = str(work)
    # the clone's virtual environment is ~7 GB (torch's CUDA wheel): a few runs filled this machine's disk
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    print(f"total    {total:7.1f} s  ratio to the 20-minute target {total / TARGET_S:.2f}  (logs: {work})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(p["rc"] == 0 for p in result["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
