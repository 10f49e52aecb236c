"""Image / prediction / ground-truth overlays for wandb and tensorboard.

verl's ``Tracking`` loggers take scalars only (a ``wandb.Image`` raises NotImplementedError), so
the plugin writes images itself, next to verl's scalars: to the active wandb run (which verl's
wandb logger started) and to the same tensorboard folder verl's tensorboard logger uses.

One overlay per sample, ``[image | image + masks]`` side by side: the prediction red, the ground
truth green, their overlap yellow, so misses and false positives read at a glance. wandb gets the
raw image with both masks as toggleable layers instead (its own mask viewer does the colouring).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

ALPHA = 0.5
PRED_COLOR = np.array([255, 0, 0], dtype=np.float32)
GT_COLOR = np.array([0, 255, 0], dtype=np.float32)
BOTH_COLOR = np.array([255, 255, 0], dtype=np.float32)
WANDB_KEY = "grto/overlays"
TB_TAG = "grto/overlay"


def default_tb_dir(project_name: str, experiment_name: str) -> str:
    """The folder verl's tensorboard logger writes to (verl/utils/tracking.py), so both land in one run."""
    return os.environ.get("TENSORBOARD_DIR", os.path.join("tensorboard_log", project_name, experiment_name))


def _rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 from uint8/float RGB, grayscale or RGBA (PIL images go through np.asarray)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


def _mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask of the image's size; None (an unparseable rollout: no prediction) is empty."""
    if mask is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != shape:
        raise ValueError(f"mask of shape {mask.shape} for an image of shape {shape}")
    return mask


def overlay(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``[rgb | rgb blended with pred (red), gt (green), both (yellow)]`` as HxWx3 uint8."""
    out = rgb.astype(np.float32)
    for region, color in ((pred & ~gt, PRED_COLOR), (gt & ~pred, GT_COLOR), (pred & gt, BOTH_COLOR)):
        out[region] = (1 - ALPHA) * out[region] + ALPHA * color
    return np.concatenate([rgb, out.round().astype(np.uint8)], axis=1)


def _log_wandb(step: int, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bool:
    import wandb

    if wandb.run is None:
        return False
    images = [
        wandb.Image(
            rgb,
            masks={
                "prediction": {"mask_data": pred.astype(np.uint8), "class_labels": {1: "prediction"}},
                "ground_truth": {"mask_data": gt.astype(np.uint8), "class_labels": {1: "ground truth"}},
            },
        )
        for rgb, pred, gt in samples
    ]
    wandb.log({WANDB_KEY: images}, step=step)
    return True


def _log_tensorboard(step: int, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], tb_dir: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    # a writer per call (a new event file in the same run folder; TensorBoard merges them): the
    # trainer holds no writer state, and the images are on disk when this returns
    writer = SummaryWriter(log_dir=tb_dir)
    try:
        for i, (rgb, pred, gt) in enumerate(samples):
            writer.add_image(f"{TB_TAG}/{i}", overlay(rgb, pred, gt), step, dataformats="HWC")
    finally:
        writer.close()


def log_overlays(
    step: int,
    images: Sequence[np.ndarray],
    pred_masks: Sequence[np.ndarray | None],
    gt_masks: Sequence[np.ndarray],
    loggers: Sequence[str],
    tb_dir: str | None,
    max_images: int = 4,
) -> list[str]:
    """Log up to ``max_images`` overlays to the backends in ``loggers`` (``trainer.logger``).

    wandb is written only while a run is active (verl's wandb logger starts it; without one,
    ``wandb.log`` would start a stray run). Returns the backends actually written, for tests and
    for the caller's log line.
    """
    if not (len(images) == len(pred_masks) == len(gt_masks)):
        raise ValueError(f"{len(images)} images, {len(pred_masks)} predictions, {len(gt_masks)} ground truths")
    samples = []
    for image, pred, gt in list(zip(images, pred_masks, gt_masks, strict=True))[:max_images]:
        rgb = _rgb(image)
        shape = rgb.shape[:2]
        samples.append((rgb, _mask(pred, shape), _mask(gt, shape)))
    written: list[str] = []
    if not samples:
        return written
    if "wandb" in loggers and _log_wandb(step, samples):
        written.append("wandb")
    if "tensorboard" in loggers:
        if tb_dir is None:
            raise ValueError("tensorboard logging needs tb_dir (see default_tb_dir)")
        _log_tensorboard(step, samples, tb_dir)
        written.append("tensorboard")
    return written
