"""Read a policy answer in the frame the policy answered in, and map it to the original image's frame.

A policy answers on its row's *answer grid* (:attr:`verl_grto.data.schema.GroundTruth.answer_frame`,
:func:`verl_grto.data.frame.answer_grid`): pixels of its processor-resized image ``(H', W')`` for a
``pixels`` row (Qwen2.5-VL), a 1000 x 1000 grid relative to the image for a ``norm1000`` row (Qwen3-VL).
The tool, the ground truth and every reward live in the original frame ``(H, W)``.
:func:`parse_policy_answer` is the one place that crosses: it parses with the parser's rules on the
grid (so "outside the image" means outside what the policy was shown, or outside 0-1000) and scales
every coordinate by ``(W / W_grid, H / H_grid)``. Every reader of a policy answer calls it (training
rewards, BTO's buffer, validation, ``evaluate`` and ``predict``), so they cannot disagree about the frame.

Coordinates are continuous (``x2`` / ``y2`` exclusive), so the map is a pure scale: a box covering the
grid, ``[0, 0, W_grid, H_grid]``, maps to ``[0, 0, W, H]``. When the grid is the image's own size (the
tiny Qwen2.5-VL recipes' 112 px scenes) the parsed answer is returned unchanged, bit for bit.

Which convention a row is read in is the row's (``answer_coords``), never guessed from the answer: a
reader that knows the policy's convention (a recipe's ``data.answer_coords``, passed to the box reward
as ``reward_kwargs.answer_coords``) passes it, and a row of the other convention is an error, not a
score: a box in one family's coordinates read in the other's would select the wrong region.
"""

from __future__ import annotations

from collections.abc import Sequence

from verl_grto.data.frame import FrameMismatchError, require_coords
from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt, parse_answer

__all__ = ["FrameMismatchError", "parse_in_frame", "parse_policy_answer", "scale_prompt", "to_image_frame"]


def scale_prompt(prompt: ToolPrompt, sx: float, sy: float) -> ToolPrompt:
    """One object's prompt with x scaled by ``sx`` and y by ``sy`` (labels unchanged)."""
    box = None
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    points = tuple((x * sx, y * sy) for x, y in prompt.points)
    return ToolPrompt(box, points, prompt.labels)


def to_image_frame(parsed: ParsedAnswer, answer_size: Sequence[int], image_size: Sequence[int]) -> ParsedAnswer:
    """``parsed`` (read on the grid ``answer_size`` = (H_grid, W_grid)) with its coordinates in ``image_size`` = (H, W)."""
    (ah, aw), (h, w) = (int(v) for v in answer_size), (int(v) for v in image_size)
    if (ah, aw) == (h, w) or not parsed.ok:
        return parsed
    sx, sy = w / aw, h / ah
    return ParsedAnswer(tuple(scale_prompt(p, sx, sy) for p in parsed.objects), parsed.has_think, parsed.reason)


def parse_in_frame(text: str, answer_size: Sequence[int], image_size: Sequence[int]) -> ParsedAnswer:
    """Parse ``text`` on the grid ``answer_size`` = (H_grid, W_grid) and return it in ``image_size`` = (H, W)."""
    return to_image_frame(parse_answer(text, (int(answer_size[0]), int(answer_size[1]))), answer_size, image_size)


def parse_policy_answer(text: str, gt: GroundTruth, coords: str | None = None) -> ParsedAnswer:
    """Parse a policy answer on the row's answer grid and return it in the row's image frame.

    ``coords``: the policy's convention when the caller knows it; a row asking for the other one raises
    :class:`FrameMismatchError` (never a score). A malformed answer never raises.
    """
    if coords is not None:
        require_coords(gt.answer_coords, coords)
    return parse_in_frame(text, gt.answer_frame, gt.image_size)
