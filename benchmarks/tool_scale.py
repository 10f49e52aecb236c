"""The tool at SAM2.1-L sizes on the CPU: is its memory bounded by its settings, not by the batch or the data?

    .venv/bin/python benchmarks/tool_scale.py --quick    # < 10 minutes on 2 cores: validation 16 vs 1 images
    .venv/bin/python benchmarks/tool_scale.py            # the issue's sizes: validation 256 vs 16 images (~25 min)

Writes ``benchmarks/results/tool_scale.json`` (``--out``) with the command, the commit and the thread count.

The tool is built as the trainer builds it: random SAM2.1-L weights (``meta_sam2_config``) saved as a
checkpoint, then ``ToolSettings.build_tool`` with the full-size recipe's ``grto.tool`` section
(``recipes/qwen25vl_7b_sam21_large_base.yaml``: ``chunk_images``, ``cache_bytes``, ``encoder_dtype``,
the loss at 256 px, mask decoder trained with its high-resolution convs). Images are 1000 x 1000 (1 MP),
each rollout a box with its rectangle as ground truth, G = 8 rollouts per image.

Every memory figure is measured in a fresh process (``--measure``): the peak of the process's resident
memory sampled every 2 ms during the measured call, minus the resident memory just before it (the
model is loaded by then). The measuring processes run with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so a freed tensor's pages leave the resident set when it is freed and the
figure is what is alive. With glibc's default (a threshold that rises after large frees) the heap keeps
freed pages, by an amount that varies from run to run; the step pair is measured that way too and
recorded beside (``runs.default_malloc``), not used for the ratios. Ratios are taken between two such
processes of one run:

* ``update_peak_bytes_ratio_128_over_8``: one GRTO tool step of a rank (the rewards' ``predict``, then
  ``update``) at 128 vs 8 rollouts (16 vs 1 images);
* ``validation_peak_bytes_ratio_256_over_16``: a validation pass (``predict`` with the box-fill
  baseline, one greedy rollout per image, one cache for the pass) over 256 vs 16 images (``--quick``:
  16 vs 1, key ``validation_peak_bytes_ratio_16_over_1``);
* ``bytes_to_driver_per_rollout``: the pickled size of what a rank returns to the driver for a training
  step's rewards (``ToolScores``, overlays off) per rollout, beside the same for the full-resolution
  masks the driver used to receive;
* ``bto_encodes_per_image_per_epoch``: BTO's tool stage on a buffer of more images than its cache holds
  (``train_tool_on_buffer``), beside what fresh permutations each epoch would encode (simulated LRU);
* ``encodes_per_distinct_image``: a validation pass over a RefCOCO-like split (several rows per image,
  spread over two validation batches) through the trainer's own sharding (``GRTOTrainer._shards``) and
  the tool worker's ``tool_predict``, beside keying the cache by row (what it was);
* the per-image feature bytes and the per-rollout backward bytes (``update`` of one image at G = 16
  minus G = 8, over 8) that docs/recipes.md's memory table is computed from.

A measurement, not a test: the machine is shared and noisy; memory is less so than time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qwen25vl_7b_sam21_large_base.yaml"
CONFIG = "sam2.1_hiera_l"
GROUP = 8
IMAGE_HW = (1000, 1000)


# ---- helpers run inside a measuring process -------------------------------------------------------


class PeakRSS:
    """Resident memory sampled every 2 ms in a thread (torch releases the GIL in its kernels)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.before = self.rss()
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.before


def _settings(config_name: str, **overrides: Any):
    """The recipe's tool settings, reading a fresh random-weight checkpoint of ``config_name``."""
    import yaml

    from verl_grto.tool.configs import meta_sam2_config, tiny_sam2_config
    from verl_grto.tool.model import SegmentationTool
    from verl_grto.tool.settings import ToolSettings

    config = tiny_sam2_config() if config_name == "tiny" else meta_sam2_config(config_name)
    path = tempfile.mkdtemp(prefix="tool_scale_")
    SegmentationTool.from_config(config, seed=0).model.save_pretrained(path)
    section = {**yaml.safe_load(RECIPE.read_text())["grto"]["tool"], "path": path, **overrides}
    return ToolSettings.from_config(section)


