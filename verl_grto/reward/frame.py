"""Read a policy answer in the frame the policy saw, and map it to the original image's frame.

The policy answers in pixels of its processor-resized image, the row's *answer frame* ``(H', W')``
(:mod:`verl_grto.data.frame`); the tool, the ground truth and every reward live in the original
frame ``(H, W)``. :func:`parse_policy_answer` is the one place that crosses: it parses with the
parser's rules in the answer frame (so "outside the image" means outside what the policy was shown)
and scales every coordinate by ``(W / W', H / H')``. Every reader of a policy answer calls it
(training rewards, BTO's buffer, validation, ``evaluate`` and ``predict``), so they cannot disagree
about the frame.

Coordinates are continuous (``x2`` / ``y2`` exclusive), so the map is a pure scale: a box covering
the resized image, ``[0, 0, W', H']``, maps to ``[0, 0, W, H]``. When the two frames are equal (the
tiny recipes' 112 px scenes) the parsed answer is returned unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt, parse_answer


def scale_prompt(prompt: ToolPrompt, sx: float, sy: float) -> ToolPrompt:
    """One object's prompt with x scaled by ``sx`` and y by ``sy`` (labels unchanged)."""
    box = None
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    points = tuple((x * sx, y * sy) for x, y in prompt.points)
    return ToolPrompt(box, points, prompt.labels)


def to_image_frame(parsed: ParsedAnswer, answer_size: Sequence[int], image_size: Sequence[int]) -> ParsedAnswer:
    """``parsed`` (read in ``answer_size`` = (H', W')) with its coordinates in ``image_size`` = (H, W)."""
    (ah, aw), (h, w) = (int(v) for v in answer_size), (int(v) for v in image_size)
    if (ah, aw) == (h, w) or not parsed.ok:
        return parsed
    sx, sy = w / aw, h / ah
    return ParsedAnswer(tuple(scale_prompt(p, sx, sy) for p in parsed.objects), parsed.has_think, parsed.reason)


def parse_in_frame(text: str, answer_size: Sequence[int], image_size: Sequence[int]) -> ParsedAnswer:
    """Parse ``text`` in ``answer_size`` = (H', W') and return it in ``image_size`` = (H, W)."""
    return to_image_frame(parse_answer(text, (int(answer_size[0]), int(answer_size[1]))), answer_size, image_size)


def parse_policy_answer(text: str, gt: GroundTruth) -> ParsedAnswer:
    """Parse a policy answer in the row's answer frame and return it in the row's image frame."""
    return parse_in_frame(text, gt.answer_frame, gt.image_size)
