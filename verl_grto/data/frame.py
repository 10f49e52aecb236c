"""The frame the policy answers in: the image its processor shows it, and the coordinates it grounds in.

A Qwen-VL processor resizes every image to ``smart_resize(H, W)``: both sides multiples of ``factor``
(patch size x merge size: 28 for Qwen2.5-VL, **32 for Qwen3-VL**, patch 16 x merge 2), the area within
``[min_pixels, max_pixels]``, the aspect ratio kept as closely as that allows. The factor is read off
the policy's processor (:func:`processor_factor`), never assumed. What an answer's numbers mean is the
policy family's **coordinate convention** (:data:`COORDINATE_CONVENTIONS`):

* ``pixels`` (Qwen2.5-VL, and the tiny Qwen2.5-VL): absolute pixels of the resized image ``(H', W')``;
* ``norm1000`` (Qwen3-VL, Qwen3.5): a relative grid, ``x_grid = x / width * 1000`` on each axis, so an
  answer does not depend on the resized size.

The project's rules (docs/method.md, "Image frames"):

* a row keeps the original image; its ground truth (mask, boxes, ``image_size``) stays at the original
  resolution, and the tool segments the original image;
* a converted row names its frame: the ground truth holds the convention (``answer_coords``), the
  resized size (``answer_size``) and the factor it was resized with (``resize_factor``); the image entry
  names the resize limits (``images[0]["min_pixels"]`` / ``["max_pixels"]``, which verl's
  ``qwen_vl_utils.fetch_image`` applies, so verl resizes exactly so); the instruction says which
  coordinates are asked (:func:`verl_grto.data.schema.build_instruction`);
* the answer is parsed in the **answer grid** (:func:`answer_grid`: ``(H', W')`` for ``pixels``,
  ``(1000, 1000)`` for ``norm1000``; the parser's bounds are that grid) and scaled to the original frame
  (:mod:`verl_grto.reward.frame`) before the tool and the reward see it;
* a policy is never scored in the other family's frame: the recipe names its convention
  (``data.answer_coords``), and :class:`PolicyFrame` (the recipe's convention checked against the
  processor's family, the processor's factor and limits) is what the run-start data check compares every
  row with (:mod:`verl_grto.data.check`), and what the evaluation predictor reads a bare row in.

This module and :mod:`verl_grto.reward.frame` are the only places that know which family grounds how.
The size is computed by transformers' own ``smart_resize`` (the Qwen2-VL image processor's, which
Qwen3-VL's processor uses too), not a copy, so it cannot drift from what the processor does. An image
whose size is already a fixed point of the resize (the tiny Qwen2.5-VL's 112 px scenes) has answer
frame == image frame in ``pixels``, and the mapping is the identity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The coordinate conventions: absolute pixels of the resized image, or a relative 0-1000 grid.
PIXELS, NORM1000 = "pixels", "norm1000"
COORDINATE_CONVENTIONS = (PIXELS, NORM1000)
#: The extent of the ``norm1000`` grid on each axis (Qwen3-VL's grounding: ``x / width * 1000``).
NORM1000_RANGE = 1000
#: Qwen2.5-VL's resize granularity: patch size 14 x spatial merge 2.
QWEN25VL_FACTOR = 28
#: Qwen3-VL's (and Qwen3.5's): patch size 16 x spatial merge 2.
QWEN3VL_FACTOR = 32
#: The full-size family of each convention, by its factor: the converters' default factor
#: (``verl-grto data convert ... --opt coords=norm1000`` converts for Qwen3-VL).
FAMILY_FACTORS = {PIXELS: QWEN25VL_FACTOR, NORM1000: QWEN3VL_FACTOR}
#: The processor class of each policy family and the convention that family grounds in. transformers
#: builds Qwen3.5's processor as ``Qwen3VLProcessor`` too (``AutoProcessor`` for ``qwen3_5``).
PROCESSOR_COORDS = {"Qwen2VLProcessor": PIXELS, "Qwen2_5_VLProcessor": PIXELS, "Qwen3VLProcessor": NORM1000}
#: The full-size recipes' limits in merged patches (``data.mm_processor_kwargs``) and the converters'
#: defaults: 256 to 1280 merged patches, i.e. at most 1280 vision tokens, which fits the recipes' 2048-token
#: prompts (~1 MP for Qwen2.5-VL's 28-px patches, ~1.3 MP for Qwen3-VL's 32-px ones).
DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS = 256, 1280
DEFAULT_MIN_PIXELS = DEFAULT_MIN_TOKENS * QWEN25VL_FACTOR * QWEN25VL_FACTOR
DEFAULT_MAX_PIXELS = DEFAULT_MAX_TOKENS * QWEN25VL_FACTOR * QWEN25VL_FACTOR
#: ``qwen_vl_utils.fetch_image``'s limits when an image names none: 4 to 16384 merged patches.
_QWEN_VL_UTILS_MIN_TOKENS, _QWEN_VL_UTILS_MAX_TOKENS = 4, 16384
#: The image-entry keys verl's ``fetch_image`` reads (and nothing else of this project sets).
RESIZE_KEYS = ("min_pixels", "max_pixels")


def check_coords(coords: Any, where: str = "coordinate convention") -> str:
    """``coords`` if it is one of :data:`COORDINATE_CONVENTIONS`, else ValueError naming ``where``."""
    if coords not in COORDINATE_CONVENTIONS:
        raise ValueError(f"{where} must be one of {', '.join(COORDINATE_CONVENTIONS)}, got {coords!r}")
    return str(coords)


class FrameMismatchError(ValueError):
    """A row asks for one coordinate convention and the policy answers in the other (a data or recipe bug)."""


def coords_mismatch(row_coords: str, policy_coords: str) -> str | None:
    """Why a row of ``row_coords`` cannot be scored for a policy answering in ``policy_coords`` (None: it can)."""
    if row_coords == policy_coords:
        return None
    return (
        f"the row asks for {row_coords} coordinates but the policy answers in {policy_coords}: "
        f"convert the data with coords={policy_coords} (docs/method.md, 'Image frames')"
    )


def require_coords(row_coords: str, policy_coords: str) -> None:
    """Raise :class:`FrameMismatchError` when a row's convention is not the policy's."""
    problem = coords_mismatch(row_coords, policy_coords)
    if problem is not None:
        raise FrameMismatchError(problem)


def answer_grid(coords: str, shown_hw: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of the grid a policy's answer is read in: the parser's bounds, the mapping's source frame.

    ``shown_hw`` is the size the policy is shown (``(H', W')``, a row's ``answer_size``). ``pixels``:
    that size; ``norm1000``: ``(1000, 1000)`` whatever the image (the answer is relative to it).
    """
    if check_coords(coords) == NORM1000:
        return (NORM1000_RANGE, NORM1000_RANGE)
    return (int(shown_hw[0]), int(shown_hw[1]))


