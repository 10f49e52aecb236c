"""A tiny, randomly initialised Qwen2.5-VL written to disk like a hub checkpoint (offline, deterministic).

Why: every stage (supervised warm start, GRPO/GRTO through verl, evaluation) must run end to end on a
CPU in minutes, through the same classes and loading paths as the real ``Qwen2.5-VL`` checkpoints
(``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``AutoTokenizer``, verl's ``hf_processor``).

Sizes (about 0.8M parameters): text hidden 128, MLP 256, 2 layers, 4 query / 2 KV heads (head_dim 32);
vision depth 2, width 64, 2 heads, patch 7, 2x2 merge, temporal patch 2, full attention in block 1.
Rope: theta 10 with mrope sections [2, 7, 7] (temporal, height, width). With Qwen's default theta of 1e6
the height/width sections of such a small head get very low frequencies; the learnability probe saw box
IoU 0.60 instead of 0.52 after 180 s with these settings.

Patch 7 instead of Qwen's 14: a 112x112 scene becomes 16x16 patches -> 64 image tokens (8x8 after the
2x2 merge) instead of 16. Qwen2.5-VL has no absolute position embedding, so the policy must read where
the object is from 3-D rope and the causal order of the image tokens alone; with 16 tokens the warm
start localised in some seeds and not others, with 64 it localised in 5 of 5 seeds within 1250 steps
(benchmarks/warmstart_sweep.py, benchmarks/results/warmstart_sweep_gpu.json; 2 text layers, 4 text
layers or hidden 256 at patch 14 had not started by step 750). The processor keeps 112x112 images as
they are (a multiple of patch 7 x merge 2 = 14 and inside ``[MIN_PIXELS, MAX_PIXELS]``); larger images
are scaled down to at most :data:`MAX_PIXELS` (224x224, 256 tokens) to keep the tiny model cheap.

The generation config suppresses the vision special tokens: a sampled ``<|image_pad|>`` or
``<|vision_start|>`` makes the next forward pass look for image features that do not exist and crash.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BaseVideoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from verl_grto.assets.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, VISION_TOKENS, train_tokenizer

PATCH_SIZE = 7
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
TEXT_HIDDEN = 128
ROPE_THETA = 10.0
TEXT_LAYERS = 2


def tiny_qwen25vl_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int = TEXT_HIDDEN,
    layers: int = TEXT_LAYERS,
    patch_size: int = PATCH_SIZE,
) -> Qwen2_5_VLConfig:
    """The tiny model's config; every token id is read from ``tokenizer`` so the two always agree.

    ``hidden`` / ``layers`` size the language model (heads of 32 dimensions, 2 KV heads); ``patch_size``
    the vision patches (the processor must use the same, :func:`tiny_processor`)."""
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": [2, 7, 7]},
        "bos_token_id": ids(PAD_TOKEN),
        "eos_token_id": ids(EOS_TOKEN),
        "pad_token_id": ids(PAD_TOKEN),
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": patch_size,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "window_size": 112,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **vision_token_ids(tokenizer)
    )


def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The vision token ids a Qwen-VL config names, read from ``tokenizer`` (the processor reads the same)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def tiny_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """eos/pad like Qwen (stop at ``<|im_end|>`` or ``<|endoftext|>``) and the vision tokens suppressed."""
    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        bos_token_id=ids(PAD_TOKEN),
        eos_token_id=[ids(EOS_TOKEN), ids(PAD_TOKEN)],
        pad_token_id=ids(PAD_TOKEN),
        suppress_tokens=[ids(t) for t in VISION_TOKENS],
    )


def qwen_vl_processor(
    processor_cls: type[ProcessorMixin],
    video_processor_cls: type[BaseVideoProcessor],
    tokenizer: PreTrainedTokenizerFast,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int,
) -> ProcessorMixin:
    """A Qwen-VL processor (``processor_cls``: Qwen2.5-VL's or Qwen3-VL's) around ``tokenizer`` and the
    project's chat template: Qwen2-VL's image processor and ``video_processor_cls`` with one patching
    (``patch_size``, merge 2, temporal patch 2) and pixel budget ``[min_pixels, max_pixels]``."""
    common = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": patch_size,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=video_processor_cls(**common),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_processor(tokenizer: PreTrainedTokenizerFast, patch_size: int = PATCH_SIZE) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor around ``tokenizer`` with the tiny model's pixel budget."""
    return qwen_vl_processor(
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
        tokenizer,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=patch_size,
    )


def build_tiny_qwen25vl(
    out_dir: Path,
    seed: int = 0,
    hidden: int = TEXT_HIDDEN,
    layers: int = TEXT_LAYERS,
    patch_size: int = PATCH_SIZE,
) -> Path:
    """Write model (safetensors), config, generation config, tokenizer and processor into ``out_dir``.

    Two builds with the same seed write byte-identical weights. Returns ``out_dir``. The size arguments
    are those of :func:`tiny_qwen25vl_config` (benchmarks/warmstart_sweep.py compares variants).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = tiny_qwen25vl_config(tokenizer, hidden=hidden, layers=layers, patch_size=patch_size)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = tiny_generation_config(tokenizer)
    model.save_pretrained(out_dir)
    # the processor also writes the tokenizer and its chat template
    tiny_processor(tokenizer, patch_size=patch_size).save_pretrained(out_dir)
    return out_dir
