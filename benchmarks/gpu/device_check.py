"""One GPU, one call: what a lent device can tell about the full-size recipes in a few minutes.

Run (docs/benchmarks.md, "A GPU check in one call"): ``benchmarks/gpu/device_check.sh [--out FILE]``,
or ``python benchmarks/gpu/device_check.py --out FILE`` from the repository root. ``--dry-run`` runs
the same code on tiny configs on the CPU in seconds (``tests/test_device_check.py`` runs it).

It needs torch, transformers, torchvision, safetensors and numpy, and this repository on the path;
no verl, Ray or vLLM. It imports only the plugin's verl-free modules (``verl_grto.tool.*``,
``verl_grto.data.frame``); ``verl_grto/__init__.py`` imports verl only when it is installed.

What it measures (random weights throughout; the numbers are times, not quality):

* **tool** -- SAM2.1-L (``sam2.1_hiera_l``, 1024 px) on the device, built as the trainer builds it:
  ``ToolSettings.build_tool`` with the full-size recipe's ``grto.tool`` settings (read from
  ``recipes/qwen25vl_7b_sam21_large_base.yaml``: fp32 decoder and AdamW, the frozen encoder in the
  recipe's ``encoder_dtype``, its loss, ``chunk_images`` and ``cache_bytes``), mask decoder trained:

  - ``encoder_s_per_image``: the frozen image encoder alone, batches of 8 pre-resized images;
  - ``decoder_fwd_bwd_s_per_rollout``: the tool objective's forward + backward from cached features
    (``ToolEngine.objective``, what ``update`` differentiates), one box per rollout, in shards of
    ``--shard-images`` images x G rollouts;
  - ``phase_s``: a GRTO tool phase of ``--images`` (128) images x G (8) rollouts through
    ``ToolEngine`` with its embedding cache, as a step does it: masks for the rewards
    (``predict``), then the update (``update``: forward, loss, backward, clipping, AdamW), each
    image encoded once per step. The step's images are processed as the ranks of one 8-GPU node
    would each process their shard (``--shard-images``, default 128 / 8), one shard after another;
  - ``floor_s`` = images x encoder + rollouts x decoder fwd+bwd (both measured above, in this run),
    and ``phase_over_floor`` = phase / floor: what the engine adds over its compute (image
    preprocessing on the CPU, the no-grad reward pass, mask upsampling, optimiser steps).

* **policy** -- a Qwen2.5-VL of ``--policy-size`` (3b or 7b, default 7b) built from its config with
  random weights in bf16, prompts of one image at the recipe's frame (``--image-hw``, default the
  frame of a 2000 x 1300 image under the recipe's limits: 784 x 1232, 1232 vision tokens):

  - ``generate_s``: one ``model.generate`` batch (the ``hf`` rollout's call), ``--gen-batch``
    sequences x ``--new-tokens`` sampled tokens;
  - ``actor_fwd_bwd_s``: one actor forward + backward on ``--actor-batch`` prompt + response
    sequences (gradient checkpointing on, as in the recipe; log-probs of the response tokens).

* **estimates** -- the tool phase as a fraction of one GPU's share of a step, from the numbers
  above (labelled as an estimate: ``hf`` generation is slower than the recipe's vLLM, so the
  fraction is a lower bound).

Writes one JSON (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: verl_grto

from verl_grto.tool.configs import meta_sam2_config, tiny_sam2_config  # noqa: E402
from verl_grto.tool.engine import ToolBatch, ToolEngine  # noqa: E402
from verl_grto.tool.model import SegmentationTool  # noqa: E402
from verl_grto.tool.preprocess import images_to_pixels  # noqa: E402
from verl_grto.tool.prompts import ObjectPrompt  # noqa: E402
from verl_grto.tool.settings import ToolSettings  # noqa: E402

#: The full-size recipe whose ``grto.tool`` settings the tool section runs with.
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "qwen25vl_7b_sam21_large_base.yaml"

SCHEMA = "verl_grto/device_check/1"
#: The recipe's frame of a 2000 x 1300 image (``verl_grto.data.frame.ResizeLimits().size(1300, 2000)``;
#: the test checks they agree): the largest images the full-size recipes show the policy are ~1 MP.
RECIPE_FRAME_HW = (784, 1232)
TOOL_CONFIG = "sam2.1_hiera_l"
ENCODE_BATCH = 8

# Qwen2.5-VL-{3B,7B}-Instruct's config.json (the published values), token ids included.
_QWEN_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
_QWEN_TEXT = {
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}  # fmt: skip
_QWEN_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "fullatt_block_indexes": [7, 15, 23, 31]}  # fmt: skip


# ---- timing ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` (device work included) and its result."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- the tool -------------------------------------------------------------------------------


def _workload(
    rng: np.random.Generator, images: int, group: int, hw: tuple[int, int]
) -> tuple[list[np.ndarray], list[tuple[float, ...]], list[np.ndarray]]:
    """Random images, one random box per rollout (rollout r on image r // group), the box filled as ground truth."""
    h, w = hw
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(images)]
    boxes, masks = [], []
    for _ in range(images * group):
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x2, y2 = x1 + int(rng.integers(w // 8, w // 2)), y1 + int(rng.integers(h // 8, h // 2))
        mask = np.zeros((h, w), dtype=bool)
        mask[y1:y2, x1:x2] = True
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
        masks.append(mask)
    return pictures, boxes, masks


def _shards(images: int, group: int, shard_images: int) -> list[tuple[list[int], list[int]]]:
    """(image ids, rollout ids) per shard: ``shard_images`` images with all their rollouts."""
    out = []
    for start in range(0, images, shard_images):
        ids = list(range(start, min(images, start + shard_images)))
        out.append((ids, [r for i in ids for r in range(i * group, (i + 1) * group)]))
    return out


def recipe_tool_settings(path: str) -> ToolSettings:
    """The full-size recipe's ``grto.tool`` section with the tool read from ``path`` (PyYAML: no hydra
    or verl on the GPU machines)."""
    import yaml

    section = dict(yaml.safe_load(RECIPE.read_text())["grto"]["tool"])
    section["path"] = path
    return ToolSettings.from_config(section)


def tool_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Encoder, decoder fwd+bwd, the GRTO tool phase and its ratio to the compute floor, for the tool as
    the trainer builds and runs it (``dtype`` is the policy's; the tool's come from the recipe)."""
    import tempfile

    config = tiny_sam2_config() if args.dry_run else meta_sam2_config(TOOL_CONFIG)
    checkpoint = tempfile.mkdtemp(prefix="device_check_tool_")
    SegmentationTool.from_config(config, seed=0).model.save_pretrained(checkpoint)  # random weights, as TOOL_PATH
    settings = recipe_tool_settings(checkpoint)
    tool = settings.build_tool(device)
    pictures, boxes, masks = _workload(np.random.default_rng(0), args.images, args.group, args.tool_image_hw)
    engine = ToolEngine(tool, settings, image_loader=lambda key: pictures[int(str(key)[3:])])
    side = tool.image_size
    shards = _shards(args.images, args.group, args.shard_images)

    def batch(ids: list[int], rollouts: list[int], with_images: bool = True) -> ToolBatch:
        return ToolBatch(
            [f"img{i}" for i in ids],
            [pictures[i] if with_images else None for i in ids],
            [ids.index(r // args.group) for r in rollouts],
            [[ObjectPrompt(boxes[r])] for r in rollouts],
            [masks[r] for r in rollouts],
        )

    # warm-up: kernels, allocator, lazy initialisation (one shard through predict and update)
    ids0, roll0 = shards[0]
    engine.begin_step()
    engine.predict(batch(ids0, roll0))
    engine.update(batch(ids0, roll0))
    engine.begin_step()

    # 1. the encoder alone, on pre-resized pixels (the preprocessing is the CPU's, not the encoder's)
    chunks = [pictures[i : i + ENCODE_BATCH] for i in range(0, args.images, ENCODE_BATCH)]
    encode_s = 0.0
    for chunk in chunks:
        pixels = images_to_pixels(chunk, side).to(device)
        sizes = [tuple(args.tool_image_hw)] * len(chunk)
        seconds, _ = timed(lambda p=pixels, s=sizes: tool.encode_pixels(p, s), device)
        encode_s += seconds
    encoder_s_per_image = encode_s / args.images

    # 2. the objective's forward + backward alone, from cached features, shard by shard
    decode_s = 0.0
    for ids, rollouts in shards:
        b = batch(ids, rollouts, with_images=False)
        engine.begin_step()
        engine.cache.get([f"img{i}" for i in ids], [pictures[i] for i in ids])

        def fwd_bwd(b: ToolBatch = b) -> None:
            engine.objective(b).loss.backward()

        seconds, _ = timed(fwd_bwd, device)
        decode_s += seconds
        engine.optimizer.zero_grad(set_to_none=True)
    rollouts_total = args.images * args.group
    decoder_s_per_rollout = decode_s / rollouts_total

    # 3. the GRTO tool phase with the embedding cache: every image encoded once per step
    engine.begin_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encoded_before = engine.cache.images_encoded

    def phase() -> list[dict[str, float]]:
        out = []
        for ids, rollouts in shards:  # one rank's step after another: its rewards, then its update
            engine.begin_step()
            engine.predict(batch(ids, rollouts, with_images=False), return_masks=False)  # scored on the device
            out.append(engine.update(batch(ids, rollouts, with_images=False)))
        return out

    phase_s, metrics = timed(phase, device)
    floor_s = args.images * encoder_s_per_image + rollouts_total * decoder_s_per_rollout
    return {
        "config": "tiny" if args.dry_run else TOOL_CONFIG,
        "model_image_size": side,
        "decoder_dtype": str(tool.dtype).removeprefix("torch."),
        "encoder_dtype": str(tool.encoder_dtype).removeprefix("torch."),
        "chunk_images": settings.chunk_images,
        "cache_bytes": settings.cache_bytes,
        "parameters": sum(p.numel() for p in tool.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in engine.params),
        "images": args.images,
        "group": args.group,
        "rollouts": rollouts_total,
        "image_hw": list(args.tool_image_hw),
        "shard_images": args.shard_images,
        "encoder_s_per_image": encoder_s_per_image,
        "decoder_fwd_bwd_s_per_rollout": decoder_s_per_rollout,
        "phase_s": phase_s,
        "phase_images_encoded": engine.cache.images_encoded - encoded_before,
        "floor_s": floor_s,
        "phase_over_floor": phase_s / floor_s,
        "phase_s_per_shard": phase_s / len(shards),
        "update_skipped": sum(m["skipped"] for m in metrics),
        "peak_memory_gib": _peak_gib(device),
    }


# ---- the policy -----------------------------------------------------------------------------


def qwen25vl_config(size: str) -> Any:
    """Qwen2.5-VL's config at ``size`` (3b / 7b: the published shapes; tiny: for the dry run)."""
    from transformers import Qwen2_5_VLConfig

    if size == "tiny":
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "vocab_size": 512, "tie_word_embeddings": False}  # fmt: skip
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "fullatt_block_indexes": [1]}
        tokens = {
            "image_token_id": 500,
            "video_token_id": 501,
            "vision_start_token_id": 502,
            "vision_end_token_id": 503,
        }
        mrope = [4, 6, 6]
    else:
        text, vision, tokens, mrope = _QWEN_TEXT[size], _QWEN_VISION, _QWEN_TOKENS, [16, 24, 24]
    text_config = {
        **text,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    vision_config = {
        **vision,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": text["hidden_size"],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=text["tie_word_embeddings"],
        **tokens,
    )


def _prompts(config: Any, batch: int, image_hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> dict:
    """``batch`` prompts of one image each: text, ``<|vision_start|>``, the image's pad tokens, ``<|vision_end|>``, text.

    Pixel values are random patches in the processor's layout ((patches, 3 x 2 x 14 x 14) per
    image, ``image_grid_thw`` = (1, H/14, W/14)): no image processor is needed for timing.
    """
    gh, gw = image_hw[0] // 14, image_hw[1] // 14
    n_image_tokens = gh * gw // 4
    # plain text ids: below every special token (Qwen's start at 151643; the tiny config's at 500)
    high = min(config.text_config.vocab_size, 150_000, config.image_token_id, config.vision_start_token_id)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        before = torch.randint(10, high, (40,), generator=gen)
        after = torch.randint(10, high, (60,), generator=gen)
        image = torch.full((n_image_tokens,), config.image_token_id)
        rows.append(
            torch.cat(
                [
                    before,
                    torch.tensor([config.vision_start_token_id]),
                    image,
                    torch.tensor([config.vision_end_token_id]),
                    after,
                ]
            )
        )
    input_ids = torch.stack(rows).to(device)
    pixel_values = torch.randn(batch * gh * gw, 3 * 2 * 14 * 14, generator=gen).to(device, dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, gh, gw]] * batch, device=device),
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),
    }


