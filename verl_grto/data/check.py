"""Find the rows of a verl RL parquet that training or evaluation could not use, before they are used.

Why: verl reads a parquet lazily, so a bad row (image bytes that do not decode, a ground truth
without its mask, an RLE that does not fit its image, an empty instruction) surfaces as a stack
trace from a Ray worker in the middle of a step -- or, for an RLE whose runs fall short of its size,
not at all (pycocotools decodes the rest as uninitialised memory). :func:`check_parquet` reads every
row once, with the decoders training uses (:func:`verl_grto.data.images.decode_image`,
:meth:`verl_grto.data.schema.GroundTruth.from_json`, :func:`verl_grto.data.masks.decode_rle`), and
returns one :class:`RowProblem` per thing wrong: file, row index and reason. It never raises for a
row's content; ``verl-grto data check`` prints the problems, and the grto/bgrto trainers run it at
start (:mod:`verl_grto.trainer.data_preflight`).

Row indices count from 0 in file order, as ``pyarrow.parquet.read_table(path).slice(index, 1)`` and
verl's dataset over that one file number them.

What a row must have (the format of :mod:`verl_grto.data.schema`):

* ``prompt``: a list of messages with string ``content``; some text besides the ``<image>``
  placeholders (the instruction); as many ``<image>`` placeholders as the row has images;
* ``images``: at least one entry, each with bytes that decode completely;
* ``reward_model.ground_truth``: JSON that :meth:`GroundTruth.from_json` accepts, boxes of 4 finite
  numbers, a mask RLE that decodes to exactly ``image_size``, and an ``image_size`` equal to the
  first image's; an ``answer_size``, when given, equal to the size the policy's processor resizes the
  first image to (with the row's ``resize_factor``) under the resize limits its entry names
  (:mod:`verl_grto.data.frame`: otherwise the policy would be told, and scored in, a frame other than
  the one it is shown);
* when the policy's frame is known (a run's check: the recipe's ``data.answer_coords`` and its
  processor, :class:`verl_grto.data.frame.PolicyFrame`): the row's coordinate convention is the
  policy's (a Qwen3-VL policy is never scored in pixels, nor a Qwen2.5-VL one on the 0-1000 grid), its
  ``resize_factor`` is the processor's, and its frame is a fixed point of the processor's limits;
* ``extra_info.sample_id`` (the tool's image store and evaluation key rows by it).

Reading is streamed in small batches, so memory holds a few rows' images, never the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_grto.data.frame import QWEN25VL_FACTOR, PolicyFrame, coords_mismatch, entry_limits
from verl_grto.data.images import decode_image, image_bytes
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import IMAGE_PLACEHOLDER, GroundTruth

#: The columns a row of this project needs (verl's RL format; data_source and ability are verl's own).
REQUIRED_COLUMNS = ("prompt", "images", "reward_model", "extra_info")
#: Rows decoded per pyarrow batch: a few images in memory at a time.
BATCH_ROWS = 32


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with a parquet file: ``row`` is its 0-based row index, None for the whole file."""

    file: str
    row: int | None
    reason: str

    def __str__(self) -> str:
        """``file:row: reason`` (``file: reason`` for a file-level problem), the CLI's line."""
        return f"{self.file}: {self.reason}" if self.row is None else f"{self.file}:{self.row}: {self.reason}"


def _prompt_problems(prompt: Any, n_images: int) -> list[str]:
    if not isinstance(prompt, list) or not prompt:
        return ["prompt has no messages"]
    texts = []
    for i, message in enumerate(prompt):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            return [f"prompt message {i} has no text content"]
        texts.append(content)
    text = "".join(texts)
    problems = []
    if not text.replace(IMAGE_PLACEHOLDER, "").strip():
        problems.append("empty instruction (no text besides the <image> placeholder)")
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if n_placeholders != n_images:
        problems.append(
            f"prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has {n_images} image(s)"
        )
    return problems


def _frame_problems(gt: GroundTruth, image_hw: tuple[int, int], entry: Any, policy: PolicyFrame | None) -> list[str]:
    """A stated frame that is not the one the policy is shown, or not the policy's (convention, factor).

    verl resizes by the limits the image entry names (with the row's factor, which must be the policy
    processor's), then the processor by its own (``policy.limits``, a recipe's ``data.mm_processor_kwargs``):
    the frame must be a fixed point of the second, or the policy would see yet another size.
    """
    problems = []
    if policy is not None and (mismatch := coords_mismatch(gt.answer_coords, policy.coords)) is not None:
        problems.append(mismatch)
    if gt.answer_size is None:
        return problems
    factor = gt.resize_factor or QWEN25VL_FACTOR  # rows written before resize_factor were Qwen2.5-VL's
    if policy is not None and factor != policy.factor:
        return [
            *problems,
            f"ground truth resize_factor is {factor} but the policy's processor resizes in steps of {policy.factor} "
            f"(patch x merge): convert the data with factor={policy.factor}",
        ]
    limits = entry_limits(entry, factor)
    shown = limits.size(*image_hw)
    if gt.answer_size != shown:
        return [
            *problems,
            f"ground truth answer_size is {_hw(gt.answer_size)} but the policy is shown the image at {_hw(shown)} "
            f"(min_pixels {limits.min_pixels}, max_pixels {limits.max_pixels}, factor {factor}); re-convert the data",
        ]
    processor_limits = None if policy is None else policy.limits
    if processor_limits is not None and not processor_limits.is_fixed_point(*shown):
        problems.append(
            f"the row's answer frame {_hw(shown)} (min_pixels {limits.min_pixels}, max_pixels {limits.max_pixels}) "
            f"is resized again to {_hw(processor_limits.size(*shown))} by the processor's limits (min_pixels "
            f"{processor_limits.min_pixels}, max_pixels {processor_limits.max_pixels}): convert the data with the "
            "recipe's data.mm_processor_kwargs"
        )
    return problems


