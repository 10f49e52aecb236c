"""Image frames end to end: the policy answers in its processor-resized image, everything else is at the original size.

A row is converted from an image far larger than the full-size recipes' ``max_pixels`` (2000 x 1300)
and from one smaller than their ``min_pixels`` (200 x 150). The policy's frame is read off what the
policy is actually shown (the row rendered as verl's agent loop renders it, with a Qwen2.5-VL-shaped
processor under the recipe's limits); a box drawn around an object *in that image* must, through
every reader of policy answers (the box reward, the trainer's parse for mask rewards and validation,
BTO's buffer, the evaluation predictor), select that object in the original-resolution mask. The
"tool" that turns the box into a mask here is the box fill (the objects are rectangles, so a correct
box is a near-perfect mask); the SAM2 tool is run once to show it segments the original image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

from verl_grto.assets.tokenizer import CHAT_TEMPLATE
from verl_grto.data.check import check_row
from verl_grto.data.convert.base import Sample, Task, load_image, run_conversion
from verl_grto.data.frame import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ResizeLimits, qwen_vl_utils_defaults
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.data.synthetic import generate_split
from verl_grto.eval.baselines import fill_boxes
from verl_grto.eval.metrics import intersection_union, sample_iou
from verl_grto.policy.inputs import render_row
from verl_grto.reward.answer import parse_answer
from verl_grto.reward.box_reward import score_box_answer
from verl_grto.reward.frame import parse_policy_answer
from verl_grto.reward.mask_reward import MaskRewardConfig, score_mask_answer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_POLICY = ROOT / "verl_grto/assets/shipped/seed0/tiny_qwen25vl_warm"
SHIPPED_TOOL = ROOT / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
# (width, height) and the objects as [x1, y1, x2, y2] (x2/y2 exclusive) in the original image
SCENES = {
    "large": ((2000, 1300), {"red": (300, 200, 900, 700), "blue": (1200, 500, 1800, 1100)}),
    "small": ((200, 150), {"red": (20, 30, 90, 100), "blue": (110, 40, 180, 130)}),
}


def _recipe_limits() -> ResizeLimits:
    kwargs = OmegaConf.load(ROOT / "recipes/qwen25vl_7b_sam21_large_base.yaml").data.mm_processor_kwargs
    return ResizeLimits(int(kwargs.min_pixels), int(kwargs.max_pixels))


@pytest.fixture(scope="module")
def processor() -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor shape (patch 14, merge 2) under the recipe's limits, around the tiny tokenizer."""
    limits = _recipe_limits()
    common = {
        "min_pixels": limits.min_pixels,
        "max_pixels": limits.max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    tokenizer = AutoProcessor.from_pretrained(SHIPPED_POLICY).tokenizer
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=CHAT_TEMPLATE,
    )


