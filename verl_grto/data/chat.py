"""A row's instruction as the chat prompt verl builds from it, for code that runs the policy outside verl.

Why: supervised warm starts and offline evaluations must feed the policy exactly the token ids it sees
during RL, or they train and measure a different input distribution. verl's ``RLHFDataset`` splits the
user message at its ``<image>`` placeholders into ``{"type": "image"}`` / ``{"type": "text"}`` parts
(empty segments dropped), the agent loop renders them with the processor's chat template
(``add_generation_prompt=True``) and runs the processor on that text and the images, which expands each
image pad to one token per merged patch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from verl_grto.data.schema import IMAGE_PLACEHOLDER

_SPLIT_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """One user message whose ``<image>`` placeholders are image parts, as ``RLHFDataset._build_messages`` makes it."""
    parts = [seg for seg in _SPLIT_RE.split(instruction) if seg != ""]
    content = [{"type": "image"} if seg == IMAGE_PLACEHOLDER else {"type": "text", "text": seg} for seg in parts]
    return [{"role": "user", "content": content}]


def encode_prompt(processor: Any, instruction: str, images: Sequence[Image.Image]) -> dict[str, Any]:
    """The processor's output (``input_ids``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``...)
    for one prompt, batch dimension 1: ``input_ids[0]`` are the prompt ids verl's agent loop sends to the rollout."""
    text = processor.apply_chat_template(chat_messages(instruction), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=list(images), return_tensors="pt")
