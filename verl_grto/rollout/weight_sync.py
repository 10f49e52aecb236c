"""Weights from verl's actor into a served Hugging Face model: full tensors, merged LoRA, or a LoRA adapter.

verl's hybrid worker pushes the actor's weights to the rollout after every update
(``verl/workers/engine_workers.py:785-806``), in one of three forms:

- **full tensors** with Hugging Face names: a full fine-tune, or a LoRA actor with
  ``model.lora.merge=True`` (the adapter merged into the base weights, ``transformer_impl.py:1063``);
- **adapter tensors plus** ``peft_config``: a LoRA actor with ``model.lora.merge=False``
  (``fsdp_utils.py:715``: PEFT's ``get_peft_model_state_dict`` names, e.g.
  ``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight``); vLLM loads
  them as a LoRA request, this module wraps the served model with PEFT and loads them into it;
- **base tensors plus** ``peft_config`` with ``base_sync_done=False`` (only when the rollout started
  from dummy weights): the base model's tensors, LoRA-wrapped layers named ``...q_proj.base_layer.weight``.

Every tensor is copied into the served model's own dtype (fp32 on CPU, whatever verl sends), and a
tensor the model has no place for is an error: a silent partial sync would let the rollout sample
from a policy the actor is not training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

BASE_LAYER = ".base_layer"


class WeightSyncError(KeyError):
    """Synced tensors that do not fit the served model (unknown names, a changed adapter config)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT (the wrapped model itself gets a ``peft_config`` attribute too)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if is_peft_model(model) else model


def _lora_config(peft_config: Mapping[str, Any]) -> Any:
    """A PEFT config object from the dict verl sends (``PeftConfig.to_dict()``)."""
    from peft import LoraConfig

    fields = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(peft_config) - fields)
    if peft_config.get("peft_type") not in (None, "LORA") and str(peft_config.get("peft_type")) != "PeftType.LORA":
        raise WeightSyncError(f"hf rollout: only LoRA adapters are served, got peft_type {peft_config['peft_type']!r}")
    if unknown:
        raise WeightSyncError(f"hf rollout: peft_config keys this peft version does not know: {unknown}")
    return LoraConfig(**dict(peft_config))


def _comparable(peft_config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an adapter config that decide the adapter's shape and scaling."""
    keys = ("r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora", "bias")
    out = {}
    for key in keys:
        value = peft_config.get(key)
        out[key] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return out


def load_full(model: torch.nn.Module, named_tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy full tensors (Hugging Face names) into ``model``'s weights, in the model's dtype; returns the count.

    A LoRA-wrapped served model takes them into its base layers (``q_proj.weight`` ->
    ``q_proj.base_layer.weight``), and names that already say ``.base_layer`` fit an unwrapped model.
    """
    target = base_model(model)
    params = dict(target.named_parameters())
    params.update(dict(target.named_buffers()))

    def resolve(name: str) -> str | None:
        if name in params:
            return name
        stripped = name.replace(BASE_LAYER, "")
        if stripped in params:
            return stripped
        module, _, leaf = name.rpartition(".")
        wrapped = f"{module}{BASE_LAYER}.{leaf}"
        return wrapped if wrapped in params else None

    resolved = {name: resolve(name) for name in named_tensors}
    unknown = [name for name, found in resolved.items() if found is None]
    if unknown:
        raise WeightSyncError(
            f"hf rollout: {len(unknown)} synced tensors are not in the served model, e.g. {unknown[:3]}"
        )
    with torch.no_grad():
        for name, tensor in named_tensors.items():
            param = params[resolved[name]]
            param.copy_(tensor.to(param.dtype))
    return len(named_tensors)


def load_adapter(
    model: torch.nn.Module, named_tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any]
) -> tuple[torch.nn.Module, int]:
    """Load LoRA adapter tensors into ``model``, wrapping it with PEFT on the first call.

    Returns the (possibly newly wrapped) model and the number of tensors loaded. Every adapter
    tensor of the model must be in ``named_tensors`` and every tensor must be one of the model's:
    after the call the served adapter is exactly the actor's, in the served model's dtype.
    """
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    if is_peft_model(model):
        served = model.peft_config["default"].to_dict()
        if _comparable(served) != _comparable(peft_config):
            raise WeightSyncError(
                f"hf rollout: the adapter config changed between syncs: {_comparable(served)} -> {_comparable(peft_config)}"
            )
    else:
        model = get_peft_model(model, _lora_config(peft_config))
        model.eval()
    dtype = next(base_model(model).parameters()).dtype
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    tensors = {name: t.to(dtype) for name, t in named_tensors.items()}
    with torch.no_grad():
        result = set_peft_model_state_dict(model, tensors, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [name for name in getattr(result, "missing_keys", []) or [] if name in lora]
    if unexpected or missing:
        raise WeightSyncError(
            f"hf rollout: the adapter does not fit the served model: {len(unexpected)} unknown tensors"
            f" (e.g. {unexpected[:3]}), {len(missing)} adapter weights not sent (e.g. {missing[:3]})"
        )
    for p in lora.values():
        p.requires_grad_(False)
    return model, len(named_tensors)
