"""Wall time and peak memory of a tiny run, split into start-up and steps.

    .venv/bin/python benchmarks/tiny_run.py [--recipe grpo_tiny_cpu] [--steps 2]
    .venv/bin/python benchmarks/tiny_run.py --recipe bgrto_tiny_cpu --fresh   # the README's main job

``--fresh`` times what a fresh machine does: an empty ``VERL_GRTO_HOME``, so the tiny models, their
warm start / pre-training and the data are built inside the timing (start-up), the recipe's own
step count and checkpoints, and the ratio to the main job's 15-minute target.

Runs ``python -m verl.trainer.main_ppo --config-path recipes --config-name RECIPE`` in a subprocess
and samples the summed memory of its whole process tree (driver, Ray, workers, rollout servers) every
second. Start-up ends when verl's trainer logs "Training from scratch" / "Resuming from"; the steps
phase runs from there to the exit. Without ``--fresh`` the tiny assets and data are built first
(outside the timing).
Memory, two ways: RSS summed over processes counts memory they share (Ray's object store, shared
libraries) once per process, an upper bound; PSS (proportional set size, from /proc/PID/smaps_rollup)
splits each shared page among the processes mapping it, so its sum is what the run holds in RAM.
A measurement, not a test: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
START_MARKERS = ("Training from scratch", "Resuming from")


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """Summed RSS and summed PSS (bytes) of ``proc`` and all its descendants."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process may exit between listing and reading
            info = p.memory_full_info()
            rss += info.rss
            pss += info.pss
    return rss, pss


def prebuild(recipe: str) -> None:
    """Resolve the recipe once here, so its resolvers build the tiny assets and data before the timing."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import verl_grto  # noqa: F401  (registers the resolvers)

    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        OmegaConf.resolve(compose(config_name=recipe))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="grpo_tiny_cpu")
    ap.add_argument("--steps", type=int, default=None, help="default: 2, or the recipe's own with --fresh")
    ap.add_argument("--fresh", action="store_true", help="empty VERL_GRTO_HOME: asset building is timed")
    ap.add_argument("--log", type=Path, default=None, help="write the run's whole console output here")
    args = ap.parse_args()

    runs = tempfile.mkdtemp(prefix="tiny_run_")
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
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"startup": 0, "steps": 0}
    peak_pss = {"startup": 0, "steps": 0}
    phase = {"name": "startup", "t": None}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss = tree_memory(ps)
            peak[phase["name"]] = max(peak[phase["name"]], rss)
            peak_pss[phase["name"]] = max(peak_pss[phase["name"]], pss)
            time.sleep(1.0)  # reading smaps_rollup of ~20 processes costs CPU: keep the probe light

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    summary: list[str] = []
    n_lines = 0
    log = open(args.log, "w") if args.log else contextlib.nullcontext()  # noqa: SIM115
    for line in proc.stdout:
        n_lines += 1
        if args.log:
            log.write(line)
        tail = (tail + [line])[-40:]
        if any(m in line for m in ("summary ====", "time (s):", "BTO wall time")) or line.startswith("validation "):
            summary.append(line)
        if phase["t"] is None and any(m in line for m in START_MARKERS):
            phase["t"] = time.perf_counter()
            phase["name"] = "steps"
    rc = proc.wait()
    t_end = time.perf_counter()
    if args.log:
        log.close()
    stop.set()
    sampler.join()
    if rc != 0 or phase["t"] is None:
        print("".join(tail), file=sys.stderr)
        print(f"main_ppo exited with {rc}", file=sys.stderr)
        return 1
    startup, steps = phase["t"] - t0, t_end - phase["t"]
    gib = 1024**3
    n_steps = args.steps or (2 if not args.fresh else "the recipe's")
    print(f"recipe {args.recipe}, {n_steps} steps, {os.cpu_count()} CPUs, fresh home: {args.fresh}")
    for name, phase_name, seconds in (
        ("start-up", "startup", startup),
        ("steps", "steps", steps),
        ("total", None, t_end - t0),
    ):
        rss, pss = (max(p.values()) if phase_name is None else p[phase_name] for p in (peak, peak_pss))
        note = "   (incl. validation and shutdown)" if name == "steps" else ""
        print(f"{name:9}: {seconds:7.1f} s   peak summed PSS {pss / gib:5.2f} GiB   RSS {rss / gib:5.2f} GiB{note}")
    print("".join(summary), end="")
    print(f"console output: {n_lines} lines; the run's files: {runs}")
    if args.fresh:
        print(f"ratio total / 15-minute target: {(t_end - t0) / 900:.2f}")
        print(f"ratio peak PSS / 8 GB target: {max(peak_pss.values()) / 8e9:.2f}")
    print(f"ratio steps/start-up: {steps / startup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