@dataclass(frozen=True)
class ResizeLimits:
    """A Qwen-VL processor's resize rule: sides multiples of ``factor``, area within ``[min_pixels, max_pixels]``."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    factor: int = QWEN25VL_FACTOR

    def __post_init__(self) -> None:
        if self.factor < 1 or not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need factor >= 1 and 0 < min_pixels <= max_pixels, got {self}")

    def size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')``: the size the processor gives an ``height x width`` image (transformers' ``smart_resize``)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(
            int(height), int(width), factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return int(h), int(w)

    def is_fixed_point(self, height: int, width: int) -> bool:
        """Whether an image of this size is shown to the policy unchanged."""
        return self.size(height, width) == (int(height), int(width))

    def image_keys(self) -> dict[str, int]:
        """The keys a row's image entry carries so that verl resizes it by these limits."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


def default_limits(factor: int = QWEN25VL_FACTOR) -> ResizeLimits:
    """The full-size recipes' limits (:data:`DEFAULT_MIN_TOKENS` to :data:`DEFAULT_MAX_TOKENS` merged patches) for ``factor``."""
    return ResizeLimits(DEFAULT_MIN_TOKENS * factor**2, DEFAULT_MAX_TOKENS * factor**2, factor)


def qwen_vl_utils_defaults(factor: int = QWEN25VL_FACTOR) -> ResizeLimits:
    """The limits verl applies (through ``qwen_vl_utils``) to an image entry that names none."""
    return ResizeLimits(_QWEN_VL_UTILS_MIN_TOKENS * factor**2, _QWEN_VL_UTILS_MAX_TOKENS * factor**2, factor)


def limits_from_kwargs(kwargs: Any, factor: int = QWEN25VL_FACTOR) -> ResizeLimits | None:
    """A recipe's ``data.mm_processor_kwargs`` as limits (None when it does not set both)."""
    kwargs = kwargs or {}
    low, high = kwargs.get("min_pixels"), kwargs.get("max_pixels")
    return None if low is None or high is None else ResizeLimits(int(low), int(high), factor)


def processor_factor(processor: Any) -> int:
    """Patch size x merge size of a Qwen-VL processor: 28 for Qwen2.5-VL, 32 for Qwen3-VL, 14 for the tiny Qwen2.5-VL.

    verl resizes with the same patch size (its agent loop passes ``image_processor.patch_size`` to
    ``qwen_vl_utils``, whose merge size is 2).
    """
    image_processor = getattr(processor, "image_processor", processor)
    return int(getattr(image_processor, "patch_size", 14)) * int(getattr(image_processor, "merge_size", 2))


def processor_coords(processor: Any) -> str | None:
    """The convention the processor's policy family grounds in (:data:`PROCESSOR_COORDS`); None if unknown."""
    return PROCESSOR_COORDS.get(type(processor).__name__)