def _ground_truth_problems(
    reward_model: Any,
    image_hw: tuple[int, int] | None,
    entry: Any = None,
    policy: PolicyFrame | None = None,
) -> list[str]:
    """What is wrong with the row's ground truth; sizes are compared with the image when it decoded."""
    raw = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if raw is None:
        return ["reward_model has no ground_truth"]
    try:
        gt = GroundTruth.from_json(raw)
    except json.JSONDecodeError as exc:
        return [f"ground truth is not JSON ({exc.msg} at char {exc.pos})"]
    except (ValueError, TypeError) as exc:
        return [str(exc) if str(exc).startswith("ground truth") else f"ground truth is malformed: {exc}"]
    problems = [
        f"ground truth boxes[{i}] is {box}, expected 4 finite numbers"
        for i, box in enumerate(gt.boxes)
        if not all(math.isfinite(v) for v in box)
    ]
    try:
        mask = decode_rle(gt.mask_rle)
    except (ValueError, TypeError) as exc:
        return [*problems, f"ground truth mask does not decode: {exc}"]
    mask_hw = (int(mask.shape[0]), int(mask.shape[1]))
    if image_hw is None:  # no image to compare with: the mask must at least fit the stated size
        if mask_hw != gt.image_size:
            problems.append(f"ground truth mask is {_hw(mask_hw)} but its image_size is {_hw(gt.image_size)}")
        return problems
    if mask_hw != image_hw and mask_hw == gt.image_size:
        problems.append(f"ground truth mask and image_size are {_hw(mask_hw)} but the image is {_hw(image_hw)}")
        return problems
    if mask_hw != image_hw:
        problems.append(f"ground truth mask is {_hw(mask_hw)} but the image is {_hw(image_hw)}")
    if gt.image_size != image_hw:
        problems.append(f"ground truth image_size is {_hw(gt.image_size)} but the image is {_hw(image_hw)}")
    return problems + _frame_problems(gt, image_hw, entry, policy)


def _hw(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]} (HxW)"


def check_row(row: dict[str, Any], policy: PolicyFrame | None = None) -> list[str]:
    """Everything wrong with one row, as reasons (empty: the row is usable). Never raises.

    ``policy``: the training policy's frame (its convention, its processor's factor and a recipe's
    ``data.mm_processor_kwargs``), when known; the row must be in its convention and factor, and its
    answer frame must not be resized again by its limits."""
    try:
        problems: list[str] = []
        image_hw = None
        stored = image_bytes(row)
        if not stored:
            problems.append("row has no images")
        for i, data in enumerate(stored):
            try:
                image = decode_image(data, f"image {i}")
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if i == 0:
                image_hw = (image.height, image.width)
        problems += _prompt_problems(row.get("prompt"), len(stored))
        entries = row.get("images") or [None]
        problems += _ground_truth_problems(row.get("reward_model"), image_hw, entries[0], policy)
        info = row.get("extra_info")
        if not isinstance(info, dict) or info.get("sample_id") in (None, ""):
            problems.append("extra_info has no sample_id")
        return problems
    except Exception as exc:  # a checker bug must not hide the other rows' problems
        return [f"internal check error: {type(exc).__name__}: {exc}"]


def iter_rows(path: Path | str, columns: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row_index, row)`` for every row of the parquet, read ``BATCH_ROWS`` rows at a time."""
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def check_parquet(path: Path | str, policy: PolicyFrame | None = None) -> list[RowProblem]:
    """Every problem of a verl RL parquet file, in row order (empty: every row is usable). Never raises.

    ``policy``: as for :func:`check_row`.

    A file that cannot be read as parquet, or lacks a column rows need, gives one file-level problem
    (``row`` None) and no row problems: no row of it could be used.
    """
    name = str(path)
    if not Path(path).is_file():
        return [RowProblem(name, None, "no such file")]
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (OSError, pa.ArrowException) as exc:
        return [RowProblem(name, None, f"not a readable parquet file: {exc}")]
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        return [
            RowProblem(
                name, None, f"no column {', '.join(missing)} (a verl RL parquet has {', '.join(REQUIRED_COLUMNS)})"
            )
        ]
    problems = []
    read = 0
    try:
        for index, row in iter_rows(path, columns=list(REQUIRED_COLUMNS)):
            problems += [RowProblem(name, index, reason) for reason in check_row(row, policy)]
            read = index + 1
    except (OSError, pa.ArrowException) as exc:  # a corrupt page or row group: the rest cannot be read
        problems.append(RowProblem(name, None, f"unreadable from about row {read} on: {exc}"))
    return problems
