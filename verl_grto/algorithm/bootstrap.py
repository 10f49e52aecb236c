"""BTO (bootstrapped tool optimisation), the first stage of B-GRTO (docs/method.md): a rollout buffer
from the reference policy, then off-policy tool training on it.

Why a stage of its own: GRTO's first rewards come from the tool, and a tool that has never seen what
the policy asks (boxes a little off, points on the edge) gives poor rewards to good answers. BTO
samples G answers per training prompt from the reference policy mu *once*, stores them on disk, and
trains the tool on them for K epochs with no policy update, so GRTO starts from an adapted tool.

Three pieces, each usable alone (the verl trainer mode wires them, generation through verl's rollout
servers):

* :class:`RolloutBuffer`: the rollouts as parquet (one row per rollout, pandas-readable) plus a JSON
  sidecar (reference policy, G, seed, sampling settings, creation time). Parts are written
  atomically while the buffer is built, so a crash keeps what was generated.
* :func:`build_buffer`: G answers per dataset row from a pluggable ``generate_fn``, parsed with
  :func:`~verl_grto.reward.answer.parse_answer`; resumable. :func:`hf_generate_fn` is a CPU / test
  ``generate_fn`` backed by the ``hf`` rollout server itself.
* :func:`train_tool_on_buffer`: K epochs of :meth:`ToolEngine.update` over the buffer, each image's
  rollouts in one batch; image features are cached for the whole stage (the encoder is frozen), so
  each image is encoded once, not once per epoch; ``uniform`` or ``importance`` weights
  (:mod:`verl_grto.algorithm.tool_weights`), unparseable rollouts weight 0; checkpoints every M
  batches and at each epoch end, so an interrupted stage resumes where it stopped (bit-exact on CPU).
  :class:`BTORequest` runs it in the tool's verl workers, one data-parallel shard per rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from verl_grto.algorithm.tool_weights import (
    get_weighting,
    prompt_points_at_object,
    tool_loss_weights,
    weighting_names,
)
from verl_grto.atomic import atomic_file, build_dir_once, read_stamp
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.inference import REASONING_ANSWER_MAX_NEW_TOKENS
from verl_grto.eval.metrics import IoUAccumulator
from verl_grto.reward.answer import ToolPrompt, parse_answer
from verl_grto.tool.cache import EmbeddingCache
from verl_grto.tool.engine import ToolBatch, ToolEngine

logger = logging.getLogger(__name__)

BUFFER_FORMAT_VERSION = 1
META_NAME = "meta.json"
ROLLOUTS_NAME = "rollouts.parquet"
PARTS_DIR = "parts"
PROGRESS_NAME = "progress.json"
TOOL_SUBDIR = "tool"
CHECKPOINT_PREFIX = "bto-"

#: One parquet row per rollout. ``prompts`` is the parsed answer as JSON (see :func:`prompts_to_json`),
#: ``ground_truth`` the dataset row's ground-truth JSON (``verl_grto.data.schema``), copied so the
#: buffer alone is enough to train the tool. ``response_ids`` are the sampled tokens (empty when the
#: generator does not give them): a target policy's log-probs for importance weights must be taken on
#: exactly these tokens, which re-tokenising the text does not guarantee.
BUFFER_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("uid", pa.string()),
        ("rollout_index", pa.int32()),
        ("answer", pa.string()),
        ("prompts", pa.string()),
        ("parse_ok", pa.bool_()),
        ("parse_reason", pa.string()),
        ("logprobs", pa.list_(pa.float64())),
        ("response_ids", pa.list_(pa.int64())),
        ("ground_truth", pa.string()),
    ]
)


# ---- the buffer --------------------------------------------------------------------------------


#: Seconds between progress-bar refreshes: inside a Ray worker every refresh is a line of the run's
#: console (the BTO tool bar alone printed 390 lines of a 1848-line main job).
PROGRESS_INTERVAL_S = 10.0


@dataclass
class BufferRecord:
    """One rollout of the reference policy. ``uid`` is its group (the G answers to one prompt)."""

    sample_id: str
    uid: str
    rollout_index: int
    answer: str
    prompts: str
    parse_ok: bool
    parse_reason: str
    logprobs: list[float]
    response_ids: list[int]
    ground_truth: str

    @property
    def key(self) -> tuple[str, int]:
        return self.sample_id, self.rollout_index

    def objects(self) -> list[ToolPrompt]:
        """The parsed prompts, as the tool reads them (empty when the answer did not parse)."""
        return prompts_from_json(self.prompts)


def prompts_to_json(objects: Sequence[ToolPrompt]) -> str:
    """``[{"box": [x1, y1, x2, y2] | null, "points": [[x, y], ...], "labels": [1 | 0, ...]}, ...]``."""
    return json.dumps(
        [
            {
                "box": list(o.box) if o.box is not None else None,
                "points": [list(p) for p in o.points],
                "labels": list(o.labels),
            }
            for o in objects
        ]
    )


def prompts_from_json(text: str) -> list[ToolPrompt]:
    """The inverse of :func:`prompts_to_json`."""
    return [
        ToolPrompt(
            box=tuple(o["box"]) if o["box"] is not None else None,
            points=tuple(tuple(p) for p in o["points"]),
            labels=tuple(o["labels"]),
        )
        for o in json.loads(text)
    ]


@dataclass(frozen=True)
class BufferMeta:
    """The sidecar: what produced the buffer. ``sampling`` holds the generator's settings (temperature...)."""

    reference_policy: str
    group_size: int
    seed: int
    created_at: str
    sampling: dict[str, Any] = field(default_factory=dict)
    format_version: int = BUFFER_FORMAT_VERSION

    def same_source(self, other: BufferMeta) -> bool:
        """Whether rollouts of ``other`` may join this buffer (everything but the creation time agrees)."""
        return (self.reference_policy, self.group_size, self.seed, self.sampling, self.format_version) == (
            other.reference_policy,
            other.group_size,
            other.seed,
            other.sampling,
            other.format_version,
        )


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _read_records(path: Path) -> list[BufferRecord]:
    table = pq.read_table(path)
    if table.schema.names != BUFFER_SCHEMA.names:
        raise ValueError(f"{path}: columns {table.schema.names} are not a rollout buffer's {BUFFER_SCHEMA.names}")
    return [BufferRecord(**row) for row in table.to_pylist()]


