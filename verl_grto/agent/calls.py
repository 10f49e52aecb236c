"""A call of the segmentation tool: its arguments, their checks, and the record the trainer reads back.

**Arguments follow the answers' convention** (docs/recipes.md, "The answer format"): one object,
``{"bbox": [x1, y1, x2, y2], "points": [[x, y], ...], "negative_points": [[x, y], ...]}`` (points
optional), on the grid the policy answers on (:func:`verl_grto.data.frame.answer_grid`: pixels of the
image it was shown for ``pixels``, 0-1000 for ``norm1000``). They are checked by the answer parser's own
object rules (:func:`verl_grto.reward.answer.parse_object`: a coordinate outside the grid, an empty or
inverted box, a NaN, an unknown key are refused) plus one rule of the tool's: a call needs a ``bbox``.
The check is the tool's, not verl's: verl's schema class keeps only ``type`` / ``description`` /
``enum`` of a property (``verl/tools/schemas.py:21-29``), so ``items`` and ``minItems`` never reach
anything that would enforce them.

**Frames.** :class:`CallFrame` holds the three frames of a call: the grid the arguments are read on,
the image the policy was shown ``(H', W')`` (where the reply is drawn) and the original image
``(H, W)`` (where the trainer's tool segments and every IoU is counted). Crossing them is
:func:`verl_grto.reward.frame.to_image_frame`, the one function answers use too.

**The record.** Every call of a trajectory, valid or not, is appended to the trajectory's
``extra_fields[CALLS_KEY]`` as a :class:`CallRecord` dict (JSON-able: it travels through Ray,
TransferQueue and verl's reward workers, whose ``extra_info`` carries it). The prompt is stored in the
*original* frame, so the trainer needs nothing else to re-segment it. A trajectory that never called
the tool gets an empty list from :class:`verl_grto.agent.loop.GRTOToolAgentLoop`, so every sample has
the same keys (``DataProto.concat`` across agent-loop workers asserts that, ``verl/protocol.py:914-931``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from verl_grto.data.frame import answer_grid, check_coords
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt, format_answer, parse_answer, parse_object
from verl_grto.reward.frame import to_image_frame

#: The tool's function name (the tool YAML's ``tool_schema.function.name``).
TOOL_NAME = "segment"
#: ``extra_fields`` key of a trajectory's call records (a list of :meth:`CallRecord.as_dict`).
CALLS_KEY = "grto_tool_calls"
#: Argument key under which the lenient parser (:mod:`verl_grto.agent.loop`) hands the tool the raw text
#: of a ``<tool_call>`` whose JSON did not parse, so the tool can answer it with an error and a penalty.
MALFORMED_KEY = "__malformed_call__"
#: Kinds of a call: ``ok`` (a mask was made), ``invalid`` (the policy's fault: bad arguments, too many
#: calls; a text error and a penalty), ``failed`` (the tool's fault: no penalty, and the trainer stops).
OK, INVALID, FAILED = "ok", "invalid", "failed"
#: Characters of the raw arguments a record keeps (for dumps; the prompt is what counts).
RAW_CHARS = 200

_OWN_PREFIX = re.compile(r"^answer JSON: ")


@dataclass(frozen=True)
class CallFrame:
    """The frames of one trajectory's calls: ``coords`` (the policy's convention), ``shown_hw`` (the image
    the policy was shown, ``(H', W')``) and ``image_hw`` (the original image, ``(H, W)``)."""

    coords: str
    shown_hw: tuple[int, int]
    image_hw: tuple[int, int]

    def __post_init__(self) -> None:
        check_coords(self.coords, "the segmentation tool's answer_coords")
        if min(self.shown_hw) < 1 or min(self.image_hw) < 1:
            raise ValueError(f"image sizes must be positive, got shown {self.shown_hw}, original {self.image_hw}")

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of the grid the arguments are read on."""
        return answer_grid(self.coords, self.shown_hw)

    def to_shown(self, prompt: ToolPrompt) -> ToolPrompt:
        """A prompt on the grid, in pixels of the image the policy was shown."""
        return _mapped(prompt, self.grid, self.shown_hw)

    def to_image(self, prompt: ToolPrompt) -> ToolPrompt:
        """A prompt on the grid, in pixels of the original image."""
        return _mapped(prompt, self.grid, self.image_hw)

    def box_on_grid(self, box_shown: Sequence[float]) -> list[int]:
        """A box in pixels of the shown image as integers on the grid (what the reply tells the policy)."""
        (gh, gw), (sh, sw) = self.grid, self.shown_hw
        x1, y1, x2, y2 = (float(v) for v in box_shown)
        return [
            math.floor(x1 * gw / sw),
            math.floor(y1 * gh / sh),
            math.ceil(x2 * gw / sw),
            math.ceil(y2 * gh / sh),
        ]

    @classmethod
    def from_kwargs(
        cls, create_kwargs: Mapping[str, Any] | None, shown_size_wh: Sequence[int], coords: str
    ) -> CallFrame:
        """From a row's ``extra_info.tools_kwargs.segment.create_kwargs`` (``image_size: [H, W]``,
        optionally ``answer_coords``) and the size of the image the policy was shown (PIL's ``(W, H)``).
        A row that names no ``image_size`` is its shown image (the frames coincide)."""
        kwargs = dict(create_kwargs or {})
        shown = (int(shown_size_wh[1]), int(shown_size_wh[0]))
        size = kwargs.get("image_size")
        image = (int(size[0]), int(size[1])) if size is not None else shown
        return cls(str(kwargs.get("answer_coords") or coords), shown, image)


