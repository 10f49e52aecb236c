"""Wall time and peak memory of a tiny run, split into start-up and steps; one JSON per run.

    .venv/bin/python benchmarks/tiny_run.py [--recipe grpo_tiny_cpu] [--steps 2]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiny_run.py --recipe bgrto_tiny_cpu --fresh   # the README's main job

``--fresh`` times what a fresh machine does: an empty ``VERL_GRTO_HOME``, so the tiny models (the
shipped ones, or built when ``VERL_GRTO_SHIPPED_ASSETS=0``) and the data are made inside the timing
(start-up), the recipe's own step count and checkpoints, and the ratio to the main job's 15-minute
target. A fresh run writes its record to ``benchmarks/results/tiny_run/<recipe>-<UTC time>.json``
(``--out`` elsewhere): the command, the commit, the thread count, the seconds, the peak memory with
what each process held at that moment, the console's line count and summary lines, and every
validation of the run (gIoU, cIoU, the box-fill baseline, the policy's box IoU). The README's
main-job numbers are read from such a file.

Runs ``python -m verl.trainer.main_ppo --config-path recipes --config-name RECIPE`` in a subprocess
and samples the memory of its whole process tree (driver, Ray, workers, rollout servers) every
second. Start-up ends when verl's trainer logs "Training from scratch" / "Resuming from"; the steps
phase runs from there to the exit. Without ``--fresh`` the tiny assets and data are built first
(outside the timing).
Memory, two ways: RSS summed over processes counts memory they share (shared libraries, Ray's
object store) once per process, an upper bound; PSS (proportional set size, /proc/PID/smaps_rollup)
splits each shared page among the processes mapping it, so its sum is what the run holds in RAM.
A measurement, not a test: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "tiny_run"
START_MARKERS = ("Training from scratch", "Resuming from")
GIB = 1024**3
#: what a validation record keeps of the trainer's summary (grto_summary.json)
VAL_KEYS = ("gIoU", "cIoU", "box_fill_gIoU", "policy_box_iou", "policy_box_area_ratio", "parse_rate", "n")


def process_label(proc: psutil.Process) -> str:
    """A short name for one process of the run's tree, the same for every process of one kind.

    Ray names its workers by their actor class (``ray::WorkerDict.method`` while busy, ``ray::IDLE``
    for a pooled worker); other processes by their program and, for Python, the script or module."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return proc.name()
    if cmd[0].startswith("ray::"):  # "ray::Class", "ray::Class.method" or a named actor's "ray::name:Class"
        return "ray::" + cmd[0].split()[0][len("ray::") :].split(":")[-1].split(".")[0]
    prog = Path(cmd[0]).name
    if prog.startswith("python"):
        if len(cmd) > 2 and cmd[1] == "-m":
            return f"python -m {cmd[2]}"
        args = [a for a in cmd[1:] if not a.startswith("-")]
        if args:
            script = Path(args[0])
            return f"python {'/'.join(script.parts[-2:])}"
    return prog


def tree_memory(proc: psutil.Process) -> list[tuple[int, str, int, int, int]]:
    """``(pid, label, rss, pss, uss)`` in bytes for ``proc`` and all its descendants (USS: the pages only
    that process maps, what ending it would free)."""
    out = []
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process may exit between listing and reading
            info = p.memory_full_info()
            out.append((p.pid, process_label(p), info.rss, info.pss, info.uss))
    return out


def by_label(procs: list[tuple[int, str, int, int, int]]) -> list[dict[str, Any]]:
    """One row per kind of process (summed), largest PSS first: the table docs/benchmarks.md shows."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "pss_gib": 0.0, "uss_gib": 0.0, "rss_gib": 0.0})
    for _, label, rss, pss, uss in procs:
        row = rows[label]
        row["count"] += 1
        row["pss_gib"] += pss / GIB
        row["uss_gib"] += uss / GIB
        row["rss_gib"] += rss / GIB
    table = [{"process": k, **v} for k, v in rows.items()]
    for row in table:
        for key in ("pss_gib", "uss_gib", "rss_gib"):
            row[key] = round(row[key], 3)
    return sorted(table, key=lambda r: -r["pss_gib"])


def prebuild(recipe: str) -> None:
    """Resolve the recipe once here, so its resolvers build the tiny assets and data before the timing."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import verl_grto  # noqa: F401  (registers the resolvers)

    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        OmegaConf.resolve(compose(config_name=recipe))