def _part_paths(directory: Path) -> list[Path]:
    return sorted((directory / PARTS_DIR).glob("part-*.parquet"))


class RolloutBuffer:
    """Rollouts of the reference policy, in memory, persisted as a directory::

        meta.json              the sidecar (BufferMeta)
        rollouts.parquet       every rollout, written by save()
        parts/part-NNNNNN.parquet   rollouts written by save_partial() while building

    Every file is written atomically. :meth:`load` reads ``rollouts.parquet`` and the parts (a crash
    between consolidating and deleting the parts leaves duplicates, which are dropped by key;
    two different rollouts under one key are an error). ``pandas.read_parquet`` reads either file,
    or the parts folder.
    """

    def __init__(self, meta: BufferMeta, records: Iterable[BufferRecord] = ()) -> None:
        self.meta = meta
        self.records: list[BufferRecord] = []
        self._keys: set[tuple[str, int]] = set()
        self._persisted = 0  # records already in the directory save_partial writes to
        self.append(records)

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[BufferRecord]) -> None:
        """Add rollouts; a (sample_id, rollout_index) already present is an error."""
        for r in records:
            if r.key in self._keys:
                raise ValueError(f"rollout {r.key} is already in the buffer")
            self._keys.add(r.key)
            self.records.append(r)

    def done_sample_ids(self) -> set[str]:
        """Samples that have rollouts: a builder skips them (parts hold whole groups only)."""
        return {r.sample_id for r in self.records}

    def save(self, directory: str | Path) -> Path:
        """Write the sidecar and every rollout as ``rollouts.parquet``; parts become redundant and are removed."""
        directory = Path(directory)
        _write_json(directory / META_NAME, asdict(self.meta))
        if self.records:
            write_rows_atomic((asdict(r) for r in self.records), directory / ROLLOUTS_NAME, schema=BUFFER_SCHEMA)
        for part in _part_paths(directory):
            part.unlink()
        self._persisted = len(self.records)
        return directory

    def save_partial(self, directory: str | Path) -> Path | None:
        """Write the rollouts appended since the last save as a new part (None when there are none).

        ``directory`` must be where this buffer lives (where it was loaded from or first saved):
        earlier rollouts are not written again.
        """
        directory = Path(directory)
        if not (directory / META_NAME).is_file():
            if self._persisted:
                raise ValueError(f"{directory} holds no buffer; save() the whole buffer there first")
            _write_json(directory / META_NAME, asdict(self.meta))
        new = self.records[self._persisted :]
        if not new:
            return None
        parts = _part_paths(directory)
        index = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        path = write_rows_atomic(
            (asdict(r) for r in new), directory / PARTS_DIR / f"part-{index:06d}.parquet", schema=BUFFER_SCHEMA
        )
        self._persisted = len(self.records)
        return path

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / META_NAME).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> RolloutBuffer:
        """Read a buffer back exactly (records in the order they were appended)."""
        directory = Path(directory)
        meta = BufferMeta(**json.loads((directory / META_NAME).read_text()))
        if meta.format_version != BUFFER_FORMAT_VERSION:
            raise ValueError(f"{directory}: buffer format {meta.format_version}, expected {BUFFER_FORMAT_VERSION}")
        files = ([directory / ROLLOUTS_NAME] if (directory / ROLLOUTS_NAME).is_file() else []) + _part_paths(directory)
        seen: dict[tuple[str, int], BufferRecord] = {}
        for path in files:
            for r in _read_records(path):
                if r.key in seen:
                    if seen[r.key] != r:
                        raise ValueError(f"{directory}: two different rollouts for {r.key} ({path})")
                    continue
                seen[r.key] = r
        buffer = cls(meta, seen.values())
        buffer._persisted = len(buffer)
        return buffer

    def fingerprint(self) -> str:
        """Identifies the buffer's content (checkpoints of a BTO stage refuse another buffer)."""
        h = hashlib.sha1()
        for r in self.records:
            h.update(json.dumps([r.sample_id, r.rollout_index, r.answer, r.parse_ok]).encode())
        return h.hexdigest()


