"""SegmentationTool and its preprocessing: parity with transformers, gradients, OR of objects, bad prompts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tool_helpers import random_image, tiny_tool
from transformers import Sam2ImageProcessor, Sam2Processor

from verl_grto.tool.losses import dice_loss
from verl_grto.tool.model import EMPTY_LOGIT, SegmentationTool
from verl_grto.tool.preprocess import image_to_pixels, logits_to_original, scale_coords
from verl_grto.tool.prompts import ObjectPrompt, sanitize_prompt

H, W = 96, 160  # deliberately neither square nor the model size
BOX = ObjectPrompt((10.0, 20.0, 100.0, 80.0))
POINTS = ObjectPrompt(None, ((30.0, 40.0), (120.0, 10.0)), (1, 0))
BOTH = ObjectPrompt((50.0, 10.0, 150.0, 90.0), ((90.0, 50.0),), (1,))


@pytest.fixture(scope="module")
def tool() -> SegmentationTool:
    return tiny_tool(seed=0).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return random_image(np.random.default_rng(0), H, W)


def _decode(tool, image, prompts_per_rollout):
    with torch.no_grad():
        return tool.decode(tool.encode([image]), prompts_per_rollout, [0] * len(prompts_per_rollout))


# ---- preprocessing against transformers' processor ------------------------------------------


def test_preprocessing_matches_sam2_processor(image):
    size = 128
    processor = Sam2Processor(
        image_processor=Sam2ImageProcessor(size={"height": size, "width": size}), target_size=size
    )
    ref = processor(
        images=image,
        input_boxes=[[list(BOX.box)]],
        input_points=[[[list(p) for p in POINTS.points]]],
        input_labels=[[list(POINTS.labels)]],
        return_tensors="pt",
    )
    assert torch.equal(ref["pixel_values"][0], image_to_pixels(image, size))
    assert torch.equal(ref["input_boxes"][0, 0], scale_coords(torch.tensor(BOX.box).view(2, 2), (H, W), size).view(4))
    assert torch.equal(ref["input_points"][0, 0], scale_coords(torch.tensor(POINTS.points), (H, W), size))
    low_res = torch.randn(3, 32, 32)
    upsampled = processor.post_process_masks([low_res[:, None]], [(H, W)], binarize=False)[0][:, 0]
    assert torch.equal(upsampled, logits_to_original(low_res, (H, W)))


def test_preprocessing_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        image_to_pixels(np.zeros((8, 8, 3), dtype=np.float32), 32)


# ---- decoding: parity, cache, grouping ---------------------------------------------------


@pytest.mark.parametrize("prompt", [BOX, POINTS, BOTH], ids=["box", "points", "box+points"])
def test_decode_from_cache_equals_sam2model_forward(tool, image, prompt):
    """Cached encode + decode == transformers' one-shot forward on pixels (no cache)."""
    size = tool.image_size
    kwargs = {}
    if prompt.box is not None:
        kwargs["input_boxes"] = scale_coords(torch.tensor(prompt.box).view(2, 2), (H, W), size).view(1, 1, 4)
    if prompt.points:
        kwargs["input_points"] = scale_coords(torch.tensor(prompt.points), (H, W), size)[None, None]
        kwargs["input_labels"] = torch.tensor(prompt.labels)[None, None]
    with torch.no_grad():
        ref = tool.model(pixel_values=image_to_pixels(image, size)[None], multimask_output=False, **kwargs)
    out = _decode(tool, image, [[prompt]])
    torch.testing.assert_close(out.mask_logits[0], ref.pred_masks[0, 0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iou_pred[0], ref.iou_scores[0, 0, 0], atol=1e-6, rtol=1e-6)
    assert out.num_objects.tolist() == [1] and out.prompt_issues == [[]]


def test_mixed_prompt_kinds_in_one_batch_equal_separate_calls(tool, image):
    """Objects are grouped by prompt shape; batching must not change any result (no padding tokens)."""
    prompts = [[BOX], [POINTS], [BOTH], [BOX]]
    together = _decode(tool, image, prompts)
    for i, p in enumerate(prompts):
        alone = _decode(tool, image, [p])
        torch.testing.assert_close(together.mask_logits[i], alone.mask_logits[0], atol=1e-5, rtol=1e-5)


def test_rollouts_on_several_images(tool, image):
    other = random_image(np.random.default_rng(1), 128, 128)
    with torch.no_grad():
        features = tool.encode([image, other])
        both = tool.decode(features, [[BOX], [BOX]], [1, 0])
        single = tool.decode(tool.encode([other]), [[BOX]], [0])
    torch.testing.assert_close(both.mask_logits[0], single.mask_logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both.mask_logits[0], both.mask_logits[1])
    with pytest.raises(IndexError):
        tool.decode(features, [[BOX]], [2])


def test_multi_object_answer_is_the_max_of_object_logits(tool, image):
    out = _decode(tool, image, [[BOX, POINTS], [BOX], [POINTS]])
    torch.testing.assert_close(out.mask_logits[0], torch.maximum(out.mask_logits[1], out.mask_logits[2]))
    union = (out.mask_logits[1] > 0) | (out.mask_logits[2] > 0)
    assert torch.equal(out.mask_logits[0] > 0, union)
    assert out.iou_pred[0] == pytest.approx(float(out.iou_pred[1:].mean()), abs=1e-6)
    assert out.num_objects.tolist() == [2, 1, 1]


def test_prompt_duck_typing(tool, image):
    """Anything with box/points/labels works (the answer parser's ToolPrompt needs no conversion)."""
    foreign = SimpleNamespace(box=[10, 20, 100, 80], points=[], labels=[])
    a, b = _decode(tool, image, [[foreign]]), _decode(tool, image, [[BOX]])
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


# ---- empty and bad prompts ---------------------------------------------------------------


def test_empty_prompt_lists_give_background_masks(tool, image):
    out = _decode(tool, image, [[], [BOX], []])
    assert out.num_objects.tolist() == [0, 1, 0]
    assert torch.all(out.mask_logits[0] == EMPTY_LOGIT) and torch.all(out.mask_logits[2] == EMPTY_LOGIT)
    assert out.iou_pred[0] == 0
    only_empty = _decode(tool, image, [[], []])
    assert only_empty.mask_logits.shape == (2, 32, 32) and not only_empty.mask_logits.requires_grad
    nothing = _decode(tool, image, [])
    assert nothing.mask_logits.shape[0] == 0


@pytest.mark.parametrize(
    ("bad", "issue"),
    [
        (ObjectPrompt((float("nan"), 0.0, 10.0, 10.0)), "not finite"),
        (ObjectPrompt((200.0, 100.0, 300.0, 200.0)), "outside"),
        (ObjectPrompt((10.0, 10.0, 10.5, 50.0)), "degenerate"),
        (ObjectPrompt((1.0, 2.0, 3.0)), "expected 4"),
        (ObjectPrompt(None, ((500.0, 5.0),), (1,)), "outside"),
        (ObjectPrompt(None, ((float("inf"), 5.0),), (1,)), "not finite"),
        (ObjectPrompt(None, ((5.0, 5.0),), (7,)), "not 0 or 1"),
        (ObjectPrompt(None, ((5.0, 5.0), (6.0, 6.0)), (1,)), "labels"),
        (ObjectPrompt(None), "no usable"),
        (SimpleNamespace(box="abcd", points=(), labels=()), "not numeric"),
    ],
)
def test_unusable_prompts_are_rejected_with_a_reason(tool, image, bad, issue):
    out = _decode(tool, image, [[bad]])
    assert out.num_objects.tolist() == [0]
    assert torch.all(out.mask_logits == EMPTY_LOGIT)
    assert any(issue in reason for reason in out.prompt_issues[0]), out.prompt_issues
    assert torch.isfinite(out.iou_pred).all()


def test_a_bad_object_does_not_spoil_the_good_one(tool, image):
    out = _decode(tool, image, [[BOX, ObjectPrompt((float("nan"),) * 4)], [BOX]])
    assert out.num_objects.tolist() == [1, 1]
    torch.testing.assert_close(out.mask_logits[0], out.mask_logits[1])
    assert out.prompt_issues[0] and not out.prompt_issues[1]


def test_repairable_boxes_are_repaired(tool, image):
    inverted = ObjectPrompt((100.0, 80.0, 10.0, 20.0))
    overhanging = ObjectPrompt((-30.0, 20.0, 400.0, 80.0))
    clipped = ObjectPrompt((0.0, 20.0, float(W), 80.0))
    out = _decode(tool, image, [[inverted], [BOX], [overhanging], [clipped]])
    torch.testing.assert_close(out.mask_logits[0], out.mask_logits[1])
    torch.testing.assert_close(out.mask_logits[2], out.mask_logits[3])
    assert out.prompt_issues[0] == [] and "clipped" in out.prompt_issues[2][0]


def test_sanitize_keeps_valid_points_and_drops_invalid_ones():
    prompt = ObjectPrompt(None, ((5.0, 5.0), (-1.0, 5.0), (7.0, 8.0)), (1, 0, 0))
    clean, issues = sanitize_prompt(prompt, (H, W))
    assert clean is not None and clean.points == ((5.0, 5.0), (7.0, 8.0)) and clean.labels == (1, 0)
    assert len(issues) == 1


# ---- gradients ---------------------------------------------------------------------------


def _backward_through_decode(tool: SegmentationTool, image: np.ndarray) -> None:
    tool.zero_grad(set_to_none=True)
    features = tool.encode([image])
    out = tool.decode(features, [[BOTH], [BOX, POINTS]], [0, 0])
    target = torch.zeros_like(out.mask_logits)
    target[:, 8:20, 5:25] = 1
    (dice_loss(out.mask_logits, target).sum() + out.iou_pred.sum()).backward()


def _grad_names(tool: SegmentationTool) -> set[str]:
    return {n for n, p in tool.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_only_the_mask_decoder(image):
    tool = tiny_tool(seed=1)
    _backward_through_decode(tool, image)
    with_grad = _grad_names(tool)
    trainable = {n for n, p in tool.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tool.model.named_parameters() if n.startswith("mask_decoder.")}
    assert with_grad <= trainable
    for part in ("conv_s0", "conv_s1", "upscale_conv1", "transformer.layers.0", "mask_tokens", "iou_prediction_head"):
        assert any(f"mask_decoder.{part}" in n for n in with_grad), part
    assert not any(p.grad is not None for n, p in tool.model.named_parameters() if n not in trainable)
    assert {id(p) for p in tool.trainable_parameters()} == {
        id(p) for n, p in tool.model.named_parameters() if n in trainable
    }


def test_prompt_encoder_can_be_trainable(image):
    tool = tiny_tool(seed=1, trainable="mask_decoder+prompt_encoder")
    _backward_through_decode(tool, image)
    with_grad = _grad_names(tool)
    assert "prompt_encoder.point_embed.weight" in with_grad and "prompt_encoder.not_a_point_embed.weight" in with_grad
    assert not any(n.startswith(("vision_encoder.", "shared_image_embedding")) for n in with_grad)


def test_frozen_high_res_convs_are_cached_after_projection(image):
    tool = tiny_tool(seed=1, freeze_high_res_convs=True)
    features = tool.encode([image])
    assert features.high_res_projected and features.high_res_features[0].shape[1] == 32 // 8
    _backward_through_decode(tool, image)
    with_grad = _grad_names(tool)
    assert not any("conv_s" in n for n in with_grad) and any("upscale_conv1" in n for n in with_grad)
    trainable = tiny_tool(seed=1)  # same weights: the two caching modes must decode identically
    with torch.no_grad():
        a = tool.decode(features, [[BOTH]], [0]).mask_logits
        b = trainable.decode(trainable.encode([image]), [[BOTH]], [0]).mask_logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_trainable_choice_is_rejected():
    with pytest.raises(ValueError, match="trainable"):
        tiny_tool(trainable="everything")
