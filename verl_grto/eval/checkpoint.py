"""From a training run's checkpoint (verl's ``global_step_N`` folder) to the models evaluation loads.

A GRTO / B-GRTO checkpoint is verl's layout plus the tool::

    <run dir>/latest_checkpointed_iteration.txt     the last complete step (verl writes it last)
    <run dir>/global_step_N/actor/                  the policy: FSDP shards model_world_size_W_rank_R.pt,
                                                    fsdp_config.json, lora_train_meta.json (LoRA runs), and
                                                    huggingface/ (config + tokenizer always; the full
                                                    weights too when checkpoint.save_contents has hf_model)
    <run dir>/global_step_N/tool/                   the tool, a transformers Sam2 folder (GRTOTrainer)

:func:`checkpoint_models` turns that into a Hugging Face policy folder, an optional LoRA adapter and
the tool folder:

- ``actor/huggingface`` holding full weights under Hugging Face names is used as it is;
- otherwise the weights are rebuilt with verl's own model merger (``verl.model_merger``, the code
  behind ``python -m verl.model_merger merge --backend fsdp``): from the FSDP shards, or, for a LoRA
  run whose ``actor/huggingface`` holds the PEFT-named weights verl writes there (base layers as
  ``...q_proj.base_layer.weight`` plus the adapter: transformers would load them as an untrained
  model, with only a warning), from those. The merger writes the base model and, for a LoRA run, the
  adapter in ``lora_adapter/``. Note: verl's merger stores the FSDP shards in bf16.

The merged folder is written to a temporary sibling and renamed into place when complete, with a
stamp naming its source, so an interrupted merge is never reused and a rerun reuses a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_grto.atomic import atomic_file

TRACKER = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"global_step_(\d+)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
LORA_ADAPTER = "lora_adapter"
STAMP = ".verl_grto_merged.json"
#: A PEFT wrapper's prefix on every name of a LoRA actor's state dict.
PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A folder that is not a usable verl checkpoint; the message names what is missing and where."""


@dataclass(frozen=True)
class CheckpointModels:
    """What evaluation loads from one checkpoint.

    ``policy``: a Hugging Face folder with full weights; ``adapter``: a PEFT folder to apply on top
    (LoRA runs), else None; ``tool``: the transformers Sam2 folder; ``policy_from``: where the policy
    came from ("actor/huggingface", "merged FSDP shards" or "merged actor/huggingface (PEFT names)").
    """

    step_dir: Path
    policy: Path
    adapter: Path | None
    tool: Path
    policy_from: str

    def describe(self) -> dict[str, Any]:
        """The JSON-able record an evaluation report keeps of what it evaluated."""
        return {
            "checkpoint": str(self.step_dir),
            "policy": str(self.policy),
            "adapter": None if self.adapter is None else str(self.adapter),
            "tool": str(self.tool),
            "policy_from": self.policy_from,
        }


def step_dir(path: str | Path) -> Path:
    """The ``global_step_N`` folder ``path`` names: itself, or a run folder's latest complete step."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if STEP_DIR.fullmatch(path.name):
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not a step number")
        found = path / f"global_step_{text}"
        if not found.is_dir():
            raise CheckpointError(f"{tracker} names step {text}, but {found} does not exist")
        return found
    raise CheckpointError(f"{path} is neither a global_step_N folder nor a run folder with {TRACKER}")


def has_full_weights(hf_dir: Path) -> bool:
    """Whether a Hugging Face folder holds model weights (not only the config and tokenizer verl always writes)."""
    return any((hf_dir / name).is_file() for name in WEIGHT_FILES)


def _weight_names(hf_dir: Path) -> list[str]:
    """The tensor names of a Hugging Face folder's safetensors weights."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _is_peft_named(hf_dir: Path) -> bool:
    return any(name.startswith(PEFT_PREFIX) or "lora_" in name for name in _weight_names(hf_dir))


def _tool_dir(step: Path) -> Path:
    tool = step / "tool"
    for name in ("config.json", "model.safetensors"):
        if not (tool / name).is_file():
            raise CheckpointError(f"{step} has no tool ({tool / name} is missing): not a GRTO / B-GRTO checkpoint")
    return tool


def _shards(actor: Path) -> list[Path]:
    return sorted(actor.glob("model_world_size_*_rank_*.pt"))


def _source_stamp(actor: Path, source: str) -> dict[str, Any]:
    """What a merged folder was made from: the files and their sizes and times (a re-saved step differs)."""
    files = _shards(actor) if source == "shards" else [actor / "huggingface" / n for n in WEIGHT_FILES]
    return {
        "actor": str(actor.resolve()),
        "source": source,
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()},
    }


def _merger(actor: Path, target: Path) -> Any:
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    config = ModelMergerConfig(
        operation="merge",
        backend="fsdp",
        local_dir=str(actor),
        target_dir=str(target),
        hf_model_config_path=str(actor / "huggingface"),
    )
    return FSDPModelMerger(config)


def _merge(actor: Path, source: str, target: Path) -> None:
    """Write the policy (and a LoRA run's adapter) to ``target`` with verl's merger, from ``source``
    ("shards": the FSDP shards; "peft_hf": the PEFT-named weights in ``actor/huggingface``)."""
    # verl's merger reports on stdout, where `verl-grto predict` prints its JSON: sent to stderr
    with contextlib.redirect_stdout(sys.stderr):
        _run_merger(actor, source, target)
    adapter = target / LORA_ADAPTER
    if adapter.is_dir():
        _pin_adapter_modules(adapter)


