"""The BTO rollout buffer: the reference policy's rollouts in memory, stored as parquet + a JSON
sidecar, reloaded exactly (docs/method.md, "BTO in code", step 1)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_grto.atomic import atomic_file
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.reward.answer import ToolPrompt

BUFFER_FORMAT_VERSION = 1
META_NAME = "meta.json"
ROLLOUTS_NAME = "rollouts.parquet"
PARTS_DIR = "parts"

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
