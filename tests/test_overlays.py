"""Overlay logging writes real files that TensorBoard / wandb read back, and only where it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verl_grto.trainer.overlays import TB_TAG, WANDB_KEY, log_overlays, overlay

H, W = 12, 16


def _sample(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    pred = np.zeros((H, W), dtype=bool)
    pred[2:8, 2 + seed : 8 + seed] = True  # distinct per sample: wandb stores masks by content hash
    gt = np.zeros((H, W), dtype=bool)
    gt[5:11, 5 + seed : 11 + seed] = True
    return image, pred, gt


def test_overlay_colours_each_region_and_keeps_the_original() -> None:
    image, pred, gt = _sample(0)
    out = overlay(image, pred, gt)
    assert out.shape == (H, 2 * W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :W], image)
    right = out[:, W:].astype(int)
    blend = lambda color: np.round(0.5 * image.astype(float) + 0.5 * np.array(color)).astype(int)  # noqa: E731
    assert (right[2, 2] == blend([255, 0, 0])[2, 2]).all()  # prediction only: red
    assert (right[10, 10] == blend([0, 255, 0])[10, 10]).all()  # ground truth only: green
    assert (right[6, 6] == blend([255, 255, 0])[6, 6]).all()  # both: yellow
    np.testing.assert_array_equal(right[0, 15], image[0, 15])  # neither: untouched


def test_tensorboard_images_are_readable(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    samples = [_sample(s) for s in range(3)]
    images, preds, gts = (list(x) for x in zip(*samples, strict=True))
    preds[1] = None  # an unparseable rollout: no prediction, ground truth still shown
    written = log_overlays(
        7, images, preds, gts, loggers=["console", "tensorboard"], tb_dir=str(tmp_path), max_images=2
    )
    assert written == ["tensorboard"]

    acc = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0}).Reload()
    assert sorted(acc.Tags()[IMAGES]) == [f"{TB_TAG}/0", f"{TB_TAG}/1"]  # capped at max_images
    event = acc.Images(f"{TB_TAG}/0")[0]
    assert (event.step, event.height, event.width) == (7, H, 2 * W)


def test_nothing_is_written_without_an_active_wandb_run(tmp_path: Path) -> None:
    import wandb

    assert wandb.run is None
    image, pred, gt = _sample(0)
    assert log_overlays(1, [image], [pred], [gt], loggers=["wandb"], tb_dir=None) == []
    assert wandb.run is None  # no stray run started


def test_wandb_offline_run_gets_images_and_both_mask_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="verl_grto_test")
    try:
        samples = [_sample(s) for s in range(2)]
        images, preds, gts = (list(x) for x in zip(*samples, strict=True))
        assert log_overlays(3, images, preds, gts, loggers=["wandb"], tb_dir=None) == ["wandb"]
    finally:
        run.finish()
    media = tmp_path / "wandb" / Path(run.dir).parent.name / "files" / "media" / "images"
    assert len(list(media.glob(f"{WANDB_KEY}_*.png"))) == 2  # one file per image, named after the key
    assert len(list(media.glob(f"mask/{WANDB_KEY}_*.mask.png"))) == 4  # prediction + ground truth each


def test_mismatched_inputs_are_rejected() -> None:
    image, pred, gt = _sample(0)
    with pytest.raises(ValueError, match="shape"):
        log_overlays(0, [image], [pred[:4]], [gt], loggers=["tensorboard"], tb_dir="unused")
    with pytest.raises(ValueError, match="2 images"):
        log_overlays(0, [image, image], [pred], [gt], loggers=[], tb_dir=None)
