"""The one row format every dataset of this project is written in.

verl's RL dataset reads parquet rows with the columns below (see verl's
`RLHFDataset`). The ground truth travels as a JSON string because verl hands it
to the reward function untouched and parquet needs one schema for every row:
a JSON string keeps optional fields (points, several objects) out of the schema.

Ground-truth JSON (``reward_model.ground_truth``)::

    {"mask": {"size": [H, W], "counts": "<COCO RLE string>"},   # union of the referred objects
     "boxes": [[x1, y1, x2, y2], ...],                          # one per referred object, pixels, x2/y2 exclusive
     "image_size": [H, W],
     "answer_size": [H', W'],                                   # optional: the size the policy is shown
     "answer_coords": "pixels" | "norm1000",                    # optional: the coordinates asked (default pixels)
     "resize_factor": 28 | 32,                                  # optional: the factor answer_size was resized with
     "ignore": {"size": [H, W], "counts": "<COCO RLE string>"}} # optional: pixels no score counts

``answer_size`` is the image's size as the policy's processor resizes it (``smart_resize`` with the
processor's factor ``resize_factor``, :mod:`verl_grto.data.frame`). ``answer_coords`` is the policy
family's coordinate convention: ``pixels`` answers are read in ``answer_size``, ``norm1000`` ones on a
1000 x 1000 grid (:attr:`GroundTruth.answer_frame`), and both are mapped to ``image_size``
(:mod:`verl_grto.reward.frame`). Rows written before these keys read as ``pixels``; without
``answer_size`` (the synthetic scenes, whose 112 px are a fixed point of the tiny Qwen2.5-VL's resize)
a ``pixels`` answer is read in ``image_size``; without ``resize_factor`` a row was resized by Qwen2.5-VL's 28.

``ignore`` marks pixels that count in no score, neither as object nor as background (ReasonSeg's
"ignore" polygons, LISA's protocol): the mask reward, the tool's loss, validation and ``evaluate`` all
leave them out (:func:`verl_grto.reward.mask_iou.count_overlap`). The ReasonSeg converter writes it as
``extra_info["ignore_mask"]`` (a JSON string, "" when there is none); :meth:`GroundTruth.from_row` reads
either place, so every reader gets it through one function.

``extra_info`` holds ``index`` (int, verl reads it), ``sample_id`` (str, unique and
stable: the key of the tool's embedding cache and of evaluation resume),
``split`` and ``expression`` (the referring text without the instruction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from verl_grto.data.frame import NORM1000, PIXELS, answer_grid, check_coords

IMAGE_PLACEHOLDER = "<image>"
ABILITY = "referring_segmentation"

#: The instruction the policy sees in converted benchmark rows (``verl-grto data convert``, hence the
#: full-size recipes), one per coordinate convention (:mod:`verl_grto.data.frame`). ``pixels``: pixels of
#: the image as the policy sees it, ``width`` x ``height`` being the resized size, not the file's.
#: ``norm1000``: a 0-1000 grid relative to the image (Qwen3-VL's grounding), so no size is named. Both ask
#: for the project's keys (``bbox`` / ``points``); the parser also accepts the Qwen-VL native ``bbox_2d`` /
#: ``point_2d`` (verl_grto/reward/answer.py), so a pretrained Qwen-VL that answers in its own grounding
#: format is not scored zero for the key names alone.
INSTRUCTION_TEMPLATE = (
    '{image}Find the object described by: "{expression}". '
    "The image is {width}x{height} pixels. "
    "Think briefly inside <think></think>, then answer inside <answer></answer> with JSON "
    '{{"bbox": [x1, y1, x2, y2], "points": [[x, y]]}} in pixel coordinates.'
)
NORM1000_INSTRUCTION_TEMPLATE = (
    '{image}Find the object described by: "{expression}". '
    "Think briefly inside <think></think>, then answer inside <answer></answer> with JSON "
    '{{"bbox": [x1, y1, x2, y2], "points": [[x, y]]}} in coordinates relative to the image, '
    "from 0 to 1000 on each axis."
)


#: The synthetic tiny world's instruction: the expression alone. A 0.8M-parameter policy localised
#: 250-500 supervised steps later with the long instruction above than with a short one
#: (../shared/notes/learnability.md, third probe). It names no answer format: the tiny policy is taught
#: the project's keys (``{"bbox": [...]}``) by its supervised warm start (verl_grto/assets/warmstart.py).
#: In ``norm1000`` (the tiny Qwen3-VL's rows) it names the grid.
SHORT_INSTRUCTION_TEMPLATE = "{image}Locate {expression}."
NORM1000_SHORT_INSTRUCTION_TEMPLATE = "{image}Locate {expression} on the 0-1000 grid."


def build_short_instruction(expression: str, coords: str = PIXELS) -> str:
    """The tiny world's user message: one ``<image>`` placeholder, then ``Locate <expression>.``"""
    template = NORM1000_SHORT_INSTRUCTION_TEMPLATE if check_coords(coords) == NORM1000 else SHORT_INSTRUCTION_TEMPLATE
    return template.format(image=IMAGE_PLACEHOLDER, expression=expression)