def _scene(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    (w, h), objects = SCENES[name]
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    masks = {}
    for colour, (x1, y1, x2, y2) in objects.items():
        image[y1:y2, x1:x2] = COLOURS[colour]
        masks[colour] = np.zeros((h, w), dtype=bool)
        masks[colour][y1:y2, x1:x2] = True
    return image, masks


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One converted row per scene, referring to the red object (written and read back as parquet)."""
    tmp = tmp_path_factory.mktemp("frames")
    out = {}
    for name in SCENES:
        image, masks = _scene(name)
        path = tmp / f"{name}.png"
        Image.fromarray(image).save(path)

        def build(path: Path = path, masks: dict = masks, name: str = name) -> list[Sample]:
            return [Sample(f"{name}-red", load_image(path), masks["red"], "the red rectangle")]

        run_conversion(name, name, {"val": [Task(path, name, build)]}, tmp / name, progress=False)
        out[name] = pq.read_table(tmp / name / "val.parquet").to_pylist()[0]
        out[f"{name}_path"] = str(tmp / name / "val.parquet")
    return out


def _shown(row: dict, processor: Qwen2_5_VLProcessor) -> Image.Image:
    """The image the policy is shown, rendered as verl's agent loop renders the row."""
    _, images = render_row(row, processor)
    assert len(images) == 1
    return images[0]


def _box_in(image: Image.Image, colour: str) -> list[int]:
    """The tight box of a colour's pixels in an image (x2/y2 exclusive): the box a perfect policy answers."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    near = np.abs(rgb - np.array(COLOURS[colour])).sum(-1) < 60
    ys, xs = np.nonzero(near)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _answer(box: list[int]) -> str:
    return f'<think>the red one</think><answer>[{{"bbox_2d": {json.dumps(box)}, "label": "red"}}]</answer>'


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return sample_iou(*intersection_union(a, b))


def test_the_recipe_limits_are_the_converters_defaults() -> None:
    assert _recipe_limits() == ResizeLimits() == ResizeLimits(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(SCENES))
def test_stored_processor_and_reward_sizes_agree(name: str, rows: dict, processor: Qwen2_5_VLProcessor) -> None:
    row = rows[name]
    (w, h), _ = SCENES[name]
    limits = _recipe_limits()
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    frame = limits.size(h, w)
    assert frame != (h, w)  # the resize is not a no-op for either image
    if name == "large":
        assert h * w > limits.max_pixels >= frame[0] * frame[1]
    else:
        assert h * w < limits.min_pixels <= frame[0] * frame[1]
    # stored: the ground truth and the instruction name the frame; image and masks stay original
    assert gt.image_size == (h, w) and decode_rle(gt.mask_rle).shape == (h, w)
    assert gt.answer_size == frame
    assert f"The image is {frame[1]}x{frame[0]} pixels." in row["prompt"][0]["content"]
    assert row["images"][0]["min_pixels"] == limits.min_pixels and row["images"][0]["max_pixels"] == limits.max_pixels
    # the processor: the image verl's pipeline shows the policy, and the processor's patch grid of it
    shown = _shown(row, processor)
    assert (shown.height, shown.width) == frame
    grid = processor(text=["<|image_pad|>"], images=[shown], **limits.image_keys())["image_grid_thw"][0].tolist()
    assert (grid[1] * 14, grid[2] * 14) == frame
    # the reward: answers are read in the frame (its far corner is inside, one pixel more is not)
    fh, fw = frame
    inside = parse_policy_answer(_answer([0, 0, fw, fh]), gt)
    assert inside.ok and inside.objects[0].box == pytest.approx((0, 0, w, h))
    assert "outside" in parse_policy_answer(_answer([0, 0, fw + 1, fh]), gt).reason
    assert check_row(row) == []


@pytest.mark.parametrize("name", sorted(SCENES))
def test_a_box_in_the_policys_frame_selects_the_object_on_every_path(
    name: str, rows: dict, processor: Qwen2_5_VLProcessor
) -> None:
    from verl_grto.algorithm.bto.build import make_records
    from verl_grto.eval.inference import PolicyToolPredictor
    from verl_grto.trainer.grto_trainer import _parse_view

    row = rows[name]
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    _, masks = _scene(name)
    h, w = gt.image_size
    shown = _shown(row, processor)
    text = _answer(_box_in(shown, "red"))

    def mask_of(box: tuple[float, ...]) -> np.ndarray:
        return fill_boxes([box], h, w)

    # training rewards and validation (GRTOTrainer._parse_view), and the agent loop's box reward
    (parsed,), _ = _parse_view(SimpleNamespace(texts=[text], ground_truths=[gt]))
    gt_mask = decode_rle(gt.mask_rle)
    assert parsed.ok
    pred = mask_of(parsed.objects[0].box)
    assert gt_mask.shape == (h, w)
    assert _iou(pred, masks["red"]) >= 0.95 > 0.05 > _iou(pred, masks["blue"])
    reward = score_mask_answer(parsed, pred, gt, gt_mask, MaskRewardConfig())
    assert reward.mask_iou >= 0.95
    assert score_box_answer(text, gt).box_iou >= 0.95
    # BTO's buffer stores the prompts the tool trains on, in the original frame
    (record,) = make_records(row, [(text, [0.0])])
    assert record.parse_ok
    assert json.loads(record.prompts)[0]["box"] == pytest.approx(list(parsed.objects[0].box))
    # evaluate / predict: the predictor reads the answer in the frame of the row (with or without ground truth)
    predictor = object.__new__(PolicyToolPredictor)
    predictor.policy = SimpleNamespace(processor=processor)
    bare = {k: v for k, v in row.items() if k != "reward_model"}
    for r in (row, bare):
        assert predictor.parse(r, text, (h, w)).objects == parsed.objects
    # read in the original frame instead (the old convention), the same box misses the object
    wrong = parse_answer(text, (h, w))
    if wrong.ok:
        assert _iou(mask_of(wrong.objects[0].box), masks["red"]) < 0.9


def test_the_tool_segments_the_original_image_from_the_mapped_prompt(rows: dict, processor) -> None:
    from verl_grto.eval.inference import ToolSegmenter

    row = rows["large"]
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    parsed = parse_policy_answer(_answer(_box_in(_shown(row, processor), "red")), gt)
    image = np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")).copy()
    (mask,), used, _ = ToolSegmenter(SHIPPED_TOOL).segment([image], [list(parsed.objects)])
    assert mask.shape == gt.image_size and used == [1]


def test_a_stated_frame_that_is_not_the_resize_is_refused(rows: dict) -> None:
    row = json.loads(json.dumps(rows["large"], default=lambda b: b.decode("latin1")))
    row["images"][0]["bytes"] = rows["large"]["images"][0]["bytes"]
    gt = json.loads(row["reward_model"]["ground_truth"])
    gt["answer_size"] = gt["image_size"]
    row["reward_model"]["ground_truth"] = json.dumps(gt)
    (problem,) = check_row(row)
    assert "answer_size is 1300x2000 (HxW) but the policy is shown the image at 784x1232 (HxW)" in problem


def test_the_tiny_scenes_are_a_fixed_point_and_their_answers_are_not_mapped() -> None:
    tiny = AutoProcessor.from_pretrained(SHIPPED_POLICY)
    image_processor = tiny.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    for limits in (
        ResizeLimits(image_processor.size["shortest_edge"], image_processor.size["longest_edge"], factor),
        qwen_vl_utils_defaults(factor),  # what verl's fetch_image applies to an entry without limits
    ):
        assert limits.is_fixed_point(112, 112)
    (rl_row,) = generate_split(1, seed=0, domain="camouflage", split="val")
    row = rl_row.to_record()
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    assert gt.answer_size is None and gt.answer_frame == gt.image_size == (112, 112)
    assert "min_pixels" not in row["images"][0]  # the synthetic rows are written as before
    assert _shown(row, tiny).size == (112, 112)
    text = '<think></think><answer>{"bbox": [10.5, 20, 60, 91]}</answer>'
    assert parse_policy_answer(text, gt) == parse_answer(text, (112, 112))
    assert check_row(row) == []


def test_rows_converted_under_other_limits_than_the_recipes_are_refused(rows: dict, tmp_path: Path) -> None:
    from verl_grto.trainer.data_preflight import BadDataError, preflight_data

    row = rows["large"]
    assert check_row(row, _recipe_limits()) == []
    smaller = ResizeLimits(DEFAULT_MIN_PIXELS, 500_000)
    (problem,) = check_row(row, smaller)
    assert "is resized again to" in problem and "data.mm_processor_kwargs" in problem
    path = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(Path(rows["large_path"])), path)
    assert preflight_data([str(path)], [], "fail", tmp_path / "run", _recipe_limits()).problems == []
    with pytest.raises(BadDataError, match="resized again"):  # the cached result is not reused for other limits
        preflight_data([str(path)], [], "fail", tmp_path / "run", smaller)
