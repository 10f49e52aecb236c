"""Prompts built outside verl equal the ones verl builds: same messages, same rendered text and token ids."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from verl_grto.data.chat import chat_messages, encode_prompt
from verl_grto.data.schema import build_instruction
from verl_grto.data.synthetic import png_bytes


def _verl_messages(instruction: str, png: bytes) -> list[dict]:
    """verl's own ``RLHFDataset._build_messages`` on a row like ours (called unbound: it only reads these fields)."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    fake_self = SimpleNamespace(image_key="images", video_key="videos", audio_key="audios", processor=object())
    row = {"prompt": [{"role": "user", "content": instruction}], "images": [{"bytes": png}]}
    return RLHFDataset._build_messages(fake_self, copy.deepcopy(row), key="prompt")


def test_messages_match_verls_dataset() -> None:
    instruction = build_instruction("the red circle", 112, 112)
    png = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    theirs = _verl_messages(instruction, png)
    for part in theirs[0]["content"]:  # verl attaches the decoded image; the template only reads the part's type
        part.pop("image", None)
        part.pop("bytes", None)
    assert chat_messages(instruction) == theirs


def test_messages_split_every_placeholder_and_drop_empty_text() -> None:
    assert chat_messages("A <image> B<image>") == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A "},
                {"type": "image"},
                {"type": "text", "text": " B"},
                {"type": "image"},
            ],
        }
    ]


def test_encode_prompt_expands_the_image_and_marks_its_tokens(tiny_assets) -> None:
    processor = AutoProcessor.from_pretrained(tiny_assets.policy)
    image = Image.open(io.BytesIO(png_bytes(np.full((112, 112, 3), 90, dtype=np.uint8))))
    out = encode_prompt(processor, build_instruction("the red circle", 112, 112), [image])
    ids = out["input_ids"][0]
    image_tokens = ids == processor.image_token_id
    assert int(image_tokens.sum()) == 16
    assert out["mm_token_type_ids"][0].tolist() == image_tokens.int().tolist()
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert 'Find the object described by: "the red circle"' in text