def git_commit() -> dict[str, Any]:
    """HEAD and whether the work tree differs from it (a number from a dirty tree says so)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {"commit": head, "dirty": bool(dirty)}


def validations(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's validations as the record keeps them: label, step and the ``val-grto/*`` numbers."""
    return [
        {"label": v.get("label"), "step": int(v["step"]), **{k: v.get(f"val-grto/{k}") for k in VAL_KEYS}}
        for v in summary.get("validations") or []
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="grpo_tiny_cpu")
    ap.add_argument("--steps", type=int, default=None, help="default: 2, or the recipe's own with --fresh")
    ap.add_argument("--fresh", action="store_true", help="empty VERL_GRTO_HOME: asset building is timed")
    ap.add_argument("--log", type=Path, default=None, help="write the run's whole console output here")
    ap.add_argument("--runs", type=Path, default=None, help="keep the run's checkpoints here (default: a temp dir)")
    ap.add_argument(
        "--out", type=Path, default=None, help="the JSON record (default with --fresh: benchmarks/results/tiny_run/)"
    )
    ap.add_argument(
        "--trace", type=Path, default=None, help="write every sample (per process kind) here, as JSON lines"
    )
    ap.add_argument("overrides", nargs="*", help="hydra overrides passed to main_ppo")
    args = ap.parse_args(argv)

    runs = str(args.runs.resolve()) if args.runs else tempfile.mkdtemp(prefix="tiny_run_")
    env = {**os.environ, "VERL_GRTO_RUNS": runs}
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "recipes", "--config-name", args.recipe]
    if args.fresh:
        env["VERL_GRTO_HOME"] = tempfile.mkdtemp(prefix="tiny_run_home_")
        env["HF_DATASETS_CACHE"] = str(Path(env["VERL_GRTO_HOME"]) / "hf_datasets")
    else:
        prebuild(args.recipe)
        cmd.append("trainer.save_freq=-1")
    if args.steps is not None or not args.fresh:
        cmd.append(f"trainer.total_training_steps={args.steps or 2}")
    cmd += args.overrides
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"startup": 0, "steps": 0}
    peak_pss = {"startup": 0, "steps": 0}
    at_peak: dict[str, Any] = {"pss": 0, "procs": [], "t": 0.0}
    phase = {"name": "startup", "t": None}
    stop = threading.Event()
    trace = open(args.trace, "w") if args.trace else None  # noqa: SIM115

    def sample() -> None:
        while not stop.is_set():
            procs = tree_memory(ps)
            rss, pss = sum(p[2] for p in procs), sum(p[3] for p in procs)
            if trace is not None:
                kinds = {r["process"]: r["pss_gib"] for r in by_label(procs)}
                trace.write(
                    json.dumps(
                        {
                            "t": round(time.perf_counter() - t0, 1),
                            "phase": phase["name"],
                            "pss_gib": round(pss / GIB, 3),
                            "by_kind": kinds,
                        }
                    )
                    + "\n"
                )
            peak[phase["name"]] = max(peak[phase["name"]], rss)
            peak_pss[phase["name"]] = max(peak_pss[phase["name"]], pss)
            if pss > at_peak["pss"]:
                at_peak.update(pss=pss, procs=procs, t=time.perf_counter() - t0, phase=phase["name"])
            time.sleep(1.0)  # reading smaps_rollup of ~20 processes costs CPU: keep the probe light

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    summary_lines: list[str] = []
    n_lines = 0
    log = open(args.log, "w") if args.log else contextlib.nullcontext()  # noqa: SIM115
    for line in proc.stdout:
        n_lines += 1
        if args.log:
            log.write(line)
        tail = (tail + [line])[-40:]
        text = re.sub(r"^(\x1b\[[0-9;]*m)?\([^)]*\)(\x1b\[0m)? ", "", line)  # Ray's "(Actor pid=N) " prefix
        if any(m in text for m in ("summary ====", "time (s):", "BTO wall time")) or text.startswith("validation "):
            summary_lines.append(text)
        if phase["t"] is None and any(m in line for m in START_MARKERS):
            phase["t"] = time.perf_counter()
            phase["name"] = "steps"
    rc = proc.wait()
    t_end = time.perf_counter()
    if args.log:
        log.close()
    stop.set()
    sampler.join()
    if trace is not None:
        trace.close()
    if rc != 0 or phase["t"] is None:
        print("".join(tail), file=sys.stderr)
        print(f"main_ppo exited with {rc}", file=sys.stderr)
        return 1
    startup, steps = phase["t"] - t0, t_end - phase["t"]
    n_steps = args.steps or (2 if not args.fresh else "the recipe's")
    threads = os.environ.get("OMP_NUM_THREADS")
    print(
        f"recipe {args.recipe}, {n_steps} steps, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, fresh home: {args.fresh}"
    )
    for name, phase_name, seconds in (
        ("start-up", "startup", startup),
        ("steps", "steps", steps),
        ("total", None, t_end - t0),
    ):
        rss, pss = (max(p.values()) if phase_name is None else p[phase_name] for p in (peak, peak_pss))
        note = "   (incl. validation and shutdown)" if name == "steps" else ""
        print(f"{name:9}: {seconds:7.1f} s   peak summed PSS {pss / GIB:5.2f} GiB   RSS {rss / GIB:5.2f} GiB{note}")
    table = by_label(at_peak["procs"])
    print(f"at the peak ({at_peak['t']:.0f} s, {at_peak.get('phase')}): what each kind of process held")
    for row in table:
        print(
            f"  {row['process'][:52]:52s} x{row['count']:<3d} PSS {row['pss_gib']:5.2f} GiB  "
            f"USS {row['uss_gib']:5.2f} GiB  RSS {row['rss_gib']:5.2f} GiB"
        )
    print("".join(summary_lines), end="")
    print(f"console output: {n_lines} lines; the run's files: {runs}")
    if args.fresh:
        print(f"ratio total / 15-minute target: {(t_end - t0) / 900:.2f}")
        print(f"ratio peak PSS / 8 GB target: {max(peak_pss.values()) / 8e9:.2f}")
    print(f"ratio steps/start-up: {steps / startup:.2f}")

    out = args.out or (RESULTS / f"{args.recipe}-{started.strftime('%Y%m%dT%H%M%SZ')}.json" if args.fresh else None)
    if out is not None:
        summary_path = next(Path(runs).glob("*/grto_summary.json"), None)
        summary = json.loads(summary_path.read_text()) if summary_path else {}
        record = {
            "what": "benchmarks/tiny_run.py: one run of main_ppo, timed, its process tree's memory sampled every second",
            "command": (f"OMP_NUM_THREADS={threads} " if threads else "")
            + shlex.join([".venv/bin/python", "benchmarks/tiny_run.py", *(argv if argv is not None else sys.argv[1:])]),
            "main_ppo": shlex.join(["python", *cmd[1:]]),
            **git_commit(),
            "date_utc": started.isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "omp_num_threads": threads,
            "recipe": args.recipe,
            "fresh": args.fresh,
            "seconds": {
                "total": round(t_end - t0, 1),
                "startup": round(startup, 1),
                "steps": round(steps, 1),
                "stages": {k: round(v, 1) for k, v in (summary.get("seconds") or {}).items()},
            },
            "peak_pss_gib": round(max(peak_pss.values()) / GIB, 3),
            "peak_rss_gib": round(max(peak.values()) / GIB, 3),
            "peak_pss_gib_by_phase": {k: round(v / GIB, 3) for k, v in peak_pss.items()},
            "at_peak": {"seconds_in": round(at_peak["t"], 1), "phase": at_peak.get("phase"), "processes": table},
            "console_lines": n_lines,
            "console_summary": [ln.rstrip("\n") for ln in summary_lines],
            "validations": validations(summary),
            "bto": (summary.get("bto") or {}).get("buffer"),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"record: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
