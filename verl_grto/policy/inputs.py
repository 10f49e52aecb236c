"""The policy's inputs exactly as verl builds them for a rollout: chat messages, prompt ids, model tensors.

Why one module for all three: evaluation must show the policy what training showed it, and any drift
(another resize, the tokenizer's chat template instead of the processor's, missing token types)
silently changes what the policy sees. The steps, in verl's order:

1. :func:`build_messages` -- verl's ``RLHFDataset._build_messages``: every ``<image>`` placeholder of
   a message becomes an image content part (the row's images in order, with the resize limits their
   entries name, ``min_pixels`` / ``max_pixels``: :mod:`verl_grto.data.frame`), the text around it text parts;
2. :func:`render_prompt` -- the agent loop: images resized by ``qwen_vl_utils.process_vision_info``
   (with the processor's patch size), the processor's chat template rendered with
   ``add_generation_prompt=True``, text + images tokenised by the processor (one pad token per merged
   patch);
3. :func:`model_inputs` -- the ``hf`` rollout server: pixel tensors rebuilt from the same images, and
   ``mm_token_type_ids`` (text 0 / image 1 / video 2), without which transformers silently falls back
   from Qwen2.5-VL's 3-D mrope positions to 1-D ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from verl_grto.data.frame import resize_keys
from verl_grto.data.images import row_images
from verl_grto.data.schema import IMAGE_PLACEHOLDER

_PLACEHOLDERS = re.compile("(<image>|<video>|<audio>)")


def build_messages(
    prompt: Sequence[dict[str, Any]],
    images: Sequence[Image.Image],
    image_keys: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Chat messages with each ``<image>`` placeholder replaced by an image content part, as verl's dataset does.

    ``image_keys[i]`` are extra keys of image ``i``'s content part: verl copies a row's image entry into
    it, and ``qwen_vl_utils`` resizes by the ``min_pixels`` / ``max_pixels`` found there.

    Messages are copied (the row is not modified). As in verl, nothing is split when there are no
    images. Video and audio placeholders are refused: this project's rows have none.
    """
    messages = [dict(m) for m in prompt]
    if not images:
        return messages
    offset = 0
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            continue
        parts: list[dict[str, Any]] = []
        for segment in (s for s in _PLACEHOLDERS.split(content) if s):
            if segment == IMAGE_PLACEHOLDER:
                if offset >= len(images):
                    raise ValueError(
                        f"the prompt has more {IMAGE_PLACEHOLDER} placeholders than its {len(images)} image(s)"
                    )
                keys = image_keys[offset] if image_keys is not None else {}
                parts.append({"type": "image", "image": images[offset], **keys})
                offset += 1
            elif _PLACEHOLDERS.fullmatch(segment):
                raise ValueError(f"{segment} placeholders are not supported")
            else:
                parts.append({"type": "text", "text": segment})
        message["content"] = parts
    return messages


def render_prompt(messages: list[dict[str, Any]], processor: Any) -> tuple[list[int], list[Image.Image]]:
    """Prompt token ids and the (resized) images the policy sees, as verl's agent loop renders them."""
    from qwen_vl_utils import process_vision_info

    patch_size = getattr(getattr(processor, "image_processor", None), "patch_size", 14)
    has_image = any(
        isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"]) for m in messages
    )
    images = process_vision_info(messages, image_patch_size=patch_size)[0] if has_image else None
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    return ids, list(images or [])


def render_row(row: dict[str, Any], processor: Any) -> tuple[list[int], list[Image.Image]]:
    """A verl parquet row's prompt ids and the images as the policy sees them, rendered as verl's
    agent loop renders them (:func:`build_messages` of its prompt and images, then :func:`render_prompt`)."""
    keys = [resize_keys(entry) for entry in row.get("images") or []]
    return render_prompt(build_messages(row["prompt"], row_images(row), keys), processor)


def model_inputs(
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any]] | None,
    processor: Any,
    *,
    image_token_id: int | None,
    video_token_id: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Tensors for ``model.generate`` / ``model(...)`` from prompt ids and each prompt's images.

    Prompts of different lengths are left-padded (generation appends on the right; the attention
    mask hides the padding, and Qwen2.5-VL's rope index reads it). Raises ValueError when a prompt's
    image pad tokens do not match what its images need (the prompt was built with another processor
    configuration) or images are given to a text-only model (``processor`` None).
    """
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    flat = [image for per_prompt in images or [] for image in per_prompt]
    if flat:
        if processor is None:
            raise ValueError("image_data was sent to a text-only model")
        vision = processor.image_processor(images=flat, return_tensors="pt")
        inputs["pixel_values"] = vision["pixel_values"]
        inputs["image_grid_thw"] = vision["image_grid_thw"]
        tokens_per_image = vision["image_grid_thw"].prod(-1) // (processor.image_processor.merge_size**2)
        start = 0
        for row, per_prompt in enumerate(images or []):
            n_expected = int(tokens_per_image[start : start + len(per_prompt)].sum())
            start += len(per_prompt)
            n_pad = int(((input_ids[row] == image_token_id) & (attention_mask[row] == 1)).sum())
            if n_pad != n_expected:
                raise ValueError(
                    f"prompt holds {n_pad} image tokens but its {len(per_prompt)} image(s) need {n_expected}; "
                    "the prompt was built with another processor configuration"
                )
    if image_token_id is not None:
        # text 0 / image 1 / video 2: switches Qwen2.5-VL generate to 3-D mrope positions
        mm_types = torch.zeros_like(input_ids, dtype=torch.int)
        mm_types[(input_ids == image_token_id) & (attention_mask == 1)] = 1
        if video_token_id is not None:
            mm_types[(input_ids == video_token_id) & (attention_mask == 1)] = 2
        inputs["mm_token_type_ids"] = mm_types
    return inputs