def _run_merger(actor: Path, source: str, target: Path) -> None:
    merger = _merger(actor, target)
    if source == "shards":
        merger.merge_and_save()
    else:
        from safetensors.torch import load_file

        hf = actor / "huggingface"
        index = hf / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        state: dict[str, Any] = {}
        for name in files:
            state.update(load_file(str(hf / name)))
        merger.save_hf_model_and_tokenizer(state)
    merger.cleanup()


def _pin_adapter_modules(adapter: Path) -> None:
    """Name the adapter's modules exactly in its ``adapter_config.json``.

    verl's merger lists target modules by their last name (``base_model_merger.py:338``:
    ``q_proj``, ``gate_proj``...); on a vision-language model those also match vision-tower modules
    that were never trained (Qwen2.5-VL's vision MLP has ``gate_proj`` / ``up_proj`` / ``down_proj``),
    which PEFT would then wrap with fresh adapters. The exact module names of the adapter's tensors
    wrap exactly the trained ones.
    """
    from safetensors import safe_open

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    modules = sorted({n.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for n in names if ".lora_" in n})
    if not modules:
        raise CheckpointError(f"{adapter}: the merged adapter has no LoRA tensors")
    config["target_modules"] = modules
    with atomic_file(config_path) as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def _refuse_adapter_only(shard: Path) -> None:
    """A LoRA run saved with ``checkpoint.save_lora_only`` keeps no base weights: say so, rather than
    merge an adapter into nothing."""
    import torch
    import torch.distributed.tensor  # noqa: F401  (the weights-only unpickler loads DTensors once imported)

    names = list(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
    if names and all("lora_" in n or ".adapter_" in n for n in names):
        raise CheckpointError(
            f"{shard} holds only the LoRA adapter (checkpoint.save_lora_only): its base model is the run's "
            "actor_rollout_ref.model.path; save full checkpoints to evaluate with --checkpoint"
        )


def _merged_policy(actor: Path, source: str, merged_dir: Path) -> Path:
    """``merged_dir`` holding the merged policy from ``source``, merged now unless a finished merge of
    the same files is there already."""
    stamp = _source_stamp(actor, source)
    stamp_path = merged_dir / STAMP
    if stamp_path.is_file():
        if json.loads(stamp_path.read_text()) == stamp:
            return merged_dir
        raise CheckpointError(
            f"{merged_dir} holds a policy merged from other files ({stamp_path}); remove it or choose another folder"
        )
    if merged_dir.exists() and any(merged_dir.iterdir()):
        raise CheckpointError(
            f"{merged_dir} exists and is not a merged policy of this checkpoint; choose another folder"
        )
    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{merged_dir.name}.", dir=merged_dir.parent))
    try:
        _merge(actor, source, work)
        (work / STAMP).write_text(json.dumps(stamp, indent=1))
        if merged_dir.exists():
            merged_dir.rmdir()  # empty (checked above)
        os.replace(work, merged_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return merged_dir


def checkpoint_models(path: str | Path, merged_dir: str | Path) -> CheckpointModels:
    """The policy (merged into ``merged_dir`` when it has to be), its adapter and the tool of a checkpoint.

    ``path``: a ``global_step_N`` folder, or a run folder (its latest complete step). Raises
    :class:`CheckpointError` naming the missing piece for anything else.
    """
    step = step_dir(path)
    actor = step / "actor"
    if not actor.is_dir():
        raise CheckpointError(f"{step} has no actor/ folder: not a verl checkpoint")
    tool = _tool_dir(step)
    for hf in (actor / "huggingface", actor / "model" / "huggingface"):  # FSDP; Megatron (mbridge)
        if has_full_weights(hf) and not _is_peft_named(hf):
            return CheckpointModels(step, hf, None, tool, str(hf.relative_to(step)))
    hf = actor / "huggingface"
    if not (hf / "config.json").is_file():
        raise CheckpointError(f"{hf} has no config.json: verl writes it with every checkpoint")
    if has_full_weights(hf):
        source, label = "peft_hf", "merged actor/huggingface (PEFT names)"
    elif _shards(actor):
        if not (actor / "fsdp_config.json").is_file():
            raise CheckpointError(f"{actor} has FSDP shards but no fsdp_config.json (a checkpoint cut short?)")
        _refuse_adapter_only(_shards(actor)[0])
        source, label = "shards", "merged FSDP shards"
    elif (actor / "model" / "dist_ckpt").is_dir() or (actor / "dist_ckpt").is_dir():
        raise CheckpointError(
            f"{actor} is a Megatron checkpoint without Hugging Face weights: merge it with "
            f"`python -m verl.model_merger merge --backend megatron --local_dir {actor} --target_dir DIR` "
            "and pass --policy DIR (or train with checkpoint.save_contents including hf_model)"
        )
    else:
        raise CheckpointError(
            f"{actor} has neither Hugging Face weights nor FSDP shards (model_world_size_*_rank_*.pt)"
        )
    merged = _merged_policy(actor, source, Path(merged_dir))
    adapter = merged / LORA_ADAPTER
    return CheckpointModels(step, merged, adapter if adapter.is_dir() else None, tool, label)
