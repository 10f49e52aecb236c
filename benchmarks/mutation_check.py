"""Mutation check: break the method one way at a time and show that some test fails for each break.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation_check.py --out benchmarks/results/mutation_check.json
    .venv/bin/python benchmarks/mutation_check.py --only frame-mapping --no-e2e      # one break, unit tests only

Each break is applied to a temporary copy of the working tree (``git ls-files``: tracked files and
untracked ones git does not ignore; the shared tree is never touched), and the tests that should catch
it run there with ``PYTHONPATH`` pointing at the copy, so pytest, verl's plugin loader and every Ray
worker of an end-to-end run import the broken code. A control run of the same tests on an unbroken copy
comes first: a test that fails there proves nothing about a break. A break is *caught* when at least
one of its tests fails (an assertion, not only an error) that passed in the control run.

A break is a small edit, either a regex replacement that must match exactly once, or code appended to
a module that rebinds one of its names (robust to rewrites of the function's body). A break whose
anchor no longer exists is reported as ``stale`` and the check exits 1: update the break, do not
drop it. The result (``--out``) holds the command, the commit, the thread count and, per break, the
tests run, those that failed with the first line of their message, and the seconds taken.

Not run in CI: the three end-to-end runs take ~4 minutes; docs/benchmarks.md ("Mutation check")
shows its last result.
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
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiny_run import git_commit  # benchmarks/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]

#: appended to grto_trainer.py: phase 1 computes the mask rewards but its write of ``rm_scores`` to
#: TransferQueue is dropped, so verl's advantages see the agent loop's box reward
_DROP_MASK_REWARD = """

# MUTATION: the mask rewards never reach rm_scores
_mutation_tool_rewards = GRTOTrainer._tool_rewards


def _mutation_tool_rewards_dropped(self, batch, metrics):
    real = globals()["tq"]

    class _DropScores:
        def __getattr__(self, name):
            return getattr(real, name)

        def kv_batch_put(self, *args, fields=None, **kwargs):
            if fields is not None and "rm_scores" in fields.keys():
                return None
            return real.kv_batch_put(*args, fields=fields, **kwargs)

    globals()["tq"] = _DropScores()
    try:
        return _mutation_tool_rewards(self, batch, metrics)
    finally:
        globals()["tq"] = real


GRTOTrainer._tool_rewards = _mutation_tool_rewards_dropped
"""

#: appended to bto/train.py: BTO runs its epochs, but every update carries zero weight (no step)
_BTO_LEARNS_NOTHING = """

# MUTATION: BTO's updates carry no weight
_mutation_train = train_tool_on_buffer


def train_tool_on_buffer(engine, *args, **kwargs):
    update = engine.update
    engine.update = lambda batch, weights=None, *rest, **kwargs: update(batch, [0.0] * batch.num_rollouts, *rest, **kwargs)
    try:
        return _mutation_train(engine, *args, **kwargs)
    finally:
        del engine.update
"""

#: appended to reward/frame.py: answers are no longer mapped from the policy's frame to the image's
_NO_FRAME_MAPPING = """

# MUTATION: no frame mapping
def to_image_frame(parsed, answer_size, image_size):
    return parsed
"""

#: appended to reward/mask_iou.py: ignore regions are scored like any other pixel
_NO_IGNORE_RULE = """

# MUTATION: ignore regions count
_mutation_intersection_union = intersection_union


def intersection_union(pred, gt, ignore=None):
    return _mutation_intersection_union(pred, gt, None)
