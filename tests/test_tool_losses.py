"""Tool losses against hand computations, limits and gradient direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from verl_grto.tool.losses import (
    LossConfig,
    bce_loss,
    dice_loss,
    mask_iou,
    segmentation_losses,
    weighted_mean,
)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_bce_and_dice_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 5, 7))
    targets = (rng.random((3, 5, 7)) > 0.6).astype(np.float64)
    p = _np_sigmoid(logits)
    bce_ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).reshape(3, -1).mean(1)
    inter = (p * targets).reshape(3, -1).sum(1)
    dice_ref = 1 - (2 * inter + 1) / (p.reshape(3, -1).sum(1) + targets.reshape(3, -1).sum(1) + 1)
    t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(targets)
    np.testing.assert_allclose(bce_loss(t_logits, t_targets).numpy(), bce_ref, rtol=1e-10)
    np.testing.assert_allclose(dice_loss(t_logits, t_targets, smooth=1.0).numpy(), dice_ref, rtol=1e-10)


def test_perfect_prediction_has_near_zero_loss_and_wrong_one_high():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 3:9] = 1
    perfect = (target * 2 - 1) * 30
    assert dice_loss(perfect, target).item() < 1e-6 and bce_loss(perfect, target).item() < 1e-6
    assert dice_loss(-perfect, target).item() > 0.99
    empty = torch.full((1, 16, 16), -30.0)
    assert dice_loss(empty, torch.zeros(1, 16, 16)).item() < 1e-6  # empty vs empty is right, not 0/0


def test_gradient_pushes_logits_towards_the_target():
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1
    for loss_fn in (bce_loss, dice_loss):
        logits = torch.zeros(1, 8, 8, requires_grad=True)
        loss_fn(logits, target).sum().backward()
        assert torch.all(logits.grad[target.bool()] < 0), loss_fn.__name__  # descent raises foreground logits
        assert torch.all(logits.grad[~target.bool()] > 0), loss_fn.__name__


def test_mask_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b[0, 1:3] = True  # 4 shared of 12 -> 1/3
    a[1] = True  # vs empty -> 0
    assert mask_iou(a, b).tolist() == pytest.approx([1 / 3, 0.0, 1.0])


def test_weighted_mean():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert weighted_mean(losses, [1, 1, 2]).item() == pytest.approx(11 / 4)
    zero = weighted_mean(losses.requires_grad_(), [0, 0, 0])
    assert zero.item() == 0 and zero.requires_grad
    with_nan = torch.tensor([1.0, float("nan")])
    assert weighted_mean(with_nan, [1, 0]).item() == 1.0  # a dropped rollout cannot poison the mean
    assert torch.isnan(weighted_mean(with_nan, [1, 1]))  # ...but a used one is detectable
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(losses, [1, -1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean(losses, [1, 1])


def _gt_square(size: int, lo: int, hi: int) -> np.ndarray:
    gt = np.zeros((size, size), dtype=bool)
    gt[lo:hi, lo:hi] = True
    return gt


def test_low_res_targets_are_area_averaged():
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    gt = _gt_square(8, 2, 6)  # covers half of the border cells of the 4x4 grid
    out = segmentation_losses(logits, [gt], None, LossConfig(dice_weight=0.0))
    expected_target = F.avg_pool2d(torch.from_numpy(gt).float()[None, None], 2)[0]
    assert out.bce.item() == pytest.approx(bce_loss(logits.detach(), expected_target).item())
    assert out.total.item() == pytest.approx(out.bce.item())


def test_original_and_fixed_resolutions_upsample_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4)
    gts = [_gt_square(12, 3, 9), _gt_square(8, 0, 4)]  # images of different sizes
    original = segmentation_losses(logits, gts, None, LossConfig(resolution="original"))
    for i, gt in enumerate(gts):
        up = F.interpolate(logits[i][None, None], size=gt.shape, mode="bilinear", align_corners=False)[0]
        target = torch.from_numpy(gt).float()[None]
        assert original.bce[i].item() == pytest.approx(bce_loss(up, target).item())
        assert original.dice[i].item() == pytest.approx(dice_loss(up, target).item())
    fixed = segmentation_losses(logits, gts, None, LossConfig(resolution=8))
    up = F.interpolate(logits[1][None, None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert fixed.bce[1].item() == pytest.approx(bce_loss(up, torch.from_numpy(gts[1]).float()[None]).item())
    with pytest.raises(ValueError, match="resolution"):
        LossConfig(resolution="high")


def test_iou_head_loss_is_mse_to_the_actual_iou():
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, 0:4, 0:4] = 5.0  # 16 predicted pixels
    gt = _gt_square(8, 0, 2)  # 4 true pixels inside them -> IoU 0.25
    iou_pred = torch.tensor([0.75], requires_grad=True)
    out = segmentation_losses(logits, [gt], iou_pred, LossConfig(iou_weight=2.0))
    assert out.iou.item() == pytest.approx(0.25)
    assert out.iou_loss.item() == pytest.approx(0.25)
    assert out.total.item() == pytest.approx(out.bce.item() + out.dice.item() + 0.5)
    out.total.sum().backward()
    assert iou_pred.grad.item() == pytest.approx(2.0 * 2 * 0.5)
    with pytest.raises(ValueError, match="iou_pred"):
        segmentation_losses(logits, [gt], None, LossConfig(iou_weight=1.0))


def test_non_finite_logits_give_detectable_losses():
    logits = torch.zeros(2, 4, 4)
    logits[1, 0, 0] = float("nan")
    out = segmentation_losses(logits, [np.ones((4, 4), bool)] * 2, None, LossConfig())
    assert torch.isfinite(out.total[0]) and not torch.isfinite(out.total[1])


def test_ignored_pixels_count_in_no_loss_term():
    """ReasonSeg's ignore pixels: a prediction that differs from the target only there has the loss of a
    perfect one; without an ignore region the terms are the plain ones, bit for bit."""
    target = torch.zeros(16, 16, dtype=torch.bool)
    target[4:12, 4:12] = True
    ignore = torch.zeros_like(target)
    ignore[:, :4] = True  # at resolution 8 these are whole columns 0-1: no fractional border
    perfect = torch.where(target, 8.0, -8.0)
    wrong_in_ignore = perfect.clone()
    wrong_in_ignore[:, :4] = 8.0  # claims the ignored columns
    for resolution in ("original", 8):
        cfg = LossConfig(resolution=resolution)
        logits = torch.stack([perfect, wrong_in_ignore])
        with_ignore = segmentation_losses(logits, [target, target], None, cfg, [ignore, ignore])
        plain = segmentation_losses(logits, [target, target], None, cfg)
        assert with_ignore.total[1] == pytest.approx(float(with_ignore.total[0]), abs=1e-4)
        assert plain.total[1] > plain.total[0] + 0.05
        assert with_ignore.iou[1] == pytest.approx(1.0) and plain.iou[1] < 1.0
        unset = segmentation_losses(logits, [target, target], None, cfg, [None, None])
        assert torch.equal(unset.total, plain.total)
