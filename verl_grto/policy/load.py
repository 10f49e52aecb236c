"""Load a policy checkpoint (a Hugging Face directory) for generation outside verl's actor.

Why a module of its own: the ``hf`` rollout server and offline evaluation must load the same model
the same way (fp32 by default, SDPA attention, eval mode); two copies would drift.
"""

from __future__ import annotations

from typing import Any

import torch


def load_policy(
    path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any, Any]:
    """Model (eval mode), tokenizer and, for vision-language models, processor (else None) from ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_vlm = hasattr(config, "vision_config")
    auto_cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto_cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) if is_vlm else None
    return model, tokenizer, processor
