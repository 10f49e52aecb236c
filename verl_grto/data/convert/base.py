"""Shared machinery of the dataset converters: rows, error reporting, progress, whole-or-nothing output.

A converter only knows its dataset's release layout. It turns the layout into :class:`Task` s (one
per source row: an annotation file, a ref, an image) whose ``build`` yields :class:`Sample` s;
:func:`run_conversion` does the rest the same way for every dataset:

* a row that cannot be converted raises :class:`RowError` and is **skipped and reported** by file,
  row and reason (corrupt or missing image, missing mask, mask size different from its image,
  malformed annotation, empty mask...) instead of stopping a conversion of thousands of rows;
* a row that the benchmark leaves out on purpose (a query-type filter, COD10K's non-camouflaged
  images) raises :class:`Excluded`; exclusions are counted per reason, not listed;
* a malformed *top-level* annotation file (RefCOCO's refs pickle or instances.json) raises
  :class:`AnnotationFileError` naming the file: no row of it can be trusted;
* all splits are staged in a hidden folder of the output directory and moved to
  ``<out>/<split>.parquet`` only when every split is complete, so an exception (or Ctrl-C) leaves
  no parquet behind, neither truncated nor from a half-finished set of splits;
* rows are built lazily, one task at a time, and streamed into
  :class:`verl_grto.data.parquet.AtomicParquetWriter`, which writes a row group every 1024 rows or
  16 MiB: memory holds one task's samples and one row group, never a split (RefCOCO train's rows
  carry about 19 GB of image bytes).

Images travel as their source bytes when those decode as they are (JPEG or PNG, RGB, no EXIF
rotation): re-encoding a JPEG as PNG makes it 5-10x larger for nothing. Anything else (grey,
palette, CMYK, rotated by EXIF) is decoded, rotated and re-encoded as PNG so that what verl's
``PIL.Image.open`` shows the policy is exactly the frame the mask was drawn in.

Every row records the frame the policy answers in (:mod:`verl_grto.data.frame`), for the policy family
the conversion names (``coords``: ``pixels`` for Qwen2.5-VL, the default, ``norm1000`` for Qwen3-VL;
``factor``: the policy processor's patch x merge, default the family's 28 / 32): the image entry names
the resize limits (``min_pixels`` / ``max_pixels``, default the full-size recipes' 256 to 1280 merged
patches of that factor), the ground truth holds the convention, ``answer_size`` = the resized size and
the factor, and the instruction says which coordinates are asked (in ``pixels``, on an image of which
size). The image and the ground truth stay at the original resolution.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from verl_grto.atomic import atomic_file
from verl_grto.data.frame import FAMILY_FACTORS, PIXELS, PolicyFrame, ResizeLimits, check_coords, default_limits
from verl_grto.data.masks import encode_rle, mask_to_box
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth, RLRow, build_instruction

#: Written beside the parquet files: every skipped row with its file and reason.
REPORT_NAME = "conversion_report.json"

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")


class RowError(Exception):
    """One source row cannot be converted; it is skipped and reported with this message as reason."""


class Excluded(Exception):
    """A row the benchmark leaves out on purpose (the message says why); counted, not listed."""


class AnnotationFileError(Exception):
    """A top-level annotation file is malformed: nothing is converted. The message names the file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def safe_id(*parts: object) -> str:
    """Join parts into a sample id that is also a safe file name (evaluation writes ``<id>.png``)."""
    return "-".join(_UNSAFE_ID_CHARS.sub("_", str(p)) for p in parts)


def stable_choice(key: str, n: int) -> int:
    """A deterministic index in ``range(n)`` derived from ``key`` (same on every machine and run)."""
    return zlib.crc32(key.encode("utf-8")) % n


def select_queries(texts: Sequence[str], split: str, all_queries: bool | None) -> list[tuple[int, str]]:
    """Which of an image's queries become rows: all of them, or only the first.

    ``None`` follows the official evaluation protocols (LISA's ReasonSeg and SegEarth-R1's
    EarthReason evaluate the first query of each image): every query of the train split, the first
    of the others.
    """
    keep_all = (split == "train") if all_queries is None else all_queries
    chosen = list(enumerate(texts)) if keep_all else list(enumerate(texts))[:1]
    return [(i, t.strip()) for i, t in chosen]


