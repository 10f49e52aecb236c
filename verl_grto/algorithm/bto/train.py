"""Off-policy tool training on a BTO buffer (docs/method.md, "BTO in code", steps 2 and 3): weights,
K epochs of tool updates with the image features cached for the stage, resumable checkpoints, the
held-out gIoU before and after, and :class:`BTORequest`, the job that runs it in the tool's workers."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from verl_grto.algorithm.bto import PROGRESS_INTERVAL_S, chunks
from verl_grto.algorithm.bto.buffer import BufferRecord, RolloutBuffer
from verl_grto.algorithm.tool_step import (
    ImageGroup,
    group_by_image,
    overlap_ious,
    rollout_rows,
    shard_by_image,
    tool_batch,
    tool_step_weights,
    tool_target,
)
from verl_grto.algorithm.tool_weights import get_weighting, weighting_names
from verl_grto.atomic import build_dir_once, read_stamp
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.faults import dump_after_resume, kill_point
from verl_grto.reward.mask_iou import count_overlap, sample_iou
from verl_grto.tool.cache import EmbeddingCache
from verl_grto.tool.engine import ToolBatch, ToolEngine, ToolTarget

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
TOOL_SUBDIR = "tool"
CHECKPOINT_PREFIX = "bto-"


class ImageSource(Protocol):
    """Where training images come from (e.g. :class:`verl_grto.data.image_store.SampleImageStore`): a row's
    image key (rows showing one image share it) and an image by key."""

    def key(self, sample_id: str) -> str: ...

    def image_by_key(self, key: str) -> np.ndarray: ...


#: ``target_logprob_fn(records)``: per-token log-probs of each record's ``response_ids`` under the target policy.
TargetLogprobFn = Callable[[Sequence[BufferRecord]], Sequence[Sequence[float]]]

#: The weighting inputs a buffer can supply (behaviour log-probs stored, target ones from ``target_logprob_fn``).
_LOGPROB_INPUTS = ("target_logprobs", "behaviour_logprobs")

#: Default bound of the stage's feature cache (``bto.cache_bytes``): all features of a dataset need not
#: fit in (GPU) memory. 4 GiB: ~46 SAM2.1-L images with trainable high-resolution convs, ~250 without.
DEFAULT_CACHE_BYTES = 4 << 30


def rollout_weights(
    records: Sequence[BufferRecord],
    weighting: str = "uniform",
    target_logprob_fn: TargetLogprobFn | None = None,
    importance_clip: float = 2.0,
    chunk_size: int = 64,
    min_box_iou: float = 0.0,
) -> np.ndarray:
    """w_i of every record for the stage: 0 for unparseable answers; ``importance``: min(exp(mean_t log pi/mu), clip).

    The target policy is fixed during BTO (no policy update), so the weights are computed once;
    ``target_logprob_fn`` is called on the parseable records only, ``chunk_size`` at a time.
    ``min_box_iou`` > 0 also zeroes the records whose boxes miss every ground-truth box
    (:func:`~verl_grto.algorithm.tool_step.tool_step_weights`, the same rule as GRTO's).
    """
    inputs = _logprob_inputs(records, weighting, target_logprob_fn, chunk_size)
    gt_boxes: dict[str, Any] = {}
    for r in records:  # one ground truth per image (its G rollouts share it)
        if r.sample_id not in gt_boxes:
            gt_boxes[r.sample_id] = GroundTruth.from_json(r.ground_truth).boxes
    return tool_step_weights(
        weighting,
        [r.objects() for r in records],
        [gt_boxes[r.sample_id] for r in records],
        [r.parse_ok for r in records],
        min_box_iou=min_box_iou,
        importance_clip=importance_clip,
        **inputs,
    )


def _logprob_inputs(
    records: Sequence[BufferRecord],
    weighting: str,
    target_logprob_fn: TargetLogprobFn | None,
    chunk_size: int,
) -> dict[str, list[np.ndarray]]:
    """The inputs the registered ``weighting`` reads, from what a buffer holds: its behaviour log-probs,
    and the target policy's through ``target_logprob_fn`` (no advantages: there is no group reward).
    Empty for a weighting that reads none."""
    spec = get_weighting(weighting)
    unavailable = [k for k in spec.needs if k not in _LOGPROB_INPUTS]
    if unavailable:
        offline = [w for w in weighting_names() if set(get_weighting(w).needs) <= set(_LOGPROB_INPUTS)]
        raise ValueError(
            f"BTO weighting must be one of {offline}, got {weighting!r} (it needs {' and '.join(unavailable)},"
            " which a rollout buffer does not hold)"
        )
    if not spec.needs:
        if target_logprob_fn is not None:
            readers = [w for w in weighting_names() if "target_logprobs" in get_weighting(w).needs]
            raise ValueError(
                f"target_logprob_fn is used by {' / '.join(readers)} weighting only; pass weighting={readers[0]!r}"
            )
        return {}
    if target_logprob_fn is None:
        raise ValueError(f"{weighting} weighting needs target_logprob_fn")
    usable = [i for i, r in enumerate(records) if r.parse_ok]
    target: list[np.ndarray] = [np.zeros(0)] * len(records)
    behaviour: list[np.ndarray] = [np.zeros(0)] * len(records)
    for chunk in chunks(usable, chunk_size):
        values = target_logprob_fn([records[i] for i in chunk])
        if len(values) != len(chunk):
            raise ValueError(f"target_logprob_fn returned {len(values)} rows for {len(chunk)} rollouts")
        for i, v in zip(chunk, values, strict=True):
            target[i], behaviour[i] = np.asarray(v, np.float64), np.asarray(records[i].logprobs, np.float64)
    return {"target_logprobs": target, "behaviour_logprobs": behaviour}


class _Targets:
    """The records' ground truths as the tool receives them, parsed once per dataset row."""

    def __init__(self, records: Sequence[BufferRecord]) -> None:
        self.records = records
        self._parsed: dict[str, GroundTruth] = {}

    def ground_truth(self, i: int) -> GroundTruth:
        record = self.records[i]
        if record.sample_id not in self._parsed:
            self._parsed[record.sample_id] = GroundTruth.from_json(record.ground_truth)
        return self._parsed[record.sample_id]

    def __call__(self, i: int) -> tuple[str, ToolTarget]:
        return self.records[i].sample_id, tool_target(self.ground_truth(i))


def _tool_batch(groups: Sequence[ImageGroup], records: Sequence[BufferRecord], targets: _Targets) -> ToolBatch:
    """The groups' rollouts as one batch, without images: the engine reads those its cache lacks through
    its ``image_loader`` (:func:`_engine_cache`)."""
    return tool_batch(groups, lambda i: records[i].objects(), targets)


def _image_keys(records: Sequence[BufferRecord], images: ImageSource) -> list[str]:
    return [images.key(r.sample_id) for r in records]


@contextlib.contextmanager
def _engine_cache(engine: ToolEngine, cache: EmbeddingCache, images: ImageSource) -> Iterator[EmbeddingCache]:
    """Let the engine read features from ``cache`` (the stage's, or the held-out set's), and the images
    the cache lacks from ``images``, for a while."""
    previous = engine.cache, engine.image_loader
    engine.cache, engine.image_loader = cache, images.image_by_key
    try:
        yield cache
    finally:
        engine.cache, engine.image_loader = previous


def _missing_prediction_iou(gt: GroundTruth) -> float:
    """IoU of a missing prediction (an unparseable answer) under the empty-mask rule: 1 when the ground
    truth has no pixel outside its ignore region, else 0."""
    mask = decode_rle(gt.mask_rle)
    ignore = decode_rle(gt.ignore_rle) if gt.ignore_rle is not None else None
    inter, union = count_overlap(np.zeros_like(mask), mask, ignore)
    return sample_iou(int(inter), int(union))


def rollout_iou(
    engine: ToolEngine, records: Sequence[BufferRecord], images: ImageSource, cache: EmbeddingCache, batch_size: int = 8
) -> float:
    """gIoU of the tool's masks from the records' prompts, under the empty-mask rule (an unparseable
    answer is a missing prediction; ignore regions left out). ``cache`` holds the images' features
    between calls; the masks are scored where they are made (:meth:`ToolEngine.predict`), never held."""
    ious = np.zeros(len(records))
    targets = _Targets(records)
    for i, r in enumerate(records):
        if not r.parse_ok:
            ious[i] = _missing_prediction_iou(targets.ground_truth(i))
    groups = group_by_image(_image_keys(records, images), [r.parse_ok for r in records])
    with _engine_cache(engine, cache, images):
        for chunk in chunks(groups, batch_size):
            pred = engine.predict(_tool_batch(chunk, records, targets), return_masks=False)
            ious[rollout_rows(chunk)] = overlap_ious(pred.intersection, pred.union)
    return float(ious.mean()) if len(records) else float("nan")


def epoch_order(n: int, seed: int, epoch: int, window: int | None) -> np.ndarray:
    """The order in which an epoch visits the ``n`` image groups (a permutation of ``range(n)``).

    Each epoch's order is drawn from (``seed``, ``epoch``). When the feature cache holds only
    ``window`` < n images (``window`` None: all of them), the images the previous epoch visited last,
    which the LRU cache still holds, come first (in the drawn order), then the rest: every image is
    encoded at most once per epoch, and after the first epoch only ``n - window`` are. A pure function
    of its arguments, so a resumed stage visits the same order."""
    order = np.random.default_rng([seed, 0]).permutation(n)
    if window is None or window >= n:
        return order if epoch == 0 else np.random.default_rng([seed, epoch]).permutation(n)
    for e in range(1, epoch + 1):
        cached = set(order[n - window :].tolist()) if window > 0 else set()
        drawn = np.random.default_rng([seed, e]).permutation(n)
        order = np.concatenate([[k for k in drawn if k in cached], [k for k in drawn if k not in cached]]).astype(int)
    return order


@dataclass
class BTOReport:
    """What a BTO stage did. Encoder counts and ``wall_s`` are this call's (a resumed stage re-encodes
    what the crash lost); losses cover the whole stage (mean batch loss before each step, per epoch)."""

    epochs: int
    epoch_losses: list[float]
    batches: int
    skipped_batches: int
    rollouts: int
    usable_rollouts: int
    distinct_images: int
    images_encoded: int
    encoder_calls: int
    cache_evictions: int
    cache_window: int | None  # images the stage's cache holds (None: the whole buffer's images fit)
    weighting: str
    weight_mean: float
    effective_sample_fraction: float  # (sum w)^2 / (n sum w^2) over usable rollouts: 1 = uniform
    iou_before: float | None
    iou_after: float | None
    heldout_rollouts: int
    wall_s: float
    resumed_from_batch: int | None
    tool_dir: str | None  # the final checkpoint's tool (a transformers SAM2 directory) for GRTO to start from


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete BTO checkpoint (directories are published whole, stamp last)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and read_stamp(p) is not None)
    return found[-1] if found else None