class Images:
    """Random 1 MP images by key ``img<k>``, made on demand (the workers' image loader)."""

    def __init__(self, hw: tuple[int, int] = IMAGE_HW) -> None:
        self.hw = hw

    def __call__(self, key: str) -> np.ndarray:
        k = int(str(key).removeprefix("img"))
        return np.random.default_rng(k).integers(0, 256, (*self.hw, 3), dtype=np.uint8)

    def key(self, sample_id: str) -> str:  # BTO's ImageSource: a row's image key
        return str(sample_id).split("/")[0]

    def image_by_key(self, key: str) -> np.ndarray:
        return self(key)


def _batch(images: int, group: int, first: int = 0, hw: tuple[int, int] = IMAGE_HW):
    """``images`` images (keys img<first>...) with ``group`` rollouts each: a random box, its rectangle as
    ground truth (COCO RLE, as the trainer sends it). No pixels: the engine's loader reads them."""
    from verl_grto.data.masks import encode_rle
    from verl_grto.tool.engine import ToolBatch, ToolTarget
    from verl_grto.tool.prompts import ObjectPrompt

    rng = np.random.default_rng(first)
    h, w = hw
    prompts, targets = [], []
    for _ in range(images * group):
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x2, y2 = x1 + int(rng.integers(w // 8, w // 2)), y1 + int(rng.integers(h // 8, h // 2))
        mask = np.zeros(hw, dtype=bool)
        mask[y1:y2, x1:x2] = True
        prompts.append([ObjectPrompt((float(x1), float(y1), float(x2), float(y2)))])
        targets.append(ToolTarget(encode_rle(mask)))
    keys = [f"img{first + j}" for j in range(images)]
    return ToolBatch(keys, [None] * images, [r // group for r in range(images * group)], prompts, targets)


def _engine(config_name: str, **overrides: Any):
    from verl_grto.tool.engine import ToolEngine

    settings = _settings(config_name, **overrides)
    return ToolEngine(settings.build_tool("cpu"), settings, image_loader=Images()), settings


def measure_step(config_name: str, rollouts: int, group: int) -> dict[str, Any]:
    """One rank's GRTO tool step: predict (the rewards' counts) then update, at ``rollouts`` rollouts."""
    from verl_grto.tool.worker import ToolScores

    engine, settings = _engine(config_name)
    batch = _batch(rollouts // group, group)
    with PeakRSS() as rss:
        engine.begin_step()
        pred = engine.predict(batch, return_masks=False)
        scores = ToolScores.from_prediction(pred, [])
        metrics = engine.update(batch)
    full = engine.predict(_batch(1, group, first=10_000), return_masks=True)  # what the driver used to get
    return {
        "rollouts": rollouts,
        "images": rollouts // group,
        "peak_bytes": rss.delta,
        "skipped": metrics["skipped"],
        "chunks": metrics["chunks"],
        "images_encoded": engine.cache.images_encoded,
        "bytes_to_driver_per_rollout": len(pickle.dumps(scores, protocol=5)) / rollouts,
        "full_masks_bytes_per_rollout": len(pickle.dumps([m.numpy() for m in full.masks], protocol=5)) / group,
        "feature_bytes_per_image": engine.cache.bytes_per_image,
        "settings": {
            "chunk_images": settings.chunk_images,
            "cache_bytes": settings.cache_bytes,
            "encoder_dtype": settings.encoder_dtype,
        },
    }


def measure_validation(config_name: str, images: int, batch_images: int) -> dict[str, Any]:
    """A validation pass: one greedy rollout per image, scored with the box-fill baseline, in validation
    batches of ``batch_images`` with one cache for the pass (as ``GRTOTrainer._validate``)."""
    engine, _ = _engine(config_name)
    with PeakRSS() as rss:
        engine.begin_step()
        for start in range(0, images, batch_images):
            n = min(batch_images, images - start)
            engine.predict(_batch(n, 1, first=start), return_masks=False, fill_baseline=True)
        engine.begin_step()
    return {"images": images, "peak_bytes": rss.delta, "images_encoded": engine.cache.images_encoded}


def measure_update_slope(config_name: str, group: int) -> dict[str, Any]:
    """One image's update (features already cached) at ``group`` rollouts: the activations of one chunk."""
    engine, _ = _engine(config_name)
    batch = _batch(1, group)
    engine.cache.get(batch.image_keys, [Images()(k) for k in batch.image_keys])
    with PeakRSS() as rss:
        engine.update(batch)
    return {"rollouts": group, "peak_bytes": rss.delta}


def measure_features(config_name: str) -> dict[str, Any]:
    """Bytes of one image's cached features: the recipe's (bf16 raw high-resolution levels), fp32 raw, and
    with conv_s0 / conv_s1 frozen (projected, ~5x smaller)."""
    out = {}
    for name, overrides in {
        "recipe": {},
        "float32_raw": {"encoder_dtype": None},
        "float32_projected": {"encoder_dtype": None, "freeze_high_res_convs": True},
    }.items():
        engine, _ = _engine(config_name, **overrides)
        engine.cache.get(["img0"], [Images()("img0")])
        out[name] = engine.cache.bytes_per_image
    return out


def measure_bto(config_name: str, images: int, cache_images: int, epochs: int) -> dict[str, Any]:
    """BTO's tool stage on ``images`` images (2 rollouts each) with a cache of ``cache_images`` images."""
    from verl_grto.algorithm.bto.buffer import BufferMeta, BufferRecord, RolloutBuffer, prompts_to_json
    from verl_grto.algorithm.bto.train import train_tool_on_buffer
    from verl_grto.data.masks import encode_rle
    from verl_grto.data.schema import GroundTruth
    from verl_grto.reward.answer import ToolPrompt

    hw = IMAGE_HW if config_name != "tiny" else (96, 128)
    engine, _ = _engine(config_name)
    engine.cache.get(["img0"], [Images(hw)("img0")])
    bytes_per_image = engine.cache.bytes_per_image
    engine.begin_step()
    records = []
    h, w = hw
    mask = np.zeros(hw, dtype=bool)
    mask[h // 4 : h // 2, w // 4 : w // 2] = True
    gt = GroundTruth(encode_rle(mask), [[w / 4, h / 4, w / 2, h / 2]], hw).to_json()
    for j in range(images):
        for k in range(2):
            box = ToolPrompt(box=(w / 4 - k, h / 4, w / 2 + k, h / 2))
            records.append(BufferRecord(f"img{j}/r", f"img{j}", k, "", prompts_to_json([box]), True, "", [], [], gt))
    buffer = RolloutBuffer(BufferMeta("none", 2, 0, time.strftime("%Y-%m-%d")), records)
    report = train_tool_on_buffer(
        engine,
        buffer,
        Images(hw),
        epochs=epochs,
        batch_size=1,
        max_cache_bytes=cache_images * bytes_per_image,
        progress=False,
    )
    return {
        "images": images,
        "cache_images": cache_images,
        "epochs": epochs,
        "images_encoded": report.images_encoded,
        "encodes_per_image_per_epoch": report.images_encoded / (images * epochs),
        "fresh_permutations_encodes_per_image_per_epoch": _lru_encodes(images, cache_images, epochs)
        / (images * epochs),
    }


def _lru_encodes(n: int, window: int, epochs: int, seed: int = 0) -> int:
    """Encodes an LRU cache of ``window`` images makes when every epoch visits a fresh permutation (BTO's
    order before it became cache-aware), one image per batch: a simulation of the same cache rule."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    encodes = 0
    for epoch in range(epochs):
        for k in np.random.default_rng([seed, epoch]).permutation(n):
            if k in cache:
                cache.move_to_end(k)
                continue
            encodes += 1
            cache[k] = None
            while len(cache) > window:
                cache.popitem(last=False)
    return encodes


def measure_refcoco_like(config_name: str, images: int, rows_per_image: int) -> dict[str, Any]:
    """A validation pass over ``images`` x ``rows_per_image`` rows (RefCOCO: one row per sentence), the rows
    of an image spread over two validation batches, through ``GRTOTrainer._shards`` / ``_score`` and the
    worker's ``tool_predict``; the cache keyed by image (now) and by row (before)."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from verl_grto.data.image_store import SampleImageStore
    from verl_grto.data.masks import encode_rle
    from verl_grto.data.parquet import write_rows_atomic
    from verl_grto.data.schema import GroundTruth, RLRow
    from verl_grto.reward.answer import ToolPrompt
    from verl_grto.tool.worker import ToolWorkerMixin
    from verl_grto.trainer.grto_trainer import GRTOTrainer

    hw = IMAGE_HW if config_name != "tiny" else (96, 128)
    h, w = hw
    rows = []
    for j in range(images):
        buf = io.BytesIO()
        Image.fromarray(Images(hw)(f"img{j}")).save(buf, format="PNG")
        for s in range(rows_per_image):
            mask = np.zeros(hw, dtype=bool)
            mask[s * h // 8 : s * h // 8 + h // 8, w // 4 : w // 2] = True
            gt = GroundTruth(encode_rle(mask), [[w / 4, s * h / 8, w / 2, s * h / 8 + h / 8]], hw)
            rows.append(
                RLRow(
                    "refcoco_like",
                    "<image>x",
                    buf.getvalue(),
                    gt,
                    len(rows),
                    f"img{j}_s{s}",
                    "val",
                    "x",
                    extra={"image_id": j},
                )
            )
    order = [r for half in (0, 1) for r in rows if (int(r.sample_id.split("_s")[1]) % 2) == half]  # spread
    path = Path(tempfile.mkdtemp(prefix="tool_scale_refcoco_")) / "val.parquet"
    write_rows_atomic([r.to_record() for r in order], path)
    store = SampleImageStore([path])
    out = {}
    for keyed_by in ("image", "row"):
        worker = ToolWorkerMixin()
        worker.init_tool(_settings(config_name), [str(path)])

        class Group:
            """The one-rank worker group the trainer calls (``Dispatch.DP_COMPUTE``: a value per rank)."""

            world_size = 1

            def __init__(self, worker: ToolWorkerMixin) -> None:
                self.worker = worker

            def tool_predict(self, batches, rows, fill):
                return [self.worker.tool_predict(batches[0], rows[0], fill[0])]

        trainer = object.__new__(GRTOTrainer)
        trainer.tool_wg = Group(worker)
        trainer.image_store = store if keyed_by == "image" else SimpleNamespace(keys=lambda sids: list(sids))
        worker.tool_engine.begin_step()
        half = len(order) // 2
        for batch_rows in (order[:half], order[half:]):
            view = SimpleNamespace(
                sample_ids=[r.sample_id for r in batch_rows], ground_truths=[r.ground_truth for r in batch_rows]
            )
            prompts = [[ToolPrompt(box=tuple(r.ground_truth.boxes[0]))] for r in batch_rows]
            if keyed_by == "row":  # the cache keyed by row: the worker must read by row too
                worker.tool_engine.image_loader = store.image
            batches, shard_rows = trainer._shards(view, prompts)
            trainer._score(batches, shard_rows, len(batch_rows), fill_baseline=True)
        out[keyed_by] = worker.tool_engine.cache.images_encoded / images
    return {"images": images, "rows": len(rows), "encodes_per_distinct_image": out["image"], "keyed_by_row": out["row"]}


MEASURES = {
    "step": lambda a: measure_step(a.config, a.size, GROUP),
    "validation": lambda a: measure_validation(a.config, a.size, a.batch),
    "slope": lambda a: measure_update_slope(a.config, a.size),
    "features": lambda a: measure_features(a.config),
    "bto": lambda a: measure_bto(a.config, a.size, a.cache_images, a.epochs),
    "refcoco": lambda a: measure_refcoco_like(a.config, a.size, 3),
}


# ---- the orchestrating process ----------------------------------------------------------------------


#: glibc: allocations from 128 KiB up are mmapped and unmapped when freed (the default threshold grows
#: after large frees, and the heap then keeps freed tensors' pages resident)
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run(measure: str, threads: int, config: str, default_malloc: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``--measure`` in a fresh process (its own peak memory); returns its JSON."""
    cmd = [sys.executable, __file__, "--measure", measure, "--config", config, "--threads", str(threads)]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **({} if default_malloc else FIXED_MMAP_THRESHOLD)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    print(
        f"  {measure} {kwargs}{' (default malloc)' if default_malloc else ''}: {json.dumps({k: v for k, v in result.items() if k != 'settings'})}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="validation 16 vs 1 images (< 10 minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tool_scale.json"))
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--cache-images", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # a measuring process
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(MEASURES[args.measure](args)))
        return 0

    start = time.perf_counter()
    small_val, large_val = (1, 16) if args.quick else (16, 256)
    counts_config = "tiny" if args.quick else args.config  # encode counts do not depend on the model's size
    print(f"tool_scale: {args.config}, {args.threads} threads, {'quick' if args.quick else 'full'}", flush=True)
    step8 = run("step", args.threads, args.config, size=8)
    step128 = run("step", args.threads, args.config, size=128)
    val_small = run("validation", args.threads, args.config, size=small_val)
    val_large = run("validation", args.threads, args.config, size=large_val)
    slope8 = run("slope", args.threads, args.config, size=8)
    slope16 = run("slope", args.threads, args.config, size=16)
    features = run("features", args.threads, args.config)
    bto = run("bto", args.threads, counts_config, size=6, cache_images=2, epochs=3)
    refcoco = run("refcoco", args.threads, counts_config, size=4)
    default8 = run("step", args.threads, args.config, default_malloc=True, size=8)
    default128 = run("step", args.threads, args.config, default_malloc=True, size=128)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    )
    result = {
        "command": " ".join(
            [".venv/bin/python", "benchmarks/tool_scale.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "commit": commit + ("+dirty" if dirty else ""),
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "model": args.config,
        "image_hw": list(IMAGE_HW),
        "group": GROUP,
        "settings": step8["settings"],
        "malloc": FIXED_MMAP_THRESHOLD,
        "counts_model": counts_config,
        "update_peak_bytes_ratio_128_over_8": step128["peak_bytes"] / step8["peak_bytes"],
        f"validation_peak_bytes_ratio_{large_val}_over_{small_val}": val_large["peak_bytes"] / val_small["peak_bytes"],
        "bytes_to_driver_per_rollout": step128["bytes_to_driver_per_rollout"],
        "bto_encodes_per_image_per_epoch": bto["encodes_per_image_per_epoch"],
        "encodes_per_distinct_image": refcoco["encodes_per_distinct_image"],
        "feature_bytes_per_image": features,
        "backward_bytes_per_rollout": (slope16["peak_bytes"] - slope8["peak_bytes"]) / 8,
        "goals": {
            "update_peak_bytes_ratio_128_over_8": "<= 1.3",
            "validation_peak_bytes_ratio": "<= 1.3",
            "bytes_to_driver_per_rollout": "<= 1024",
            "bto_encodes_per_image_per_epoch": "<= 1.0",
            "encodes_per_distinct_image": "== 1.0",
        },
        "runs": {
            "step_8": step8,
            "step_128": step128,
            f"validation_{small_val}": val_small,
            f"validation_{large_val}": val_large,
            "update_one_image_8_rollouts": slope8,
            "update_one_image_16_rollouts": slope16,
            "bto": bto,
            "refcoco_like": refcoco,
            "default_malloc": {
                "step_8": default8,
                "step_128": default128,
                "update_peak_bytes_ratio_128_over_8": default128["peak_bytes"] / default8["peak_bytes"],
            },
        },
        "wall_s": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