@dataclass(frozen=True)
class LoadedImage:
    """An image checked to decode completely, with the bytes that go into the parquet row."""

    data: bytes
    width: int
    height: int
    path: Path


def load_image(path: Path) -> LoadedImage:
    """Decode ``path`` completely (a truncated file fails here, not inside a training run).

    Raises RowError for a missing, unreadable or corrupt image.
    """
    path = Path(path)
    if not path.is_file():
        raise RowError(f"missing image {path.name}")
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            fmt = img.format
            orientation = img.getexif().get(0x0112, 1)
            if fmt in ("JPEG", "PNG") and img.mode == "RGB" and orientation == 1:
                return LoadedImage(raw, img.width, img.height, path)
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise RowError(f"corrupt image {path.name}: {exc}") from exc
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return LoadedImage(buf.getvalue(), rgb.width, rgb.height, path)


def load_mask(path: Path, threshold: int) -> np.ndarray:
    """Read a mask image as a bool HxW array: foreground where the grey value is above ``threshold``.

    Raises RowError for a missing or corrupt mask file.
    """
    path = Path(path)
    if not path.is_file():
        raise RowError(f"missing mask {path.name}")
    try:
        with Image.open(path) as img:
            img.load()
            grey = np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise RowError(f"corrupt mask {path.name}: {exc}") from exc
    return grey > threshold


def check_mask_size(mask_hw: tuple[int, int], image: LoadedImage, what: str) -> None:
    """Raise RowError when a mask (``what`` names its source) does not have its image's size."""
    if tuple(mask_hw) != (image.height, image.width):
        raise RowError(
            f"mask size {mask_hw[0]}x{mask_hw[1]} ({what}) differs from image size "
            f"{image.height}x{image.width} ({image.path.name}) (HxW)"
        )


@dataclass
class Sample:
    """One future parquet row, before its split-wide index is known."""

    sample_id: str
    image: LoadedImage
    mask: np.ndarray  # bool HxW, the union of the referred objects
    expression: str
    boxes: list[list[float]] | None = None  # one per referred object; None: the tight box of ``mask``
    extra: dict[str, Any] = field(default_factory=dict)  # same keys in every row of a split


@dataclass(frozen=True)
class Task:
    """One source row: the file it lives in, its name within the file, and how to convert it."""

    file: Path | str
    row: str
    build: Callable[[], Iterable[Sample]]