# ---- building ----------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """One sampled answer: its text (decoded as verl's reward manager does), per-token log-probs, tokens."""

    text: str
    logprobs: Sequence[float]
    token_ids: Sequence[int] = ()


#: ``generate_fn(rows, n)``: for each dataset row (a verl RL parquet row as a dict), ``n`` answers as
#: :class:`Rollout` or plain ``(text, logprobs)`` tuples.
GenerateFn = Callable[[Sequence[dict[str, Any]], int], Sequence[Sequence[tuple]]]


def _sample_id(row: Mapping[str, Any]) -> str:
    return str(row["extra_info"]["sample_id"])


def make_records(row: Mapping[str, Any], rollouts: Sequence[tuple]) -> list[BufferRecord]:
    """Parse one row's answers into buffer records (the parser never raises; failures keep their reason)."""
    gt_json = row["reward_model"]["ground_truth"]
    image_size = GroundTruth.from_json(gt_json).image_size
    sid = _sample_id(row)
    records = []
    for k, raw in enumerate(rollouts):
        rollout = Rollout(*raw)
        parsed = parse_answer(rollout.text, image_size)
        records.append(
            BufferRecord(
                sample_id=sid,
                uid=sid,
                rollout_index=k,
                answer=rollout.text,
                prompts=prompts_to_json(parsed.objects),
                parse_ok=parsed.ok,
                parse_reason=parsed.reason,
                logprobs=[float(v) for v in rollout.logprobs],
                response_ids=[int(v) for v in rollout.token_ids],
                ground_truth=gt_json,
            )
        )
    return records


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_buffer(
    rows: Iterable[dict[str, Any]],
    generate_fn: GenerateFn,
    group_size: int,
    out_dir: str | Path,
    *,
    reference_policy: str,
    seed: int = 0,
    sampling: Mapping[str, Any] | None = None,
    chunk_size: int = 8,
    save_every: int = 64,
    progress: bool = True,
) -> RolloutBuffer:
    """Sample ``group_size`` answers per row not yet in ``out_dir``'s buffer, parse and store them.

    Resumable: a buffer already in ``out_dir`` (from a crashed or shorter build) is loaded and its
    rows are skipped; its sidecar must name the same reference policy, G, seed and sampling settings,
    since one buffer must hold samples of one policy. Rows go to ``generate_fn`` ``chunk_size`` at a
    time; a part is written every ``save_every`` rows, so a crash loses at most that many rows'
    answers. The result is consolidated into ``rollouts.parquet``. A resumed build equals an
    uninterrupted one when ``generate_fn`` is a function of the row (e.g. seeded per sample, as
    :func:`hf_generate_fn` is); rows listed twice are sampled once.
    """
    if group_size < 1 or chunk_size < 1 or save_every < 1:
        raise ValueError(
            f"group_size, chunk_size and save_every must be positive: {group_size}, {chunk_size}, {save_every}"
        )
    out_dir = Path(out_dir)
    meta = BufferMeta(
        reference_policy=str(reference_policy),
        group_size=group_size,
        seed=seed,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sampling=dict(sampling or {}),
    )
    if RolloutBuffer.exists(out_dir):
        buffer = RolloutBuffer.load(out_dir)
        if not buffer.meta.same_source(meta):
            raise ValueError(f"{out_dir} holds a buffer of another source: {buffer.meta} (asked {meta})")
        logger.info("resuming the buffer in %s: %d rollouts already there", out_dir, len(buffer))
    else:
        buffer = RolloutBuffer(meta)
    done = buffer.done_sample_ids()

    def pending() -> Iterator[dict[str, Any]]:
        for row in rows:
            sid = _sample_id(row)
            if sid not in done:
                done.add(sid)
                yield row

    total = len(rows) if isinstance(rows, Sequence) else None
    bar = tqdm(
        total=total,
        initial=len(buffer.done_sample_ids()),
        desc="BTO buffer",
        unit="row",
        disable=not progress,
        mininterval=PROGRESS_INTERVAL_S,
    )
    unsaved = 0
    try:
        for chunk in _chunks(pending(), chunk_size):
            outputs = generate_fn(chunk, group_size)
            if len(outputs) != len(chunk) or any(len(o) != group_size for o in outputs):
                raise ValueError(
                    f"generate_fn returned {[len(o) for o in outputs]} answers for {len(chunk)} rows x {group_size}"
                )
            buffer.append(r for row, rollouts in zip(chunk, outputs, strict=True) for r in make_records(row, rollouts))
            unsaved += len(chunk)
            bar.update(len(chunk))
            if unsaved >= save_every:
                buffer.save_partial(out_dir)
                unsaved = 0
    except BaseException:
        buffer.save_partial(out_dir)  # keep what was generated before the error (a hard kill loses < save_every rows)
        raise
    finally:
        bar.close()
    buffer.save(out_dir)
    return buffer


