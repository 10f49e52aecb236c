"""The frame the policy answers in: its image as Qwen2.5-VL's processor resizes it.

Qwen2.5-VL's processor resizes every image to ``smart_resize(H, W)``: both sides multiples of
``factor`` (patch size x merge size, 28 for Qwen2.5-VL), the area within ``[min_pixels,
max_pixels]``, the aspect ratio kept as closely as that allows. A pretrained Qwen2.5-VL grounds in
absolute pixels of *that* image, not of the file. The project's convention (docs/method.md, "Image
frames"):

* a row keeps the original image; its ground truth (mask, boxes, ``image_size``) stays at the
  original resolution, and the tool segments the original image;
* the policy is shown the resized image and answers in its pixels, the **answer frame**
  ``(H', W') = smart_resize(H, W)``; a converted row records it (``GroundTruth.answer_size``, the
  ``WxH`` its instruction names) and names the resize limits on its image (``images[0]["min_pixels"]``,
  ``["max_pixels"]``, which verl's ``qwen_vl_utils.fetch_image`` applies, so verl resizes exactly so);
* every reader of an answer parses it in the answer frame and maps it to the original frame
  (:mod:`verl_grto.reward.frame`) before the tool and the reward see it.

The size is computed by transformers' own ``smart_resize`` (the Qwen2-VL image processor's), not a
copy, so it cannot drift from what the processor does. An image whose size is already a fixed point
of the resize (the tiny recipes' 112 px scenes) has answer frame == image frame, and the mapping is
the identity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Qwen2.5-VL's resize granularity: patch size 14 x spatial merge 2.
QWEN25VL_FACTOR = 28
#: The full-size recipes' limits (``data.mm_processor_kwargs`` in recipes/qwen25vl_7b_sam21_large_base.yaml)
#: and the converters' defaults: 256 to 1280 merged patches, i.e. at most ~1 MP and 1280 vision tokens,
#: which fits the recipes' 2048-token prompts.
DEFAULT_MIN_PIXELS = 256 * QWEN25VL_FACTOR * QWEN25VL_FACTOR
DEFAULT_MAX_PIXELS = 1280 * QWEN25VL_FACTOR * QWEN25VL_FACTOR
#: ``qwen_vl_utils.fetch_image``'s limits when an image names none: 4 to 16384 merged patches.
_QWEN_VL_UTILS_MIN_TOKENS, _QWEN_VL_UTILS_MAX_TOKENS = 4, 16384
#: The image-entry keys verl's ``fetch_image`` reads (and nothing else of this project sets).
RESIZE_KEYS = ("min_pixels", "max_pixels")


@dataclass(frozen=True)
class ResizeLimits:
    """Qwen2.5-VL's resize rule: sides multiples of ``factor``, area within ``[min_pixels, max_pixels]``."""

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


def qwen_vl_utils_defaults(factor: int = QWEN25VL_FACTOR) -> ResizeLimits:
    """The limits verl applies (through ``qwen_vl_utils``) to an image entry that names none."""
    return ResizeLimits(_QWEN_VL_UTILS_MIN_TOKENS * factor**2, _QWEN_VL_UTILS_MAX_TOKENS * factor**2, factor)


def limits_from_kwargs(kwargs: Any, factor: int = QWEN25VL_FACTOR) -> ResizeLimits | None:
    """A recipe's ``data.mm_processor_kwargs`` as limits (None when it does not set both)."""
    kwargs = kwargs or {}
    low, high = kwargs.get("min_pixels"), kwargs.get("max_pixels")
    return None if low is None or high is None else ResizeLimits(int(low), int(high), factor)


def processor_factor(processor: Any) -> int:
    """Patch size x merge size of a Qwen2-VL-style processor (28 for Qwen2.5-VL, 14 for the tiny policy)."""
    image_processor = getattr(processor, "image_processor", processor)
    return int(getattr(image_processor, "patch_size", 14)) * int(getattr(image_processor, "merge_size", 2))


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


def row_answer_frame(row: dict[str, Any], image_hw: Sequence[int], factor: int = QWEN25VL_FACTOR) -> tuple[int, int]:
    """``(H', W')`` the policy answers a row's prompt in; ``image_hw`` is its first image's size.

    A row with a ground truth answers in its ``answer_frame`` (what training reads; the data check makes
    sure it is the frame below). A row without one (``verl-grto predict``) in the size verl resizes its
    first image to: the entry's resize keys, else ``qwen_vl_utils``' defaults, with the policy's
    ``factor``.
    """
    from verl_grto.data.schema import GroundTruth

    raw = (row.get("reward_model") or {}).get("ground_truth")
    if raw is not None:
        return GroundTruth.from_json(json.loads(raw) if isinstance(raw, str) else raw).answer_frame
    entries = row.get("images") or [None]
    return entry_limits(entries[0], factor).size(int(image_hw[0]), int(image_hw[1]))
