"""The policy's answer format: parse it without ever raising, and write it (for warm-start targets).

Format (coordinates on the row's answer grid, ``x2``/``y2`` exclusive: pixels of the image as shown to
the policy for a ``pixels`` row, 0-1000 relative to it for a ``norm1000`` row; :mod:`verl_grto.data.frame`)::

    <think>...</think><answer>{"bbox": [x1, y1, x2, y2], "points": [[x, y], ...]}</answer>

An object may also carry ``"negative_points"`` (background clicks for the tool), and ``<answer>`` may
hold a JSON list of such objects when the expression names several. Whitespace around the blocks and
one trailing ``<|im_end|>`` / ``<|endoftext|>`` (when the decoder kept special tokens) are allowed;
anything else after ``</answer>`` is not.

Qwen2.5-VL's native grounding keys are accepted too, the keys a pretrained Qwen2.5-VL (and Qwen3-VL,
on its 0-1000 grid) answers with and Seg-Zero / VisionReasoner train with::

    <answer>[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "..."}]</answer>

``point_2d`` is *one* point (``[x, y]``, not a list of points): it becomes the prompt's single
positive point; ``label`` is an optional string and is ignored. An answer in native keys parses to
the same :class:`ToolPrompt` as the equivalent answer in the project's keys
(``{"bbox_2d": b, "point_2d": p}`` == ``{"bbox": b, "points": [p]}``), under the same rules below.
Coordinates are read in the same frame as the project's keys, the ``image_size`` given to
:func:`parse_answer`. For a policy answer that is the row's answer grid (``GroundTruth.answer_frame``):
the processor-resized image ``(H', W')`` in ``pixels``, where a pretrained Qwen2.5-VL grounds, or
``(1000, 1000)`` in ``norm1000``, where Qwen3-VL does; so the bounds below follow the convention
(a ``norm1000`` coordinate of 1001 is outside, whatever the image's size).
:func:`verl_grto.reward.frame.parse_policy_answer` parses there and maps to the original image.

Why strict: the reward must not be gamed by junk around the answer, and every rejection carries a
precise human reason so that a rollout dump shows at a glance what the policy gets wrong.

Decisions worth knowing:

* Coordinates outside ``[0, W] x [0, H]`` (the grid: ``[0, 1000]`` on both axes in ``norm1000``) are **rejected**, not clipped: clipping would reward a
  policy for answers that say nothing about the image ("[-1000, -1000, 1000, 1000]").
* Empty or inverted boxes (``x2 <= x1`` or ``y2 <= y1``), NaN / Infinity / non-numeric values, booleans
  and unknown keys (e.g. ``"bbox_3d"``) are rejected.
* One object uses one key style: an object mixing the project's keys with native ones (e.g.
  ``{"bbox_2d": [...], "points": [...]}`` or ``{"bbox": [...], "label": "cat"}``) is rejected with a
  reason naming both keys, because what such an object means (which box? are the points a list or
  one point?) is a guess. Objects of a list are parsed one by one, so a list may hold objects of
  either style.
* Caps: the whole response (:data:`MAX_TEXT_CHARS`), the ``<answer>`` body (:data:`MAX_ANSWER_CHARS`),
  objects per answer (:data:`MAX_OBJECTS`) and points per object (:data:`MAX_POINTS`), whatever the
  key style.
* An object needs a bbox or at least one positive point (native: a ``bbox_2d`` or a ``point_2d``).
  ``has_think`` is reported separately: an answer without a well-formed ``<think>`` block before it
  still parses (the format reward decides what that is worth).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 16_384
MAX_ANSWER_CHARS = 4_096
MAX_OBJECTS = 8
MAX_POINTS = 16

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
#: The project's keys, and Qwen2.5-VL's native grounding keys; one object uses one set.
OWN_KEYS = ("bbox", "points", "negative_points")
NATIVE_KEYS = ("bbox_2d", "point_2d", "label")
ANSWER_STYLES = ("own", "native")
_ALLOWED = f"{', '.join(OWN_KEYS)}; or Qwen2.5-VL's {', '.join(NATIVE_KEYS)}"
_TRAILING_SPECIALS = ("<|im_end|>", "<|endoftext|>")
_THINK_RE = re.compile(r"<think>(.*)</think>", re.DOTALL)


@dataclass(frozen=True)
class ToolPrompt:
    """One object's prompt for the segmentation tool: a box and/or points (label 1 = object, 0 = background)."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.points) != len(self.labels):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        if any(label not in (0, 1) for label in self.labels):
            raise ValueError(f"labels must be 0 or 1, got {self.labels}")


