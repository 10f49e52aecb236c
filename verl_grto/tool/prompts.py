"""Per-object prompts for the segmentation tool, and their sanitisation.

Why sanitise here: prompts come from a policy being trained, so boxes outside the image,
inverted or zero-area boxes, NaN coordinates and mismatched point/label lists are normal
inputs, not bugs. They must be repaired or dropped (with a reason the caller can log)
before they reach SAM2, which would otherwise produce NaNs or crash mid-batch.

Any object with `box`, `points` and `labels` attributes is accepted (duck typing), so the
answer parser's `ToolPrompt` meets `ObjectPrompt` without conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Box = tuple[float, float, float, float]
Point = tuple[float, float]

POSITIVE, NEGATIVE = 1, 0


class PromptLike(Protocol):
    """What the tool reads from a prompt: an optional box and labelled points, in original-image pixels."""

    box: Sequence[float] | None
    points: Sequence[Sequence[float]]
    labels: Sequence[int]


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to segment: a box (x1, y1, x2, y2) and/or points with labels (1 positive, 0 negative)."""

    box: Box | None
    points: tuple[Point, ...] = ()
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class SanitizedPrompt:
    """A prompt that is safe to feed to SAM2: finite, inside the image, box non-degenerate, at least one cue."""

    box: Box | None
    points: tuple[Point, ...]
    labels: tuple[int, ...]

    @property
    def signature(self) -> tuple[bool, int]:
        """Prompts with the same signature have the same token count and can be batched without padding."""
        return self.box is not None, len(self.points)


def _finite(values: Sequence[float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _sanitize_box(box: Sequence[float], height: int, width: int, min_size: float) -> tuple[Box | None, str | None]:
    """Order corners and clip to the image (reported); reject non-finite, wrong-length or (after clipping) tiny boxes."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return None, f"box {box!r} is not numeric"
    if len(values) != 4:
        return None, f"box has {len(values)} values, expected 4"
    if not _finite(values):
        return None, f"box {tuple(values)} is not finite"
    x1, x2 = sorted((values[0], values[2]))
    y1, y2 = sorted((values[1], values[3]))
    ordered = (x1, y1, x2, y2)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return None, f"box {tuple(values)} is degenerate or outside the {width}x{height} image"
    box = (x1, y1, x2, y2)
    if box != ordered:
        return box, f"box {tuple(values)} clipped to the {width}x{height} image"
    return box, None


def sanitize_prompt(
    prompt: PromptLike, image_hw: tuple[int, int], min_box_size: float = 1.0
) -> tuple[SanitizedPrompt | None, list[str]]:
    """Repair what can be repaired, drop what cannot; return the prompt (None if nothing usable) and the issues.

    Boxes get their corners ordered (silently: x1 > x2 is a harmless convention slip) and
    are clipped to the image (reported); a box that is non-finite or
    smaller than `min_box_size` pixels on a side after clipping is dropped. Points that are
    non-finite or outside the image, and labels other than 0/1, are dropped individually;
    a points/labels length mismatch drops all points. An object left with no cue is rejected.
    """
    height, width = image_hw
    reasons: list[str] = []
    box: Box | None = None
    raw_box = getattr(prompt, "box", None)
    if raw_box is not None:
        box, reason = _sanitize_box(raw_box, height, width, min_box_size)
        if reason:
            reasons.append(reason)

    raw_points = list(getattr(prompt, "points", ()) or ())
    raw_labels = list(getattr(prompt, "labels", ()) or ())
    points: list[Point] = []
    labels: list[int] = []
    if len(raw_points) != len(raw_labels):
        reasons.append(f"{len(raw_points)} points but {len(raw_labels)} labels; points dropped")
    else:
        for point, label in zip(raw_points, raw_labels, strict=True):
            try:
                x, y = (float(v) for v in point)
            except (TypeError, ValueError):
                reasons.append(f"point {point!r} is not an (x, y) pair")
                continue
            if label not in (POSITIVE, NEGATIVE):
                reasons.append(f"point label {label!r} is not 0 or 1")
            elif not _finite((x, y)):
                reasons.append(f"point {(x, y)} is not finite")
            elif not (0.0 <= x <= width and 0.0 <= y <= height):
                reasons.append(f"point {(x, y)} is outside the {width}x{height} image")
            else:
                points.append((x, y))
                labels.append(int(label))

    if box is None and not points:
        reasons.append("object has no usable box or point; rejected")
        return None, reasons
    return SanitizedPrompt(box, tuple(points), tuple(labels)), reasons