def _prune_checkpoints(checkpoint_dir: Path, keep: Path | None) -> None:
    for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            (checkpoint_dir / f".{p.name}.lock").unlink(missing_ok=True)


def _save_checkpoint(checkpoint_dir: Path, engine: ToolEngine, progress: dict[str, Any]) -> Path:
    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{progress['batches_done']:08d}"
    stamp = {"builder": "bto_checkpoint", "batches_done": progress["batches_done"], "buffer": progress["buffer"]}

    def build(tmp: Path) -> None:
        engine.save(str(tmp / TOOL_SUBDIR))
        (tmp / PROGRESS_NAME).write_text(json.dumps(progress, indent=2))

    build_dir_once(target, stamp, build)
    _prune_checkpoints(checkpoint_dir, keep=target)
    return target


def train_tool_on_buffer(
    engine: ToolEngine,
    buffer: RolloutBuffer,
    image_store: ImageSource,
    epochs: int,
    batch_size: int,
    weighting: str = "uniform",
    target_logprob_fn: TargetLogprobFn | None = None,
    *,
    importance_clip: float = 2.0,
    heldout: Sequence[BufferRecord] = (),
    heldout_store: ImageSource | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    seed: int = 0,
    max_cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    min_box_iou: float = 0.0,
) -> BTOReport:
    """Train the tool off-policy on the buffer for ``epochs`` epochs; one update per ``batch_size`` images.

    Each update takes ``batch_size`` images with all their usable rollouts (one encoding serves an
    image's G rollouts), the loss being the weighted mean over those rollouts (``weighting`` as in
    :func:`rollout_weights`). Images are visited in a fresh order each epoch (:func:`epoch_order`,
    drawn from (``seed``, epoch)), so the position (epoch, batch) is the whole sampler state. Features
    are cached for the whole stage, bounded by ``max_cache_bytes`` (None: unbounded): when every image
    fits, each is encoded exactly once; otherwise at most once per epoch, and after the first epoch
    only those the cache could not keep (the cache's capacity in images is fixed at the end of the
    first epoch and saved with the progress).

    With ``checkpoint_dir``, a checkpoint (``engine.save`` + ``progress.json``: epoch, next batch,
    losses so far, seed; torch's RNG is in the tool's ``rng.pt``) is published every
    ``checkpoint_every`` batches and at each epoch end, older ones removed. ``resume`` continues from
    the newest one (the settings and buffer must be the same; ``epochs`` may grow); ``resume=False``
    deletes them and starts over. ``shard=(rank, world)`` trains this data-parallel rank on every
    ``world``-th image (the images are first cut to a multiple of ``world``, so every rank runs the
    same number of updates and the engine's gradient all-reduce stays in step). ``min_box_iou`` > 0
    trains only on rollouts whose box points at the object (:func:`rollout_weights`). ``heldout`` rollouts (e.g. the reference policy's answers on
    validation rows, from ``heldout_store`` or ``image_store``) are scored before and after (gIoU).
    """
    if epochs < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(
            f"need epochs >= 0, batch_size >= 1, checkpoint_every >= 1: {epochs}, {batch_size}, {checkpoint_every}"
        )
    start = time.perf_counter()
    records = buffer.records
    weights = rollout_weights(records, weighting, target_logprob_fn, importance_clip, min_box_iou=min_box_iou)
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    groups = shard_by_image(group_by_image(_image_keys(records, image_store), weights > 0), world, equal=True)[rank]
    if not groups:
        raise ValueError(
            f"the buffer has no usable rollouts for rank {rank} of {world}: every answer is unparseable"
            f" or, with min_box_iou={min_box_iou}, its box misses the object"
        )
    n_batches = -(-len(groups) // batch_size)
    settings = {
        "batch_size": batch_size,
        "weighting": weighting,
        "importance_clip": importance_clip,
        "seed": seed,
        "shard": list(shard),
        "min_box_iou": min_box_iou,
    }
    state: dict[str, Any] = {
        **settings,
        "buffer": buffer.fingerprint(),
        "epoch": 0,
        "next_batch": 0,
        "batches_done": 0,
        "skipped": 0,
        "epoch_losses": [],
        "epoch_loss_sum": 0.0,
        "epoch_loss_count": 0,
        "iou_before": None,
        "cache_window": None,
    }

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed_from = None
    if ckpt_root is not None:
        latest = latest_checkpoint(ckpt_root)
        if latest is not None and resume:
            saved = json.loads((latest / PROGRESS_NAME).read_text())
            mismatch = {
                k: (saved.get(k), v) for k, v in {**settings, "buffer": state["buffer"]}.items() if saved.get(k) != v
            }
            if mismatch:
                raise ValueError(f"{latest} was made with other settings or another buffer (saved, asked): {mismatch}")
            engine.load(str(latest / TOOL_SUBDIR))
            dump_after_resume("bto_tool", engine.save)
            state = saved
            resumed_from = int(state["batches_done"])
            logger.info("BTO resumes from %s (epoch %d, batch %d)", latest, state["epoch"], state["next_batch"])
        elif latest is not None:
            _prune_checkpoints(ckpt_root, keep=None)

    heldout_cache = EmbeddingCache(engine.tool, max_bytes=max_cache_bytes)
    heldout_images = heldout_store if heldout_store is not None else image_store
    if heldout and resumed_from is None:
        state["iou_before"] = rollout_iou(engine, heldout, heldout_images, heldout_cache)

    cache = EmbeddingCache(engine.tool, max_bytes=max_cache_bytes)
    last_saved = resumed_from
    bar = tqdm(
        total=epochs * n_batches,
        initial=min(state["batches_done"], epochs * n_batches),
        desc="BTO tool",
        unit="batch",
        disable=not progress,
        mininterval=PROGRESS_INTERVAL_S,
    )
    targets = _Targets(records)
    with _engine_cache(engine, cache, image_store):
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            order = epoch_order(len(groups), seed, epoch, state.get("cache_window"))
            for b in range(state["next_batch"], n_batches):
                chosen = [groups[k] for k in order[b * batch_size : (b + 1) * batch_size]]
                batch = _tool_batch(chosen, records, targets)
                metrics = engine.update(batch, [float(weights[i]) for i in rollout_rows(chosen)])
                state["batches_done"] += 1
                state["next_batch"] = b + 1
                if metrics["skipped"]:
                    state["skipped"] += 1
                else:
                    state["epoch_loss_sum"] += metrics["loss"]
                    state["epoch_loss_count"] += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{metrics['loss']:.4f}", refresh=False)
                if ckpt_root is not None and state["batches_done"] % checkpoint_every == 0 and b + 1 < n_batches:
                    _save_checkpoint(ckpt_root, engine, state)
                    last_saved = state["batches_done"]
                    kill_point("bto.tool.checkpoint_saved")
            if epoch == 0 and max_cache_bytes is not None and cache.bytes_per_image:
                # how many images the cache holds, fixed once (and saved) so a resumed stage orders alike
                state["cache_window"] = max_cache_bytes // cache.bytes_per_image
            count = state["epoch_loss_count"]
            state["epoch_losses"].append(state["epoch_loss_sum"] / count if count else float("nan"))
            state.update(epoch=epoch + 1, next_batch=0, epoch_loss_sum=0.0, epoch_loss_count=0)
            if ckpt_root is not None:
                _save_checkpoint(ckpt_root, engine, state)
                last_saved = state["batches_done"]
    bar.close()

    iou_after = rollout_iou(engine, heldout, heldout_images, heldout_cache) if heldout else None
    used = weights[weights > 0]
    final = latest_checkpoint(ckpt_root) if ckpt_root is not None and last_saved is not None else None
    return BTOReport(
        epochs=state["epoch"],
        epoch_losses=list(state["epoch_losses"]),
        batches=state["batches_done"],
        skipped_batches=state["skipped"],
        rollouts=len(records),
        usable_rollouts=len(used),
        distinct_images=len(groups),
        images_encoded=cache.images_encoded,
        encoder_calls=cache.encoder_calls,
        cache_evictions=cache.evictions,
        cache_window=state.get("cache_window"),
        weighting=weighting,
        weight_mean=float(used.mean()) if len(used) else float("nan"),
        effective_sample_fraction=float(used.sum() ** 2 / (len(used) * (used**2).sum())) if len(used) else float("nan"),
        iou_before=state["iou_before"],
        iou_after=iou_after,
        heldout_rollouts=len(heldout),
        wall_s=time.perf_counter() - start,
        resumed_from_batch=resumed_from,
        tool_dir=str(final / TOOL_SUBDIR) if final is not None else None,
    )


@dataclass
class BTORequest:
    """Stage 2 of BTO as a job for the tool's worker group (``tool_wg.tool_run(request)``, see
    :class:`verl_grto.tool.worker.ToolJob`): every rank trains on its share of the buffer's images.

    Why a job object: the training loop (:func:`train_tool_on_buffer`) belongs to this layer, and
    the tool's worker, below it, only hosts the engine it runs on. Paths must be readable by every
    rank (one filesystem, as verl's checkpoint folder is).
    """

    buffer_dir: str
    image_files: list[str]  # the parquet files the buffer's sample ids come from
    checkpoint_dir: str
    epochs: int
    batch_size: int
    checkpoint_every: int = 50
    seed: int = 0
    min_box_iou: float = 0.0
    progress: bool = True
    cache_bytes: int | None = DEFAULT_CACHE_BYTES

    def __call__(self, engine: ToolEngine, rank: int, world_size: int) -> dict[str, Any]:
        """Train ``engine`` on rank ``rank``'s shard; returns the rank's :class:`BTOReport` as a dict.
        Each rank checkpoints under ``<checkpoint_dir>/rank<rank>``; only rank 0 shows progress."""
        report = train_tool_on_buffer(
            engine,
            RolloutBuffer.load(self.buffer_dir),
            SampleImageStore(self.image_files),
            epochs=self.epochs,
            batch_size=self.batch_size,
            checkpoint_dir=Path(self.checkpoint_dir) / f"rank{rank}",
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
            progress=self.progress and rank == 0,
            shard=(rank, world_size),
            min_box_iou=self.min_box_iou,
            max_cache_bytes=self.cache_bytes,
        )
        return asdict(report)