def entry_limits(entry: Any, factor: int = QWEN25VL_FACTOR) -> ResizeLimits:
    """The limits verl resizes one row image entry (``{"bytes": ..., "min_pixels": ...}``) by."""
    default = qwen_vl_utils_defaults(factor)
    keys = entry if isinstance(entry, dict) else {}
    low, high = keys.get("min_pixels"), keys.get("max_pixels")
    return ResizeLimits(
        int(low) if low is not None else default.min_pixels,
        int(high) if high is not None else default.max_pixels,
        factor,
    )


def resize_keys(entry: Any) -> dict[str, int]:
    """The resize keys an image entry names (empty for a bare entry or a row written before them)."""
    if not isinstance(entry, dict):
        return {}
    return {k: int(entry[k]) for k in RESIZE_KEYS if entry.get(k) is not None}


@dataclass(frozen=True)
class PolicyFrame:
    """How a policy reads images and writes coordinates: its convention, its processor's factor and limits.

    Built from the policy's processor (:meth:`from_processor`) or from a recipe and that processor
    (:meth:`from_recipe`), so the factor is always the processor's. ``limits`` are the processor's own
    resize limits when the recipe sets them (``data.mm_processor_kwargs``); a row's resized frame must be
    a fixed point of them, or the policy would see yet another size.
    """

    coords: str = PIXELS
    factor: int = QWEN25VL_FACTOR
    limits: ResizeLimits | None = None

    def __post_init__(self) -> None:
        check_coords(self.coords)
        if self.factor < 1:
            raise ValueError(f"a resize factor must be >= 1, got {self.factor}")
        if self.limits is not None and self.limits.factor != self.factor:
            raise ValueError(f"the limits' factor {self.limits.factor} is not the policy's {self.factor}")

    @classmethod
    def from_processor(cls, processor: Any, coords: str | None = None, mm_processor_kwargs: Any = None) -> PolicyFrame:
        """The frame of the policy behind ``processor``; ``coords`` (a recipe's) must be its family's.

        Raises ValueError when the recipe names the other family's convention (a Qwen3-VL policy would
        otherwise be scored in pixels, or a Qwen2.5-VL one on the 0-1000 grid). A processor of a family
        this module does not know takes the named convention as given (``pixels`` when none is named).
        """
        family = processor_coords(processor)
        if coords is not None:
            check_coords(coords, "data.answer_coords")
        if coords is not None and family is not None and coords != family:
            raise ValueError(
                f"the recipe asks for {coords} coordinates (data.answer_coords) but the policy's processor "
                f"({type(processor).__name__}) belongs to a family that grounds in {family}: set "
                f"data.answer_coords={family} and convert the data with coords={family}"
            )
        factor = processor_factor(processor)
        return cls(coords or family or PIXELS, factor, limits_from_kwargs(mm_processor_kwargs, factor))

    @classmethod
    def from_recipe(cls, data_config: Any, processor: Any) -> PolicyFrame:
        """The frame a recipe's policy answers in: ``data.answer_coords`` (default ``pixels``) checked
        against ``processor`` (the trainer's, from ``actor_rollout_ref.model.path``), with the processor's
        factor and the recipe's ``data.mm_processor_kwargs``. ``processor`` None (a text-only model):
        the convention and Qwen2.5-VL's factor."""
        coords = data_config.get("answer_coords") or PIXELS
        kwargs = data_config.get("mm_processor_kwargs")
        if processor is None:
            return cls(check_coords(coords, "data.answer_coords"), QWEN25VL_FACTOR, limits_from_kwargs(kwargs))
        return cls.from_processor(processor, coords, kwargs)

    def cache_key(self) -> dict[str, Any]:
        """What a cached data-check result depends on (the run-start check reuses one only for the same frame)."""
        return {
            "coords": self.coords,
            "factor": self.factor,
            "limits": None if self.limits is None else self.limits.image_keys(),
        }


def row_answer_frame(row: dict[str, Any], image_hw: Sequence[int], policy: PolicyFrame) -> tuple[int, int]:
    """The answer grid ``(H, W)`` a policy answers a row's prompt in; ``image_hw`` is its first image's size.

    A row with a ground truth answers in its stated frame (what training reads; the data check makes sure
    it is what the policy is shown), which must be in the policy's convention (:class:`FrameMismatchError` otherwise). A
    row without one (``verl-grto predict``) in the policy's convention over the size verl resizes its
    first image to: the entry's resize keys, else ``qwen_vl_utils``' defaults, with the policy's factor.
    """
    from verl_grto.data.schema import GroundTruth

    raw = (row.get("reward_model") or {}).get("ground_truth")
    if raw is not None:
        gt = GroundTruth.from_json(json.loads(raw) if isinstance(raw, str) else raw)
        require_coords(gt.answer_coords, policy.coords)
        return gt.answer_frame
    entries = row.get("images") or [None]
    shown = entry_limits(entries[0], policy.factor).size(int(image_hw[0]), int(image_hw[1]))
    return answer_grid(policy.coords, shown)