"""


@dataclass
class Break:
    """One way to break the method: ``file`` edited by ``pattern`` -> ``replacement`` (regex, exactly one
    match) and/or by appending ``append`` (code that rebinds a name; ``requires`` lists what it rebinds,
    which must still be in the file); ``tests`` are the test files that should catch it, ``e2e`` the
    end-to-end ones (they start main_ppo)."""

    name: str
    what: str
    file: str
    tests: list[str]
    pattern: str | None = None
    replacement: str = ""
    append: str = ""
    requires: list[str] = field(default_factory=list)  # what ``append`` rebinds must still be there
    e2e: list[str] = field(default_factory=list)

    def apply(self, root: Path) -> None:
        path = root / self.file
        text = path.read_text()
        for needed in self.requires:
            if needed not in text:
                raise StaleBreakError(f"{self.name}: {self.file} no longer contains {needed!r}")
        if self.pattern is not None:
            text, count = re.subn(self.pattern, self.replacement, text)
            if count != 1:
                raise StaleBreakError(f"{self.name}: {self.pattern!r} matches {count} times in {self.file}")
        path.write_text(text + self.append)


class StaleBreakError(RuntimeError):
    pass


BREAKS = [
    Break(
        name="tool-optimiser-step",
        what="the tool's optimiser never steps (ToolEngine.update computes the loss and gradients, then skips optimizer.step())",
        file="verl_grto/tool/engine.py",
        pattern=r"self\.optimizer\.step\(\)",
        replacement="pass  # MUTATION: no optimiser step",
        tests=["tests/test_tool_engine.py", "tests/test_tool_loss_scale.py"],
        e2e=["tests/test_e2e_bgrto.py"],
    ),
    Break(
        name="mask-reward-not-in-advantage",
        what="the trainer computes the mask rewards but never writes them to rm_scores: verl's advantages use the agent loop's box reward",
        file="verl_grto/trainer/grto_trainer.py",
        append=_DROP_MASK_REWARD,
        requires=["class GRTOTrainer(", "    def _tool_rewards(self, batch", "\nimport transfer_queue as tq\n"],
        tests=["tests/test_grto_trainer.py"],
        e2e=["tests/test_e2e_bgrto.py"],
    ),
    Break(
        name="advantage-ignores-reward",
        what="the grto advantage estimator is given zeros instead of the token-level (mask) rewards",
        file="verl_grto/algorithm/advantage.py",
        pattern=r"token_level_rewards=token_level_rewards,",
        replacement="token_level_rewards=torch.zeros_like(token_level_rewards),",
        tests=["tests/test_grto_algorithm.py"],
    ),
    Break(
        name="bto-learns-nothing",
        what="BTO runs all its epochs but every tool update has zero weight, so the tool never changes",
        file="verl_grto/algorithm/bto/train.py",
        append=_BTO_LEARNS_NOTHING,
        requires=["\ndef train_tool_on_buffer(\n    engine: ToolEngine,", "engine.update(batch, "],
        tests=["tests/test_bootstrap.py"],
        e2e=["tests/test_e2e_bgrto.py"],
    ),
    Break(
        name="frame-mapping",
        what="answers stay in the policy's resized frame instead of being mapped to the image's (reward/frame.py)",
        file="verl_grto/reward/frame.py",
        append=_NO_FRAME_MAPPING,
        requires=["\ndef to_image_frame(parsed", "to_image_frame(parse_answer("],
        tests=["tests/test_image_frame.py"],
    ),
    Break(
        name="ignore-region-rule",
        what="ignore-region pixels count in intersection and union (reward/mask_iou.py, the rule rewards, validation and evaluation share)",
        file="verl_grto/reward/mask_iou.py",
        append=_NO_IGNORE_RULE,
        requires=["\ndef intersection_union(pred", "ignore"],
        tests=["tests/test_metrics.py", "tests/test_evaluate.py"],
    ),
]


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked-not-ignored files), copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file() and not src.is_symlink():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_tests(root: Path, tests: list[str], log: Path) -> dict[str, Any]:
    """pytest on ``tests`` inside ``root`` (its code first on the path); outcome per test id."""
    xml = log.with_suffix(".xml")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("VERL_GRTO_E2E_HOME", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *tests,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    outcomes: dict[str, dict[str, str]] = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            test_id = f"{case.get('file') or case.get('classname', '').replace('.', '/') + '.py'}::{case.get('name')}"
            status, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    status, message = kind, (node.get("message") or node.text or "").strip().splitlines()[:1]
                    message = message[0][:300] if message else ""
                    break
            outcomes[test_id] = {"status": status, "message": message}
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "outcomes": outcomes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, help="run only this break (repeatable)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end tests (minutes each)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies and logs")
    args = ap.parse_args(argv)

    breaks = [b for b in BREAKS if args.only is None or b.name in args.only]
    unknown = set(args.only or ()) - {b.name for b in BREAKS}
    if unknown:
        ap.error(f"unknown break(s) {sorted(unknown)}; known: {[b.name for b in BREAKS]}")
    work = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {
        "what": "benchmarks/mutation_check.py: each break applied alone to a copy of the tree, its tests run there",
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + " ".join([".venv/bin/python", "benchmarks/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
        **git_commit(),
        "date_utc": started.isoformat(timespec="seconds"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "breaks": [],
    }

    def tests_of(b: Break) -> list[str]:
        return b.tests + ([] if args.no_e2e else b.e2e)

    snapshot = work / "tree"  # the tree as it is now: every copy below comes from it, not from later edits
    copy_tree(snapshot)
    control_root = work / "control"
    shutil.copytree(snapshot, control_root)
    control_tests = sorted({t for b in breaks for t in tests_of(b)})
    print(f"control: {len(control_tests)} test files on the unbroken tree", flush=True)
    control = run_tests(control_root, control_tests, work / "control.log")
    passed_in_control = {t for t, o in control["outcomes"].items() if o["status"] == "passed"}
    result["control"] = {
        "tests": control_tests,
        "rc": control["rc"],
        "seconds": control["seconds"],
        "passed": len(passed_in_control),
        "not_passed": {t: o for t, o in control["outcomes"].items() if o["status"] != "passed"},
    }
    print(f"  rc {control['rc']}, {len(passed_in_control)} passed, {control['seconds']} s", flush=True)

    stale = False
    for b in breaks:
        root = work / b.name
        shutil.copytree(snapshot, root)
        entry: dict[str, Any] = {"name": b.name, "what": b.what, "file": b.file, "tests": tests_of(b)}
        try:
            b.apply(root)
        except StaleBreakError as e:
            stale = True
            entry.update(status="stale", error=str(e))
            result["breaks"].append(entry)
            print(f"{b.name}: STALE ({e})", flush=True)
            continue
        run = run_tests(root, tests_of(b), work / f"{b.name}.log")
        failed = {t: o for t, o in run["outcomes"].items() if o["status"] in ("failure", "error")}
        caught_by = sorted(t for t, o in failed.items() if o["status"] == "failure" and t in passed_in_control)
        entry.update(
            status="caught" if caught_by else "missed",
            caught_by=caught_by,
            failed={t: o for t, o in failed.items()},
            passed=sorted(t for t, o in run["outcomes"].items() if o["status"] == "passed"),
            seconds=run["seconds"],
        )
        result["breaks"].append(entry)
        print(f"{b.name}: {entry['status']} by {len(caught_by)} test(s), {run['seconds']} s", flush=True)
        for t in caught_by:
            print(f"    {t}: {failed[t]['message'][:160]}", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    result["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    result["all_caught"] = all(e["status"] == "caught" for e in result["breaks"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.keep:
        print(f"copies and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(e['status'] == 'caught' for e in result['breaks'])} of {len(result['breaks'])} breaks caught")
    return 0 if result["all_caught"] and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