def build_instruction(expression: str, width: int, height: int, coords: str = PIXELS) -> str:
    """The user message for one referring expression (one ``<image>`` placeholder first).

    ``width`` x ``height``: the size the policy is shown; named only in ``pixels``, where it is the answer frame.
    """
    template = NORM1000_INSTRUCTION_TEMPLATE if check_coords(coords) == NORM1000 else INSTRUCTION_TEMPLATE
    return template.format(image=IMAGE_PLACEHOLDER, expression=expression, width=width, height=height)


@dataclass
class GroundTruth:
    """What the reward and the tool loss compare against."""

    mask_rle: dict[str, Any]  # {"size": [H, W], "counts": str}
    boxes: list[list[float]]
    image_size: tuple[int, int]  # (H, W)
    answer_size: tuple[int, int] | None = None  # (H', W'), the size the policy is shown; None: image_size
    answer_coords: str = PIXELS  # the coordinate convention asked (verl_grto.data.frame)
    resize_factor: int | None = None  # the factor answer_size was resized with; None: Qwen2.5-VL's 28
    ignore_rle: dict[str, Any] | None = None  # {"size": [H, W], "counts": str}: pixels no score counts

    def __post_init__(self) -> None:
        check_coords(self.answer_coords, "ground truth 'answer_coords'")

    @property
    def answer_frame(self) -> tuple[int, int]:
        """``(H, W)``: the grid the policy's answers are read in (:func:`verl_grto.data.frame.answer_grid`):
        the shown size in ``pixels`` (``image_size`` when the row names none), 1000 x 1000 in ``norm1000``."""
        return answer_grid(self.answer_coords, self.answer_size if self.answer_size is not None else self.image_size)

    def to_json(self) -> str:
        """The ground-truth JSON. The frame keys are written when the row names a frame (a converted row, or
        a convention other than ``pixels``), so rows without one keep their bytes."""
        obj: dict[str, Any] = {"mask": self.mask_rle, "boxes": self.boxes, "image_size": list(self.image_size)}
        if self.answer_size is not None:
            obj["answer_size"] = list(self.answer_size)
        if self.answer_size is not None or self.answer_coords != PIXELS:
            obj["answer_coords"] = self.answer_coords
        if self.resize_factor is not None:
            obj["resize_factor"] = self.resize_factor
        if self.ignore_rle is not None:
            obj["ignore"] = self.ignore_rle
        return json.dumps(obj)

    @classmethod
    def from_row(cls, ground_truth: str | dict, extra_info: dict[str, Any] | None = None) -> GroundTruth:
        """A row's ground truth (``reward_model.ground_truth``) with its ignore region, wherever the row
        keeps it: the ground truth's ``ignore``, or the JSON string ``extra_info["ignore_mask"]`` (the
        ReasonSeg converter's, "" when there is none)."""
        gt = cls.from_json(ground_truth)
        legacy = (extra_info or {}).get("ignore_mask")
        if gt.ignore_rle is None and legacy:
            rle = json.loads(legacy) if isinstance(legacy, str) else legacy
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise ValueError(f"extra_info 'ignore_mask' must be a COCO RLE (JSON), got {str(legacy)[:80]}")
            gt.ignore_rle = rle
        return gt

    @classmethod
    def from_json(cls, text: str | dict) -> GroundTruth:
        """Parse a ground truth; raises ValueError naming the missing or malformed field.

        Each field is checked here, not where it is first used, so that the data check
        (:mod:`verl_grto.data.check`) and a reward worker say which field of the row is wrong instead of
        failing later with an unrelated TypeError.
        """
        obj = json.loads(text) if isinstance(text, str) else text
        if not isinstance(obj, dict):
            raise ValueError(f"ground truth must be a JSON object, got {type(obj).__name__}")
        for key in ("mask", "boxes", "image_size"):
            if key not in obj:
                raise ValueError(f"ground truth lacks field {key!r} (has: {', '.join(map(str, obj)) or 'nothing'})")
        mask = obj["mask"]
        if not isinstance(mask, dict) or "size" not in mask or "counts" not in mask:
            raise ValueError(f"ground truth 'mask' must be a COCO RLE dict with size and counts, got {str(mask)[:200]}")
        size = obj["image_size"]
        if not isinstance(size, list | tuple) or len(size) != 2:
            raise ValueError(f"ground truth 'image_size' must be [H, W], got {str(size)[:80]}")
        h, w = (int(v) for v in size)
        answer = obj.get("answer_size")
        if answer is not None and (
            not isinstance(answer, list | tuple) or len(answer) != 2 or not all(int(v) > 0 for v in answer)
        ):
            raise ValueError(f"ground truth 'answer_size' must be [H, W] of positive sizes, got {str(answer)[:80]}")
        coords = obj.get("answer_coords", PIXELS)
        check_coords(coords, "ground truth 'answer_coords'")
        factor = obj.get("resize_factor")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1):
            raise ValueError(f"ground truth 'resize_factor' must be a positive integer, got {str(factor)[:40]}")
        ignore = obj.get("ignore")
        if ignore is not None and (not isinstance(ignore, dict) or "size" not in ignore or "counts" not in ignore):
            raise ValueError(
                f"ground truth 'ignore' must be a COCO RLE dict with size and counts, got {str(ignore)[:80]}"
            )
        boxes = obj["boxes"]
        if not isinstance(boxes, list) or not all(isinstance(b, list | tuple) and len(b) == 4 for b in boxes):
            raise ValueError(f"ground truth 'boxes' must be a list of [x1, y1, x2, y2], got {str(boxes)[:80]}")
        return cls(
            mask_rle=mask,
            boxes=[[float(v) for v in b] for b in boxes],
            image_size=(h, w),
            answer_size=None if answer is None else (int(answer[0]), int(answer[1])),
            answer_coords=coords,
            resize_factor=factor,
            ignore_rle=ignore,
        )


@dataclass
class RLRow:
    """One verl RL parquet row."""

    data_source: str
    instruction: str
    image_png: bytes
    ground_truth: GroundTruth
    index: int
    sample_id: str
    split: str
    expression: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: Extra keys of the image entry: the resize limits verl applies (:meth:`ResizeLimits.image_keys`).
    image_keys: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {
            "data_source": self.data_source,
            "prompt": [{"role": "user", "content": self.instruction}],
            "images": [{"bytes": self.image_png, "path": None, **self.image_keys}],
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth.to_json()},
            "extra_info": {
                "index": self.index,
                "sample_id": self.sample_id,
                "split": self.split,
                "expression": self.expression,
                **self.extra,
            },
        }
