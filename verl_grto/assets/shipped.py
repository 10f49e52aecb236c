"""The trained tiny assets shipped inside the package, so the main job needs no minutes of training first.

The tiny default's two trained models (the warm-started reference policy and the pre-trained tool) take
several minutes of CPU to build. They are built once by ``verl-grto assets --ship`` (the command, seed,
thread count and versions are written to ``shipped/seed<seed>/MANIFEST.json``) and shipped as
safetensors (a few MB). :func:`shipped_asset` hands a recipe the shipped copy when its stamp is exactly
what the current builder would stamp: a builder version bump without a re-ship silently falls back to
building, and ``tests/test_shipped_assets.py`` fails until the shipped copy is rebuilt. Set
``VERL_GRTO_SHIPPED_ASSETS=0`` to build everything from scratch instead (same code, other bits: a
rebuild is equivalent, not byte-identical, because a warm start's float sums depend on the thread count).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from verl_grto.atomic import build_dir_once, read_stamp

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
USE_SHIPPED_ENV = "VERL_GRTO_SHIPPED_ASSETS"
MANIFEST_NAME = "MANIFEST.json"


def use_shipped() -> bool:
    """False when ``VERL_GRTO_SHIPPED_ASSETS=0``: build the trained assets instead of using the shipped ones."""
    return os.environ.get(USE_SHIPPED_ENV, "1") != "0"


def shipped_asset(name: str, seed: int, stamp: dict[str, Any]) -> Path | None:
    """``shipped/seed<seed>/<name>`` if shipping is on and its stamp equals ``stamp``, else None."""
    path = SHIPPED_DIR / f"seed{seed}" / name
    if use_shipped() and read_stamp(path) == stamp:
        return path
    return None


def ship(built: list[Path], seed: int, details: dict[str, Any]) -> Path:
    """Copy each finished build directory of ``built`` into ``shipped/seed<seed>/`` (same folder name) and
    write the manifest (the command, versions, thread count, ``details``)."""
    import torch
    import transformers

    target_root = SHIPPED_DIR / f"seed{seed}"
    for path in built:
        stamp = read_stamp(path)
        if stamp is None:
            raise ValueError(f"{path} has no build stamp: only finished builds can be shipped")
        build_dir_once(
            target_root / path.name, stamp, lambda tmp, src=path: shutil.copytree(src, tmp, dirs_exist_ok=True)
        )
        (target_root / f".{path.name}.lock").unlink(missing_ok=True)  # build_dir_once's lock: not part of a release
    manifest = {
        "command": " ".join(sys.argv),
        "seed": seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "assets": {path.name: read_stamp(target_root / path.name) for path in built},
        **details,
    }
    (target_root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return target_root


def ship_extra(built: Path, seed: int, key: str, details: dict[str, Any]) -> Path:
    """Copy one more finished build into ``shipped/seed<seed>/`` beside those :func:`ship` shipped, and record
    it in the manifest under ``key`` (its stamp, the command, versions and thread count that built it,
    ``details``), leaving the manifest's other entries as they are."""
    import torch
    import transformers

    target_root = SHIPPED_DIR / f"seed{seed}"
    stamp = read_stamp(built)
    if stamp is None:
        raise ValueError(f"{built} has no build stamp: only finished builds can be shipped")
    target = target_root / built.name
    if read_stamp(target) != stamp:
        shutil.rmtree(target, ignore_errors=True)
    build_dir_once(target, stamp, lambda tmp: shutil.copytree(built, tmp, dirs_exist_ok=True))
    (target_root / f".{built.name}.lock").unlink(missing_ok=True)
    manifest_path = target_root / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[key] = {
        "asset": built.name,
        "stamp": stamp,
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        **details,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return target
