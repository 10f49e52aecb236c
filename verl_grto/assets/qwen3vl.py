"""A tiny, randomly initialised Qwen3-VL written to disk like a hub checkpoint (offline, deterministic).

Why: a Qwen3-VL policy differs from a Qwen2.5-VL one on every path that reads an image or an answer
(docs/method.md, "Image frames"): its processor resizes in 32-pixel steps (patch 16 x merge 2, where
Qwen2.5-VL uses 14 x 2) and it grounds on a relative 0-1000 grid (``norm1000``) instead of pixels of the
resized image. This model makes those paths run on a CPU through the same classes and loaders as
``Qwen/Qwen3-VL-8B-Instruct`` (``AutoModelForImageTextToText`` / ``AutoProcessor`` -> ``Qwen3VLProcessor``
with a ``Qwen2VLImageProcessor`` and a ``Qwen3VLVideoProcessor``; verl's Qwen3-VL monkey patches and its
4-row position ids).

Sizes (about 0.3M parameters): text hidden 64, MLP 128, 2 layers, 4 query / 2 KV heads of 16
dimensions, mrope sections [2, 3, 3] (they must sum to head_dim / 2); vision depth 2, width 32, 2 heads,
**patch 16** and 2x2 merge like the real model (so the resize factor is the real 32), 64 learned
position embeddings (a perfect square), deepstack from block 0 (indexes must be below the depth).
The tokenizer is the project's (:func:`verl_grto.assets.tokenizer.train_tokenizer`): Qwen's special
tokens and chat template. A 112 x 112 synthetic scene is shown at 128 x 128 (a multiple of 32; 16
image tokens), which is why its rows are written in ``norm1000``: the answer does not depend on the
resized size (:mod:`verl_grto.data.frame`).

``moe=True`` builds the same with a mixture-of-experts text model (``Qwen3VLMoeForConditionalGeneration``,
4 experts of which 2 are active per token): the stand-in for Qwen3-VL-30B-A3B where a test needs a
checkpoint of that family (the Megatron recipe's configs, tests/test_megatron_recipe.py).

Nothing here is trained: the tiny Qwen3-VL exists to run the Qwen3-VL paths (frames, verl's actor and
rollout, the tool) end to end, not to localise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from verl_grto.assets.qwen25vl import qwen_vl_processor, tiny_generation_config, vision_token_ids
from verl_grto.assets.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

#: Qwen3-VL's own vision patch and merge: the resize factor is 32, as in the full-size model.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: 4 to 64 merged patches: a 112 px scene (shown at 128 x 128) keeps 16 tokens; a larger image at most 64.
MIN_PIXELS = 4 * (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 64 * (PATCH_SIZE * MERGE_SIZE) ** 2
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
HEAD_DIM = 16


def tiny_qwen3vl_config(tokenizer: PreTrainedTokenizerFast, moe: bool = False) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """The tiny model's config; every token id is read from ``tokenizer`` so the two always agree.

    ``moe``: a mixture-of-experts text model (4 experts of 32, 2 active), Qwen3-VL-30B-A3B's family."""
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # mrope sections (temporal, height, width) sum to head_dim / 2
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids(PAD_TOKEN),
        "eos_token_id": ids(EOS_TOKEN),
        "pad_token_id": ids(PAD_TOKEN),
        "tie_word_embeddings": False,
    }
    if moe:
        text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": TEXT_HIDDEN,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config_cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_cls(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **vision_token_ids(tokenizer)
    )


def tiny_qwen3vl_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    """Qwen3-VL's processor around ``tokenizer``: patch 16, merge 2, the tiny pixel budget.

    ``Qwen3VLProcessor`` needs a real video processor (``None`` raises), so one is built with the
    same patching though no row of this project holds a video.
    """
    return qwen_vl_processor(
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        tokenizer,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
    )


def build_tiny_qwen3vl(out_dir: Path, seed: int = 0, moe: bool = False) -> Path:
    """Write model (safetensors), config, generation config, tokenizer and processor into ``out_dir``.

    Two builds with the same seed write byte-identical weights. Returns ``out_dir``. ``moe``: see
    :func:`tiny_qwen3vl_config`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    model_cls: type[PreTrainedModel] = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    model = model_cls(tiny_qwen3vl_config(tokenizer, moe)).to(torch.float32).eval()
    model.generation_config = tiny_generation_config(tokenizer)
    model.save_pretrained(out_dir)
    tiny_qwen3vl_processor(tokenizer).save_pretrained(out_dir)
    return out_dir