def _row_seed(seed: int, sample_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode())) % (2**63)


def hf_generate_fn(
    policy_dir: str | Path,
    *,
    max_new_tokens: int = REASONING_ANSWER_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int = 0,
) -> GenerateFn:
    """A ``generate_fn`` for CPU and tests: the ``hf`` rollout server (:class:`HFRolloutServer`) sampling
    in-process, prompts built as verl's agent loop builds them (:mod:`verl_grto.policy.inputs`).

    Log-probs are the server's (log-softmax of the temperature-scaled logits of each sampled token,
    the quantity verl's actor recomputes). The sampler is reseeded from (``seed``, sample id) for
    every row, so a row's answers do not depend on the rows before it and a resumed
    :func:`build_buffer` reproduces an uninterrupted one.
    """
    from verl_grto.policy.inputs import render_row
    from verl_grto.rollout.hf_server import HFRolloutServer  # imports ray and verl: only when used

    server = HFRolloutServer(str(policy_dir), {"response_length": max_new_tokens, "prompt_length": 1 << 20}, seed=seed)
    params = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_new_tokens,
        "logprobs": True,
    }

    async def sample(ids: list[int], images: list[Any], n: int, sid: str) -> list[Any]:
        # the row's n answers are sent at once: the server samples them in one batched call, from the
        # row's own seed, so a row's answers do not depend on which rows came before it
        return await asyncio.gather(
            *[
                server.generate(
                    prompt_ids=ids, sampling_params=dict(params), request_id=f"{sid}/{k}", image_data=images
                )
                for k in range(n)
            ]
        )

    def generate(rows: Sequence[dict[str, Any]], n: int) -> list[list[Rollout]]:
        out = []
        for row in rows:
            ids, images = render_row(row, server.processor)
            server._generator.manual_seed(_row_seed(seed, _sample_id(row)))  # the server's own sampling stream
            outputs = asyncio.run(sample(ids, images, n, _sample_id(row)))
            out.append(
                [
                    Rollout(
                        server.tokenizer.decode(o.token_ids, skip_special_tokens=True),
                        list(o.log_probs),
                        list(o.token_ids),
                    )
                    for o in outputs
                ]
            )
        return out

    return generate