def policy_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One generation batch and one actor forward + backward of a random-weight Qwen2.5-VL."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    size = "tiny" if args.dry_run else args.policy_size
    config = qwen25vl_config(size)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with device:  # built where it runs: a 7B model is not initialised on the host first
            init_s, model = timed(lambda: Qwen2_5_VLForConditionalGeneration(config), device)
    finally:
        torch.set_default_dtype(previous)
    image_hw = tuple(args.image_hw)
    inputs = _prompts(config, args.gen_batch, image_hw, device, dtype)
    prompt_len = inputs["input_ids"].shape[1]

    # rollout: one generate batch, sampled, exactly new_tokens tokens per sequence
    model.eval()
    gen_kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True,
                  "top_k": 0, "pad_token_id": 0}  # fmt: skip
    with torch.no_grad():
        warm = {
            k: v[:1] if k not in ("pixel_values",) else v[: v.shape[0] // args.gen_batch] for k, v in inputs.items()
        }
        model.generate(**warm, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generate_s, out = timed(lambda: model.generate(**inputs, **gen_kwargs), device)
    generate_peak = _peak_gib(device)
    responses = out[:, prompt_len:]

    # actor: forward + backward on actor_batch prompt + response sequences
    n = min(args.actor_batch, args.gen_batch)
    patches = inputs["pixel_values"].shape[0] // args.gen_batch
    seq = torch.cat([inputs["input_ids"][:n], responses[:n]], dim=1)
    actor_inputs = {
        "input_ids": seq,
        "attention_mask": torch.ones_like(seq),
        "pixel_values": inputs["pixel_values"][: n * patches],
        "image_grid_thw": inputs["image_grid_thw"][:n],
        "mm_token_type_ids": (seq == config.image_token_id).int(),
    }
    model.train()
    model.gradient_checkpointing_enable()
    resp_len = responses.shape[1]

    def fwd_bwd() -> float:
        logits = model(**actor_inputs, logits_to_keep=resp_len + 1, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, seq[:, -resp_len:, None]).squeeze(-1)
        loss = -logp.mean()
        loss.backward()
        return float(loss.detach())

    fwd_bwd()  # warm-up (allocations, checkpointing hooks)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    actor_s, loss = timed(fwd_bwd, device)
    model.zero_grad(set_to_none=True)
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "init_s": init_s,
        "image_hw": list(image_hw),
        "prompt_tokens": prompt_len,
        "image_tokens": int((inputs["input_ids"][0] == config.image_token_id).sum()),
        "gen_batch": args.gen_batch,
        "new_tokens": args.new_tokens,
        "generate_s": generate_s,
        "generate_tokens_per_s": args.gen_batch * args.new_tokens / generate_s,
        "generate_peak_memory_gib": generate_peak,
        "actor_batch": n,
        "actor_tokens": int(seq.numel()),
        "actor_fwd_bwd_s": actor_s,
        "actor_loss": loss,
        "actor_peak_memory_gib": _peak_gib(device),
    }


def estimates(tool: dict[str, Any], policy: dict[str, Any], gpus: int = 8) -> dict[str, Any]:
    """The tool phase as a fraction of one GPU's share of a step (rough: see the module docstring)."""
    sequences = tool["rollouts"] // gpus  # one GPU's rollouts of the step
    generate = policy["generate_s"] / policy["gen_batch"] * sequences
    actor = policy["actor_fwd_bwd_s"] / policy["actor_batch"] * sequences
    tool_share = tool["phase_s"] / gpus
    total = generate + actor + tool_share
    return {
        "gpus_per_node": gpus,
        "sequences_per_gpu": sequences,
        "generate_s_per_gpu": generate,
        "actor_fwd_bwd_s_per_gpu": actor,
        "tool_phase_s_per_gpu": tool_share,
        "tool_fraction_of_step": tool_share / total if total > 0 and math.isfinite(total) else None,
        "note": "hf generate (not vLLM), one actor fwd+bwd (no reference / old log-prob passes, no optimiser step): "
        "a rough lower bound on the tool's share",
    }


def _pair(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.split(","))
    return h, w


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU (seconds): checks the code")
    parser.add_argument("--out", default="device_check.json", help="the JSON written")
    parser.add_argument("--device", help="default: cuda when available, else cpu (cpu under --dry-run)")
    parser.add_argument("--images", type=int, help="tool phase images (default 128; dry run 4)")
    parser.add_argument("--group", type=int, help="rollouts per image, G (default 8; dry run 2)")
    parser.add_argument("--shard-images", type=int, help="images per rank's shard (default images / 8; dry run 2)")
    parser.add_argument(
        "--tool-image-hw", type=_pair, help="H,W of the tool's images (default 768,1024; dry run 96,128)"
    )
    parser.add_argument("--policy-size", choices=sorted(_QWEN_TEXT), default="7b")
    parser.add_argument("--image-hw", type=_pair, help="H,W of the policy's image (default 784,1232; dry run 56,84)")
    parser.add_argument("--gen-batch", type=int, help="sequences per generate call (default 16; dry run 2)")
    parser.add_argument("--new-tokens", type=int, help="tokens sampled per sequence (default 128; dry run 4)")
    parser.add_argument(
        "--actor-batch", type=int, help="sequences in the actor fwd+bwd (default 4, the recipe's micro-batch)"
    )
    parser.add_argument("--skip-policy", action="store_true", help="the tool only")
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "images": 4 if dry else 128,
        "group": 2 if dry else 8,
        "tool_image_hw": (96, 128) if dry else (768, 1024),
        "image_hw": (56, 84) if dry else RECIPE_FRAME_HW,
        "gen_batch": 2 if dry else 16,
        "new_tokens": 4 if dry else 128,
        "actor_batch": 2 if dry else 4,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shard_images is None:
        args.shard_images = 2 if dry else max(1, args.images // 8)
    if min(args.images, args.group, args.shard_images, args.gen_batch, args.new_tokens, args.actor_batch) < 1:
        parser.error("counts must be positive")
    if any(v % 28 for v in args.image_hw):
        parser.error("--image-hw must be multiples of 28 (a Qwen2.5-VL frame)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    dtype = torch.bfloat16
    import transformers

    start = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "dry_run": args.dry_run,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    report["tool"] = tool_section(args, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_policy:
        report["policy"] = policy_section(args, device, dtype)
        report["estimates"] = estimates(report["tool"], report["policy"])
    report["wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