def _mapped(prompt: ToolPrompt, grid: tuple[int, int], size: tuple[int, int]) -> ToolPrompt:
    return to_image_frame(ParsedAnswer((prompt,), True, ""), grid, size).objects[0]


def format_call(prompt: ToolPrompt, name: str = TOOL_NAME) -> str:
    """A call in the hermes format the ``grto_hermes`` parser reads and the tiny template renders:
    ``<tool_call>{"name": "segment", "arguments": {"bbox": [x1, y1, x2, y2]}}</tool_call>`` (the arguments
    are the answer object :func:`verl_grto.reward.answer.format_answer` writes, integral coordinates
    without decimals)."""
    answer = format_answer([prompt], think="")
    arguments = json.loads(answer[answer.index("<answer>") + len("<answer>") : answer.index("</answer>")])
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def check_arguments(arguments: Any, frame: CallFrame) -> tuple[ToolPrompt | None, str]:
    """The prompt a call asks for, on the grid, or None and what is wrong (for the policy to read)."""
    if isinstance(arguments, Mapping) and MALFORMED_KEY in arguments:
        raw = str(arguments[MALFORMED_KEY])[:80]
        return None, f"the tool call is not valid JSON with a name and arguments: {raw!r}"
    if not isinstance(arguments, Mapping):
        return None, f"arguments must be a JSON object, got {type(arguments).__name__}"
    if "bbox" not in arguments:
        return None, 'arguments need a "bbox": [x1, y1, x2, y2]'
    prompt, reason = parse_object(dict(arguments), frame.grid)
    if prompt is None:
        reason = _OWN_PREFIX.sub("arguments: ", reason)
        h, w = frame.grid
        return None, f"{reason} (the image is {w}x{h})" if "outside" in reason else reason
    return prompt, ""


@dataclass
class CallRecord:
    """One call of a trajectory as the trainer and verl's reward functions read it back (JSON-able).

    ``kind``: :data:`OK`, :data:`INVALID` or :data:`FAILED`; ``error`` says why when not ok; ``penalty``
    is what the call costs the trajectory's reward (the tool's ``invalid_call_penalty`` for an invalid
    call, else 0). ``box`` / ``points`` / ``labels``: the prompt in the *original* image's pixels (None /
    empty for an invalid call). ``mask_rle``: the mask the policy was shown, as COCO RLE at the original
    size; ``area_fraction`` and ``mask_box`` (original pixels, None when empty) describe it.
    ``arguments``: the raw arguments, cut to :data:`RAW_CHARS` characters."""

    index: int
    kind: str
    error: str = ""
    penalty: float = 0.0
    arguments: str = ""
    box: list[float] | None = None
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    mask_rle: dict[str, Any] | None = None
    area_fraction: float | None = None
    mask_box: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.kind == OK

    def prompt(self) -> ToolPrompt | None:
        """The prompt in the original frame (None for a call that made no mask)."""
        if not self.ok:
            return None
        box = tuple(float(v) for v in self.box) if self.box is not None else None
        return ToolPrompt(box, tuple((float(x), float(y)) for x, y in self.points), tuple(int(v) for v in self.labels))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CallRecord:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    @classmethod
    def of_prompt(cls, index: int, prompt: ToolPrompt, arguments: str) -> CallRecord:
        """A valid call's record (the mask fields are filled once the mask is made)."""
        return cls(
            index=index,
            kind=OK,
            arguments=arguments[:RAW_CHARS],
            box=list(prompt.box) if prompt.box is not None else None,
            points=[list(p) for p in prompt.points],
            labels=list(prompt.labels),
        )


