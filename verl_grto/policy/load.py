"""Load a policy checkpoint (a Hugging Face directory, optionally with a LoRA adapter) outside verl's actor.

Why a module of its own: the ``hf`` rollout server and offline evaluation must load the same model
the same way (fp32 by default, SDPA attention, eval mode); two copies would drift.

A LoRA run's policy is its base model plus an adapter (a PEFT folder: ``adapter_config.json`` and
``adapter_model.safetensors``). :func:`load_policy` applies the adapter with PEFT and merges it into
the base weights in memory, so generation runs at the base model's speed and the result is a plain
transformers model, as a merged checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def apply_adapter(model: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """``model`` with the PEFT adapter at ``adapter`` merged into its weights (in the model's dtype).

    Raises ValueError naming the folder when it is not an adapter, or when none of its tensors fit
    the model (a LoRA of another architecture would otherwise load as a silent no-op).
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights

    if not is_adapter_dir(adapter):
        raise ValueError(f"{adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    tensors = load_peft_weights(str(adapter), device="cpu")
    dtype = next(model.parameters()).dtype
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, torch_dtype=dtype)
    loaded = {name for name, _ in peft_model.named_parameters() if "lora_" in name}
    if not any(_peft_param_name(key) in loaded for key in tensors):
        raise ValueError(f"{adapter}: none of its {len(tensors)} adapter tensors names a module of the model")
    return peft_model.merge_and_unload()


def _peft_param_name(key: str) -> str:
    """A saved adapter key (``...q_proj.lora_A.weight``) as the loaded parameter's name (``...lora_A.default.weight``)."""
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        key = key.replace(f".{part}.", f".{part}.default.")
    return key


def load_policy(
    path: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    adapter: str | Path | None = None,
) -> tuple[torch.nn.Module, Any, Any]:
    """Model (eval mode), tokenizer and, for vision-language models, processor (else None) from ``path``.

    ``adapter``: a PEFT (LoRA) folder trained on top of ``path``, merged into the weights
    (:func:`apply_adapter`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_vlm = hasattr(config, "vision_config")
    auto_cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto_cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) if is_vlm else None
    return model, tokenizer, processor