@dataclass(frozen=True)
class ParsedAnswer:
    """What :func:`parse_answer` found. ``objects`` is empty whenever ``reason`` is set."""

    objects: tuple[ToolPrompt, ...]
    has_think: bool
    reason: str

    @property
    def ok(self) -> bool:
        return self.reason == ""


class _Reject(Exception):
    """Internal: carries the human reason out of nested validation."""


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def _reject_constant(name: str) -> float:
    raise _Reject(f"answer JSON: {name} is not a number")


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Reject(f"answer JSON: {what} is {type(v).__name__} {json.dumps(v)[:40]}, expected a number")
    try:
        f = float(v)
    except OverflowError:
        raise _Reject(f"answer JSON: {what} is too large") from None
    if not math.isfinite(f):
        raise _Reject(f"answer JSON: {what} is not finite")
    return f


def _check_range(v: float, axis: str, what: str, image_size: tuple[int, int]) -> None:
    limit = image_size[1] if axis == "x" else image_size[0]
    if not 0.0 <= v <= limit:
        raise _Reject(f"answer JSON: {what}={_fmt(v)} outside [0, {limit}]")


def _parse_box(raw: Any, key: str, where: str, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    if not isinstance(raw, list):
        raise _Reject(f"answer JSON: {where}{key} is {type(raw).__name__}, expected a list of 4 numbers")
    if len(raw) != 4:
        raise _Reject(f"answer JSON: {where}{key} has {len(raw)} numbers, expected 4")
    names = ("x1", "y1", "x2", "y2")
    vals = [_number(v, f"{where}{key} {n}") for v, n in zip(raw, names, strict=True)]
    for v, n in zip(vals, names, strict=True):
        _check_range(v, n[0], f"{where}{key} {n}", image_size)
    x1, y1, x2, y2 = vals
    if x2 <= x1:
        raise _Reject(f"answer JSON: {where}{key} has x2={_fmt(x2)} <= x1={_fmt(x1)} (empty or inverted box)")
    if y2 <= y1:
        raise _Reject(f"answer JSON: {where}{key} has y2={_fmt(y2)} <= y1={_fmt(y1)} (empty or inverted box)")
    return (x1, y1, x2, y2)


def _parse_point(p: Any, what: str, image_size: tuple[int, int]) -> tuple[float, float]:
    if not isinstance(p, list) or len(p) != 2:
        got = f"{len(p)} values" if isinstance(p, list) else type(p).__name__
        raise _Reject(f"answer JSON: {what} is {got}, expected [x, y]")
    x, y = _number(p[0], f"{what} x"), _number(p[1], f"{what} y")
    _check_range(x, "x", f"{what} x", image_size)
    _check_range(y, "y", f"{what} y", image_size)
    return (x, y)


def _parse_points(raw: Any, key: str, where: str, image_size: tuple[int, int]) -> list[tuple[float, float]]:
    if not isinstance(raw, list):
        raise _Reject(f"answer JSON: {where}{key} is {type(raw).__name__}, expected a list of [x, y]")
    if len(raw) > MAX_POINTS:
        raise _Reject(f"answer JSON: {where}{key} has {len(raw)} points, more than {MAX_POINTS}")
    return [_parse_point(p, f"{where}{key}[{k}]", image_size) for k, p in enumerate(raw)]


def _parse_native_object(raw: dict[str, Any], where: str, image_size: tuple[int, int]) -> ToolPrompt:
    """An object in Qwen2.5-VL's keys: ``bbox_2d``, one ``point_2d`` (a positive point), a string ``label``."""
    if "label" in raw and not isinstance(raw["label"], str):
        label = raw["label"]
        raise _Reject(f"answer JSON: {where}label is {type(label).__name__}, expected a string")
    box = _parse_box(raw["bbox_2d"], "bbox_2d", where, image_size) if "bbox_2d" in raw else None
    points: tuple[tuple[float, float], ...] = ()
    if "point_2d" in raw:
        raw_point = raw["point_2d"]
        if isinstance(raw_point, list) and raw_point and all(isinstance(p, list) for p in raw_point):
            raise _Reject(f"answer JSON: {where}point_2d is a list of points, expected one point [x, y]")
        points = (_parse_point(raw_point, f"{where}point_2d", image_size),)
    if box is None and not points:
        raise _Reject(f"answer JSON: {where}has neither a bbox_2d nor a point_2d")
    return ToolPrompt(box=box, points=points, labels=(1,) * len(points))


def _parse_object(raw: Any, where: str, image_size: tuple[int, int]) -> ToolPrompt:
    if not isinstance(raw, dict):
        raise _Reject(f'answer JSON: {where}is {type(raw).__name__}, expected an object like {{"bbox": [...]}}')
    unknown = [k for k in raw if k not in OWN_KEYS and k not in NATIVE_KEYS]
    if unknown:
        raise _Reject(f"answer JSON: {where}unknown key {unknown[0]!r} (allowed: {_ALLOWED})")
    own = [k for k in raw if k in OWN_KEYS]
    native = [k for k in raw if k in NATIVE_KEYS]
    if own and native:
        raise _Reject(
            f"answer JSON: {where}mixes key {own[0]!r} with Qwen2.5-VL key {native[0]!r} "
            f"(one object uses {', '.join(OWN_KEYS)} or {', '.join(NATIVE_KEYS)}, not both)"
        )
    if native:
        return _parse_native_object(raw, where, image_size)
    box = _parse_box(raw["bbox"], "bbox", where, image_size) if "bbox" in raw else None
    pos = _parse_points(raw["points"], "points", where, image_size) if "points" in raw else []
    neg = (
        _parse_points(raw["negative_points"], "negative_points", where, image_size) if "negative_points" in raw else []
    )
    if len(pos) + len(neg) > MAX_POINTS:
        raise _Reject(f"answer JSON: {where}has {len(pos) + len(neg)} points, more than {MAX_POINTS}")
    if box is None and not pos:
        raise _Reject(f"answer JSON: {where}has neither a bbox nor positive points")
    return ToolPrompt(box=box, points=tuple(pos + neg), labels=(1,) * len(pos) + (0,) * len(neg))


def parse_object(raw: Any, image_size: tuple[int, int]) -> tuple[ToolPrompt | None, str]:
    """One object of an answer (``{"bbox": [...], "points": [...], "negative_points": [...]}``, or the
    Qwen2.5-VL keys) read on a grid of ``image_size = (height, width)``, by the rules of
    :func:`parse_answer`; never raises. Returns the prompt and "" or None and the reason.

    Why public: the segmentation tool's call arguments follow the answers' convention
    (:mod:`verl_grto.agent.calls`), so they are checked by the same rules, not a copy of them."""
    try:
        h, w = (int(v) for v in image_size)
        return _parse_object(raw, "", (h, w)), ""
    except _Reject as e:
        return None, str(e)
    except Exception as e:  # a parser bug must not crash a caller
        return None, f"internal parser error: {type(e).__name__}: {e}"


def _split_blocks(text: str) -> tuple[str, str]:
    """Return (text before <answer>, answer body) or raise _Reject with the format problem."""
    if len(text) > MAX_TEXT_CHARS:
        raise _Reject(f"response has {len(text)} characters, more than {MAX_TEXT_CHARS}")
    n_open, n_close = text.count(ANSWER_OPEN), text.count(ANSWER_CLOSE)
    if n_open == 0:
        raise _Reject("no <answer> tag")
    if n_open > 1:
        raise _Reject(f"{n_open} <answer> tags, expected 1")
    if n_close == 0:
        raise _Reject("no </answer> closing tag (truncated?)")
    if n_close > 1:
        raise _Reject(f"{n_close} </answer> tags, expected 1")
    start, end = text.index(ANSWER_OPEN), text.index(ANSWER_CLOSE)
    if end < start:
        raise _Reject("</answer> comes before <answer>")
    tail = text[end + len(ANSWER_CLOSE) :].strip()
    for special in _TRAILING_SPECIALS:
        if tail.endswith(special):
            tail = tail[: -len(special)].strip()
            break
    if tail:
        raise _Reject(f"text after </answer>: {tail[:40]!r}")
    body = text[start + len(ANSWER_OPEN) : end]
    if len(body) > MAX_ANSWER_CHARS:
        raise _Reject(f"answer has {len(body)} characters, more than {MAX_ANSWER_CHARS}")
    return text[:start], body


def _is_think_block(prefix: str) -> bool:
    m = _THINK_RE.fullmatch(prefix.strip())
    return m is not None and not any(tag in m.group(1) for tag in (THINK_OPEN, THINK_CLOSE))


def _parse_body(body: str, image_size: tuple[int, int]) -> tuple[ToolPrompt, ...]:
    body = body.strip()
    if not body:
        raise _Reject("answer is empty")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise _Reject(f"answer JSON: invalid ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise _Reject("answer JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal with too many digits
        raise _Reject(f"answer JSON: invalid ({str(e)[:60]})") from None
    if isinstance(data, dict):
        return (_parse_object(data, "", image_size),)
    if not isinstance(data, list):
        raise _Reject(f"answer JSON: top level is {type(data).__name__}, expected an object or a list of objects")
    if not data:
        raise _Reject("answer JSON: empty list of objects")
    if len(data) > MAX_OBJECTS:
        raise _Reject(f"answer JSON: {len(data)} objects, more than {MAX_OBJECTS}")
    return tuple(_parse_object(obj, f"object {k}: ", image_size) for k, obj in enumerate(data))


def parse_answer(text: str, image_size: tuple[int, int]) -> ParsedAnswer:
    """Parse a policy response for an image of ``image_size = (height, width)`` pixels; never raises.

    ``(height, width)`` is the order of :class:`verl_grto.data.schema.GroundTruth.image_size`, so a
    ground truth's size can be passed as is. On any problem the result has no objects and ``reason``
    says what is wrong.
    """
    has_think = False
    try:
        if not isinstance(text, str):
            raise _Reject(f"response is {type(text).__name__}, expected str")
        h, w = (int(v) for v in image_size)
        prefix, body = _split_blocks(text)
        has_think = _is_think_block(prefix)
        return ParsedAnswer(objects=_parse_body(body, (h, w)), has_think=has_think, reason="")
    except _Reject as e:
        return ParsedAnswer(objects=(), has_think=has_think, reason=str(e))
    except Exception as e:  # a parser bug must not crash training; tests assert this never happens
        return ParsedAnswer(objects=(), has_think=has_think, reason=f"internal parser error: {type(e).__name__}: {e}")


def _json_number(v: float) -> int | float:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"cannot format non-finite coordinate {v!r}")
    return int(f) if f.is_integer() else f


def format_answer(objects: Sequence[ToolPrompt], think: str = "...", *, style: str = "own") -> str:
    """Write ``objects`` in the answer format; the exact inverse of :func:`parse_answer`.

    Integral coordinates are written without decimals (``12`` not ``12.0``), as a policy should write
    them. One object is written as a JSON object, several as a list. Positive points are written
    before negative ones, which is the order :func:`parse_answer` returns them in; an object without
    points is written without a ``"points"`` key (``{"bbox": [...]}``, the shortest answer).

    ``style="native"`` writes Qwen2.5-VL's keys instead (``{"bbox_2d": [...], "point_2d": [x, y]}``),
    e.g. for targets in the form a pretrained Qwen2.5-VL already answers in; it can hold at most one
    positive point and no negative ones per object, and raises ValueError for more.
    """
    if style not in ANSWER_STYLES:
        raise ValueError(f"style must be one of {ANSWER_STYLES}, got {style!r}")
    if not objects:
        raise ValueError("format_answer needs at least one object")
    if any(tag in think for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        raise ValueError(f"think text must not contain <think>/<answer> tags: {think[:80]!r}")
    items = []
    for obj in objects:
        pos = [
            [_json_number(x), _json_number(y)] for (x, y), lab in zip(obj.points, obj.labels, strict=True) if lab == 1
        ]
        neg = [
            [_json_number(x), _json_number(y)] for (x, y), lab in zip(obj.points, obj.labels, strict=True) if lab == 0
        ]
        if obj.box is None and not pos:
            raise ValueError("an object needs a box or at least one positive point")
        item: dict[str, Any] = {}
        if style == "native":
            if neg or len(pos) > 1:
                raise ValueError(
                    f"the native style holds one positive point per object, got {len(pos)} positive "
                    f"and {len(neg)} negative"
                )
            if obj.box is not None:
                item["bbox_2d"] = [_json_number(v) for v in obj.box]
            if pos:
                item["point_2d"] = pos[0]
        else:
            if obj.box is not None:
                item["bbox"] = [_json_number(v) for v in obj.box]
            if pos:
                item["points"] = pos
            if neg:
                item["negative_points"] = neg
        items.append(item)
    payload = items[0] if len(items) == 1 else items
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{json.dumps(payload)}{ANSWER_CLOSE}"