def calls_of(extra_fields: Mapping[str, Any] | None) -> list[CallRecord]:
    """A trajectory's call records from its ``extra_fields`` (or a reward's ``extra_info``); [] when none."""
    raw = (extra_fields or {}).get(CALLS_KEY) or []
    return [r if isinstance(r, CallRecord) else CallRecord.from_dict(r) for r in raw]


#: How a trajectory's final mask is chosen (``grto_agent.final_mask``; docs/method.md, "Multi-turn").
FINAL_MASK_MODES = ("last_call", "answer")
_FINAL_ANSWER = re.compile(
    r"(?:<think>(?:(?!<think>).)*?</think>\s*)?<answer>(?:(?!<answer>).)*</answer>\s*$", re.DOTALL
)


@dataclass(frozen=True)
class FinalMask:
    """What a trajectory's reward scores: the prompts of its final mask (original frame; empty: no mask,
    a missing prediction), where they come from (``call``, ``answer`` or ``none``), the index of the
    call when from a call, and whether the trajectory ended with a well-formed answer (its format)."""

    prompts: tuple[ToolPrompt, ...]
    source: str
    call_index: int | None
    answer: ParsedAnswer

    @property
    def well_formed(self) -> bool:
        return self.answer.ok and self.answer.has_think


def final_answer_text(text: str) -> str:
    """The trailing ``[<think>...</think>]<answer>...</answer>`` block of a whole response ("" when none).

    For readers that see the trajectory as one decoded string (verl's reward functions): the tool's
    replies and earlier turns are cut off. The trainer reads the last assistant turn from the response
    mask instead (:func:`verl_grto.trainer.agent_trainer.last_turn_text`)."""
    match = _FINAL_ANSWER.search(text.rstrip().removesuffix("<|im_end|>").rstrip())
    return match.group(0) if match else ""


def final_mask(
    calls: Sequence[CallRecord], answer_text: str, answer_grid_hw: Sequence[int], image_hw: Sequence[int], mode: str
) -> FinalMask:
    """The trajectory's final mask (docs/method.md, "Multi-turn"): ``last_call`` (default) scores the mask
    of its last valid call, the one the policy saw last and stopped at, and falls back to the answer's
    prompts when it made no valid call; ``answer`` scores the prompts of its final ``<answer>`` and falls
    back to the last valid call when the answer does not parse. ``answer_text`` is the last assistant
    turn; it is parsed on ``answer_grid_hw`` and mapped to ``image_hw`` (the original frame)."""
    if mode not in FINAL_MASK_MODES:
        raise ValueError(f"grto_agent.final_mask must be one of {FINAL_MASK_MODES}, got {mode!r}")
    answer = parse_answer(answer_text, (int(answer_grid_hw[0]), int(answer_grid_hw[1])))
    answer = to_image_frame(answer, answer_grid_hw, image_hw)
    valid = [c for c in calls if c.ok]
    from_call = FinalMask((valid[-1].prompt(),), "call", valid[-1].index, answer) if valid else None  # type: ignore[arg-type]
    from_answer = FinalMask(answer.objects, "answer", None, answer) if answer.ok else None
    first, second = (from_call, from_answer) if mode == "last_call" else (from_answer, from_call)
    return first or second or FinalMask((), "none", None, answer)
