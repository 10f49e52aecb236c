"""The LoRA policy's memory on one GPU, measured without one: the figures docs/recipes.md's single-GPU budget uses.

    python benchmarks/lora_memory.py --out benchmarks/results/lora_memory.json

Qwen2.5-VL (3B by default) is built from its published config (``benchmarks/gpu/device_check.py:
qwen25vl_config``) on PyTorch's ``meta`` device, where every tensor has its shape, dtype and size but no
storage and no arithmetic runs, so a 3B model takes no memory and a step takes about a minute. The
LoRA adapter is PEFT's with verl's settings (``all-linear``, the vision tower excluded; verl's
``transformer_impl.py:359-368``), the base in bf16 and the adapter in fp32. One actor micro-batch of the
recipe's longest sequences runs forward (gradient checkpointing on, as the recipe sets it), the per-token
log-probs over the vocabulary in fp32 (what verl's actor computes), backward and one AdamW step, under
``torch.distributed._tools.mem_tracker.MemTracker``, which records every tensor that is alive, by kind
(parameters, gradients, activations, temporaries, optimizer states), and reports the peak.

What it measures: tensor bytes, exactly, for these shapes. What it cannot: the CUDA context, the caching
allocator's slack and fragmentation, kernels' workspaces (docs/recipes.md adds an allowance for them and
says so), and vLLM, whose budget is its ``gpu_memory_utilization`` (its KV cache per token is computed
here from the config).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def _device_check() -> Any:
    """benchmarks/gpu/device_check.py (a script, not a package): its published Qwen2.5-VL configs."""
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "gpu" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lora_model(size: str, rank: int, alpha: int) -> torch.nn.Module:
    """Qwen2.5-VL-``size`` on the meta device, bf16, with a LoRA adapter (fp32) on the language model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForImageTextToText

    config = _device_check().qwen25vl_config(size)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        target_modules="all-linear",
        exclude_modules=".*visual.*",
        bias="none",
    )
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def actor_step_peak(model: torch.nn.Module, micro_batch: int, tokens: int) -> dict[str, float]:
    """Peak tensor bytes (GiB, by kind) of one actor micro-batch: forward, fp32 log-probs, backward, AdamW."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = torch.zeros((micro_batch, tokens), dtype=torch.long, device="meta")
    position_ids = torch.zeros((3, micro_batch, tokens), dtype=torch.long, device="meta")  # mrope's 3 axes
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)

    class _NoHook:
        def remove(self) -> None:
            return None

    # MemTracker hooks every parameter's gradient and refuses frozen ones; the frozen base has none to track
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    with tracker:
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])
        log_probs.sum().backward()
        optimizer.step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]
    return {str(kind).split(".")[-1].lower(): round(value / GiB, 3) for kind, value in peak.items()}


def kv_bytes_per_token(size: str) -> int:
    """vLLM's KV cache per token (bf16): layers x (K, V) x KV heads x head dim x 2 bytes."""
    text = _device_check().qwen25vl_config(size).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy-size", choices=["3b", "7b"], default="3b")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument(
        "--micro-batches",
        type=int,
        nargs="+",
        default=[1, 2],
        help="actor micro-batch sizes to measure (the recipe's ppo_micro_batch_size_per_gpu)",
    )
    parser.add_argument(
        "--tokens", type=int, default=2560, help="sequence length: the recipe's max_prompt_length + max_response_length"
    )
    parser.add_argument("--out", type=Path, help="JSON output (default: print only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    model = _lora_model(args.policy_size, args.lora_rank, args.lora_alpha)
    params = list(model.named_parameters())
    counts = {
        "total": sum(p.numel() for n, p in params if "lora_" not in n),
        "vision": sum(p.numel() for n, p in params if ".visual." in n),
        "adapter": sum(p.numel() for _, p in params if p.requires_grad),
    }
    peaks = {}
    for micro in args.micro_batches:
        peaks[str(micro)] = actor_step_peak(
            _lora_model(args.policy_size, args.lora_rank, args.lora_alpha), micro, args.tokens
        )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmarks/lora_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit,
        "torch": torch.__version__,
        "what": "tensor bytes on the meta device (MemTracker): bf16 base, fp32 LoRA adapter, gradient checkpointing",
        "policy": f"Qwen2.5-VL-{args.policy_size.upper()} (published config)",
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "tokens_per_sequence": args.tokens,
        "parameters": counts,
        "bytes": {
            "base_bf16_gib": round(counts["total"] * 2 / GiB, 3),
            "base_fp32_gib": round(counts["total"] * 4 / GiB, 3),
            # fp32 weights + gradients + AdamW's two moments
            "adapter_train_state_gib": round(counts["adapter"] * 16 / GiB, 3),
            "vllm_kv_bytes_per_token": kv_bytes_per_token(args.policy_size),
        },
        "actor_micro_batch_peak_gib": peaks,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