# ---- training the tool on the buffer -----------------------------------------------------------


class ImageSource(Protocol):
    """Where training images come from (e.g. :class:`verl_grto.data.image_store.SampleImageStore`)."""

    def image(self, sample_id: str) -> np.ndarray: ...


#: ``target_logprob_fn(records)``: per-token log-probs of each record's ``response_ids`` under the target policy.
TargetLogprobFn = Callable[[Sequence[BufferRecord]], Sequence[Sequence[float]]]

#: The weighting inputs a buffer can supply (behaviour log-probs stored, target ones from ``target_logprob_fn``).
_LOGPROB_INPUTS = ("target_logprobs", "behaviour_logprobs")

#: Default bound of the stage's feature cache: all features of a dataset need not fit in (GPU) memory.
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
    (:func:`~verl_grto.algorithm.tool_weights.prompt_points_at_object`).
    """
    weights = _base_weights(records, weighting, target_logprob_fn, importance_clip, chunk_size)
    if min_box_iou > 0:
        weights = weights * prompt_points_at_object(
            [[o.box for o in r.objects() if o.box is not None] for r in records],
            [GroundTruth.from_json(r.ground_truth).boxes for r in records],
            min_box_iou,
        )
    return weights


def _base_weights(
    records: Sequence[BufferRecord],
    weighting: str,
    target_logprob_fn: TargetLogprobFn | None,
    importance_clip: float,
    chunk_size: int,
) -> np.ndarray:
    """The registered ``weighting`` of every record, from what a buffer holds: its behaviour log-probs,
    and the target policy's through ``target_logprob_fn`` (no advantages: there is no group reward)."""
    spec = get_weighting(weighting)
    unavailable = [k for k in spec.needs if k not in _LOGPROB_INPUTS]
    if unavailable:
        offline = [w for w in weighting_names() if set(get_weighting(w).needs) <= set(_LOGPROB_INPUTS)]
        raise ValueError(
            f"BTO weighting must be one of {offline}, got {weighting!r} (it needs {' and '.join(unavailable)},"
            " which a rollout buffer does not hold)"
        )
    parse_ok = [r.parse_ok for r in records]
    if not spec.needs:
        if target_logprob_fn is not None:
            readers = [w for w in weighting_names() if "target_logprobs" in get_weighting(w).needs]
            raise ValueError(
                f"target_logprob_fn is used by {' / '.join(readers)} weighting only; pass weighting={readers[0]!r}"
            )
        return tool_loss_weights(weighting, n=len(records), parse_ok=parse_ok)
    if target_logprob_fn is None:
        raise ValueError(f"{weighting} weighting needs target_logprob_fn")
    usable = [i for i, ok in enumerate(parse_ok) if ok]
    target: list[np.ndarray] = [np.zeros(0)] * len(records)
    behaviour: list[np.ndarray] = [np.zeros(0)] * len(records)
    for chunk in _chunks(usable, chunk_size):
        values = target_logprob_fn([records[i] for i in chunk])
        if len(values) != len(chunk):
            raise ValueError(f"target_logprob_fn returned {len(values)} rows for {len(chunk)} rollouts")
        for i, v in zip(chunk, values, strict=True):
            target[i], behaviour[i] = np.asarray(v, np.float64), np.asarray(records[i].logprobs, np.float64)
    return tool_loss_weights(
        weighting,
        n=len(records),
        target_logprobs=target,
        behaviour_logprobs=behaviour,
        importance_clip=importance_clip,
        parse_ok=parse_ok,
    )


