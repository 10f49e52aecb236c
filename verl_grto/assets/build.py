"""Build the tiny default models (policy and tool) once, in a local cache, safely under concurrency.

Recipes and tests call :func:`ensure_assets` and get paths they can hand to verl
(``actor_rollout_ref.model.path``) and to the tool. Each model directory is built in a temporary
directory beside it and renamed into place under a file lock (:func:`verl_grto.atomic.build_dir_once`),
so parallel processes build it once and nobody reads a half-written model. A stamp with the builder
version and seed marks a finished build; bumping :data:`BUILDER_VERSION` rebuilds stale caches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from verl_grto.assets.qwen3vl import build_tiny_qwen3vl
from verl_grto.assets.qwen25vl import build_tiny_qwen25vl
from verl_grto.atomic import build_dir_once
from verl_grto.tool.configs import tiny_sam2_config
from verl_grto.tool.model import SegmentationTool

#: Bump when the built files change (sizes, tokenizer corpus, configs), so cached builds are replaced.
BUILDER_VERSION = 2
#: The same for the tiny policy alone (3: vision patches of 7 pixels, 64 image tokens per 112-pixel scene).
POLICY_BUILDER_VERSION = 3
#: The same for the tiny Qwen3-VL (verl_grto/assets/qwen3vl.py).
QWEN3VL_BUILDER_VERSION = 1
#: Default SAM2 input size of the tiny tool.
TINY_SAM2_IMAGE_SIZE = 128
HOME_ENV = "VERL_GRTO_HOME"


@dataclass(frozen=True)
class AssetPaths:
    policy: Path  # a Qwen2.5-VL directory (model, tokenizer, processor)
    tool: Path  # a transformers Sam2Model directory


def build_tiny_sam2(out_dir: Path, seed: int = 0, image_size: int = TINY_SAM2_IMAGE_SIZE) -> Path:
    """Write a randomly initialised tiny ``Sam2Model`` (see :func:`verl_grto.tool.configs.tiny_sam2_config`)."""
    # through SegmentationTool.from_config: it ties transformers' two copies of the prompt positional
    # matrix (Meta's SAM2 has one), so the tool exports to Meta's format
    model = SegmentationTool.from_config(tiny_sam2_config(image_size), seed=seed).model.to(torch.float32).eval()
    model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def policy_stamp(seed: int) -> dict:
    """The build stamp of the random tiny policy for ``seed`` (what trained assets built from it record)."""
    return {"builder": "tiny_qwen25vl", "version": POLICY_BUILDER_VERSION, "seed": seed}


def build_assets(out: Path, seed: int = 0) -> AssetPaths:
    """Build ``out/tiny_qwen25vl`` and ``out/tiny_sam2`` unless already built with this seed and version."""
    out = Path(out)
    policy = build_dir_once(out / "tiny_qwen25vl", policy_stamp(seed), lambda tmp: build_tiny_qwen25vl(tmp, seed=seed))
    tool = build_dir_once(
        out / "tiny_sam2",
        {
            "builder": "tiny_sam2",
            "version": BUILDER_VERSION,
            "seed": seed,
            "image_size": TINY_SAM2_IMAGE_SIZE,
            "tied": 1,
        },
        lambda tmp: build_tiny_sam2(tmp, seed=seed),
    )
    return AssetPaths(policy=policy, tool=tool)


def default_home() -> Path:
    """``$VERL_GRTO_HOME`` or ``~/.cache/verl_grto``: where built assets and generated data live."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "verl_grto"


def ensure_assets(root: Path | None = None, seed: int = 0) -> AssetPaths:
    """The tiny assets for ``seed`` under ``root`` (default :func:`default_home` ``/assets/seed<seed>``),
    built if missing. Different seeds get different directories, so they can coexist."""
    base = Path(root) if root is not None else default_home() / "assets"
    return build_assets(base / f"seed{seed}", seed=seed)


def ensure_tiny_qwen3vl(root: Path | None = None, seed: int = 0) -> Path:
    """The random tiny Qwen3-VL for ``seed`` under ``root`` (default :func:`default_home` ``/assets/seed<seed>``),
    built if missing (:func:`verl_grto.assets.qwen3vl.build_tiny_qwen3vl`, atomically, under a file lock)."""
    base = Path(root) if root is not None else default_home() / "assets"
    stamp = {"builder": "tiny_qwen3vl", "version": QWEN3VL_BUILDER_VERSION, "seed": seed}
    return build_dir_once(base / f"seed{seed}" / "tiny_qwen3vl", stamp, lambda tmp: build_tiny_qwen3vl(tmp, seed=seed))