@dataclass(frozen=True)
class SkippedRow:
    split: str
    file: str
    row: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion wrote, skipped (with file, row and reason) and excluded, per split."""

    dataset: str
    out_dir: str
    written: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: list[SkippedRow] = field(default_factory=list)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)

    def skipped_per_split(self) -> dict[str, int]:
        return dict(Counter(s.split for s in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped_per_split": self.skipped_per_split()}

    def summary(self, max_rows: int = 20) -> str:
        """Human-readable lines: per split written / skipped / excluded, then the first skipped rows."""
        lines = [f"{self.dataset} -> {self.out_dir}"]
        skipped = self.skipped_per_split()
        for split in sorted(set(self.written) | set(skipped) | set(self.excluded)):
            excl = self.excluded.get(split, {})
            lines.append(
                f"  {split}: written {self.written.get(split, 0)}, skipped {skipped.get(split, 0)}"
                + (
                    f", excluded {sum(excl.values())} ({'; '.join(f'{k}: {v}' for k, v in excl.items())})"
                    if excl
                    else ""
                )
            )
        for s in self.skipped[:max_rows]:
            lines.append(f"  skipped [{s.split}] {s.file} :: {s.row}: {s.reason}")
        if len(self.skipped) > max_rows:
            lines.append(f"  ... {len(self.skipped) - max_rows} more in {REPORT_NAME}")
        return "\n".join(lines)


def _to_record(data_source: str, split: str, index: int, sample: Sample, frame: PolicyFrame) -> dict[str, Any]:
    mask = np.asarray(sample.mask, dtype=bool)
    check_mask_size(mask.shape, sample.image, "ground truth")
    if sample.boxes is not None:
        boxes = sample.boxes
    else:
        box = mask_to_box(mask)
        boxes = [] if box is None else [box]
    limits = frame.limits or default_limits(frame.factor)
    answer_h, answer_w = limits.size(sample.image.height, sample.image.width)
    gt = GroundTruth(
        mask_rle=encode_rle(mask),
        boxes=boxes,
        image_size=(sample.image.height, sample.image.width),
        answer_size=(answer_h, answer_w),
        answer_coords=frame.coords,
        resize_factor=frame.factor,
    )
    row = RLRow(
        data_source=data_source,
        instruction=build_instruction(sample.expression, answer_w, answer_h, coords=frame.coords),
        image_png=sample.image.data,
        ground_truth=gt,
        index=index,
        sample_id=sample.sample_id,
        split=split,
        expression=sample.expression,
        extra=dict(sample.extra),
        image_keys=limits.image_keys(),
    )
    return row.to_record()


def _split_records(
    data_source: str,
    split: str,
    tasks: Sequence[Task],
    report: ConversionReport,
    seen_ids: set[str],
    progress: bool,
    frame: PolicyFrame,
) -> Iterator[dict[str, Any]]:
    index = 0
    excluded: Counter[str] = Counter()
    for task in tqdm(tasks, desc=f"{report.dataset}/{split}", unit="row", disable=not progress):
        try:
            samples = list(task.build())
            for s in samples:
                if s.sample_id in seen_ids:
                    raise RowError(f"duplicate sample id {s.sample_id} (two source files with the same name?)")
            records = [_to_record(data_source, split, index + k, s, frame) for k, s in enumerate(samples)]
        except RowError as exc:
            report.skipped.append(SkippedRow(split, str(task.file), task.row, str(exc)))
            continue
        except Excluded as exc:
            excluded[str(exc)] += 1
            continue
        seen_ids.update(s.sample_id for s in samples)
        index += len(records)
        yield from records
    report.written[split] = index
    if excluded:
        report.excluded[split] = dict(excluded)


def run_conversion(
    dataset: str,
    data_source: str,
    splits: Mapping[str, Sequence[Task]],
    out: Path,
    progress: bool = True,
    frame: PolicyFrame | None = None,
) -> ConversionReport:
    """Convert every split's tasks and publish ``<out>/<split>.parquet`` plus the report, or nothing.

    ``frame``: the policy's convention, factor and resize limits the rows record (default: Qwen2.5-VL,
    ``pixels``, the full-size recipes' limits, :func:`policy_frame`); they must be the training recipe's
    (the run-start data check compares them with its processor).

    Each split's rows are generated as the parquet writer consumes them (see the module docstring).
    A split whose every row is skipped or excluded writes no parquet (verl cannot read an empty
    one); the report says so. Exceptions other than RowError / Excluded propagate after the staged
    files are removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(dataset=dataset, out_dir=str(out))
    staging = Path(tempfile.mkdtemp(prefix=".convert-", suffix=".tmp", dir=out))
    seen_ids: set[str] = set()
    try:
        staged: dict[str, Path] = {}
        for split, tasks in splits.items():
            records = _split_records(data_source, split, tasks, report, seen_ids, progress, frame or policy_frame())
            first = next(records, None)
            if first is None:
                continue
            staged[split] = staging / f"{split}.parquet"
            write_rows_atomic(itertools.chain([first], records), staged[split])
        for split, path in staged.items():
            final = out / f"{split}.parquet"
            path.replace(final)
            report.outputs[split] = str(final)
        with atomic_file(out / REPORT_NAME) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=1))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def resize_limits(factor: int, min_pixels: int | None = None, max_pixels: int | None = None) -> ResizeLimits:
    """``min_pixels`` / ``max_pixels`` options for a policy of ``factor`` (None: the full-size recipes'
    256 / 1280 merged patches of that factor)."""
    default = default_limits(factor)
    return ResizeLimits(
        default.min_pixels if min_pixels is None else min_pixels,
        default.max_pixels if max_pixels is None else max_pixels,
        factor,
    )


def policy_frame(
    coords: str = PIXELS, factor: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None
) -> PolicyFrame:
    """A converter's frame options: ``coords`` (``pixels`` | ``norm1000``), ``factor`` (None: the family's,
    28 for ``pixels``, 32 for ``norm1000``) and the resize limits (:func:`resize_limits`)."""
    check_coords(coords, "option coords")
    factor = FAMILY_FACTORS[coords] if factor is None else int(factor)
    return PolicyFrame(coords, factor, resize_limits(factor, min_pixels, max_pixels))


def find_dir(root: Path, candidates: Iterable[str]) -> Path | None:
    """The first of ``root / c`` that is a directory (releases are unpacked with or without a top folder)."""
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None