@dataclass
class _Group:
    """One image's usable rollouts: indices into the buffer, and the ground truth they share."""

    sample_id: str
    rows: list[int]
    ground_truth: GroundTruth


def _groups(records: Sequence[BufferRecord], weights: np.ndarray) -> list[_Group]:
    """Rollouts with weight > 0 grouped by image, in order of first appearance (weight-0 rollouts add
    nothing to a weighted mean, so they are not decoded at all)."""
    groups: dict[str, _Group] = {}
    for i, r in enumerate(records):
        if weights[i] > 0:
            if r.sample_id not in groups:
                groups[r.sample_id] = _Group(r.sample_id, [], GroundTruth.from_json(r.ground_truth))
            groups[r.sample_id].rows.append(i)
    return list(groups.values())


def _tool_batch(
    groups: Sequence[_Group], records: Sequence[BufferRecord], images: ImageSource, cache: EmbeddingCache
) -> ToolBatch:
    sids = [g.sample_id for g in groups]
    image_index, prompts, gt_masks = [], [], []
    for j, g in enumerate(groups):
        mask = decode_rle(g.ground_truth.mask_rle)
        for i in g.rows:
            image_index.append(j)
            prompts.append(records[i].objects())
            gt_masks.append(mask)
    return ToolBatch(sids, [None if s in cache else images.image(s) for s in sids], image_index, prompts, gt_masks)


@contextlib.contextmanager
def _engine_cache(engine: ToolEngine, cache: EmbeddingCache) -> Iterator[EmbeddingCache]:
    """Let the engine read features from ``cache`` (the stage's, or the held-out set's) for a while."""
    previous = engine.cache
    engine.cache = cache
    try:
        yield cache
    finally:
        engine.cache = previous


def rollout_iou(
    engine: ToolEngine, records: Sequence[BufferRecord], images: ImageSource, cache: EmbeddingCache, batch_size: int = 8
) -> float:
    """gIoU of the tool's masks from the records' prompts, under the empty-mask rule (an unparseable
    answer is a missing prediction). ``cache`` holds the images' features between calls."""
    acc = IoUAccumulator()
    weights = np.array([1.0 if r.parse_ok else 0.0 for r in records])
    for r in records:
        if not r.parse_ok:
            acc.add(None, decode_rle(GroundTruth.from_json(r.ground_truth).mask_rle))
    groups = _groups(records, weights)
    with _engine_cache(engine, cache):
        for chunk in _chunks(groups, batch_size):
            batch = _tool_batch(chunk, records, images, cache)
            prediction = engine.predict(batch)
            for mask, gt in zip(prediction.masks, batch.gt_masks or [], strict=True):
                acc.add(mask.cpu().numpy(), gt)
    return acc.results()["gIoU"] if acc.ious else float("nan")


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
    :func:`rollout_weights`). Images are visited in a fresh order each epoch, drawn from
    (``seed``, epoch), so the position (epoch, batch) is the whole sampler state. Features are
    cached for the whole stage, bounded by ``max_cache_bytes`` (None: unbounded); when every image
    fits, each is encoded exactly once.

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
    groups = _groups(records, weights)
    groups = groups[: len(groups) // world * world][rank::world]
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
            state = saved
            resumed_from = int(state["batches_done"])
            logger.info("BTO resumes from %s (epoch %d, batch %d)", latest, state["epoch"], state["next_batch"])
        elif latest is not None:
            _prune_checkpoints(ckpt_root, keep=None)

    heldout_cache = EmbeddingCache(engine.tool)
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
    with _engine_cache(engine, cache):
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            order = np.random.default_rng([seed, epoch]).permutation(len(groups))
            for b in range(state["next_batch"], n_batches):
                chosen = [groups[k] for k in order[b * batch_size : (b + 1) * batch_size]]
                batch = _tool_batch(chosen, records, image_store, cache)
                metrics = engine.update(batch, [float(weights[i]) for g in chosen for i in g.rows])
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
        )
        return asdict(report)
