"""Image frames end to end, in both coordinate conventions: the policy answers in its own frame, everything else is at the original size.

Two policy families (docs/method.md, "Image frames"): Qwen2.5-VL (``pixels``: absolute pixels of its
processor-resized image, patch 14 x merge 2 = 28-px steps) and Qwen3-VL (``norm1000``: a 0-1000 grid
relative to the image, patch 16 x merge 2 = 32-px steps). For each, a row is converted from an image
far larger than the full-size recipe's ``max_pixels`` (2000 x 1300) and from one smaller than its
``min_pixels`` (200 x 150). The policy's frame is read off what the policy is actually shown (the row
rendered as verl's agent loop renders it, with a processor of the family's shape under the recipe's
limits); a box drawn around an object *in that image*, written in the family's convention, must,
through every reader of policy answers (the box reward, the trainer's parse for mask rewards and
validation, BTO's buffer, the evaluation predictor), select that object in the original-resolution
mask. The other family's answer to the same row is never a good one: every reader that knows the
policy's convention refuses the row, and read blindly it misses the object or is rejected. The
"tool" that turns the box into a mask here is the box fill (the objects are rectangles, so a correct
box is a near-perfect mask); the SAM2 tool is run once to show it segments the original image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image
from transformers import (
    AutoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from verl_grto.assets.qwen25vl import qwen_vl_processor
from verl_grto.data.check import check_row
from verl_grto.data.convert.base import Sample, Task, load_image, policy_frame, run_conversion
from verl_grto.data.frame import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    NORM1000,
    PIXELS,
    FrameMismatchError,
    PolicyFrame,
    ResizeLimits,
    default_limits,
    qwen_vl_utils_defaults,
)
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.data.synthetic import generate_split
from verl_grto.eval.baselines import fill_boxes
from verl_grto.eval.metrics import intersection_union, sample_iou
from verl_grto.policy.inputs import render_row
from verl_grto.reward.answer import parse_answer
from verl_grto.reward.box_reward import compute_score, score_box_answer
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
#: convention -> (the full-size recipe base that names it, the family's vision patch size)
FAMILIES = {
    PIXELS: ("qwen25vl_7b_sam21_large_base.yaml", 14),
    NORM1000: ("qwen3vl_sam21_large_base.yaml", 16),
}
OTHER = {PIXELS: NORM1000, NORM1000: PIXELS}
CASES = [(scene, coords) for scene in sorted(SCENES) for coords in FAMILIES]


def _recipe_limits(coords: str) -> ResizeLimits:
    """The family's full-size recipe's processor limits, with the family's factor."""
    recipe, patch = FAMILIES[coords]
    kwargs = OmegaConf.load(ROOT / "recipes" / recipe).data.mm_processor_kwargs
    return ResizeLimits(int(kwargs.min_pixels), int(kwargs.max_pixels), patch * 2)


def _build_processor(coords: str) -> Any:
    """A processor of the family's shape (Qwen2.5-VL's, or Qwen3-VL's with its video processor) under the
    recipe's limits, around the tiny tokenizer."""
    limits = _recipe_limits(coords)
    _, patch = FAMILIES[coords]
    classes = (
        (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor) if coords == PIXELS else (Qwen3VLProcessor, Qwen3VLVideoProcessor)
    )
    tokenizer = AutoProcessor.from_pretrained(SHIPPED_POLICY).tokenizer
    return qwen_vl_processor(
        *classes, tokenizer, min_pixels=limits.min_pixels, max_pixels=limits.max_pixels, patch_size=patch
    )


@pytest.fixture(scope="module")
def processors() -> dict[str, Any]:
    return {coords: _build_processor(coords) for coords in FAMILIES}


def _policy(coords: str, processors: dict[str, Any]) -> PolicyFrame:
    """The frame a run of the family's recipe checks rows against (the trainer's ``PolicyFrame.from_recipe``)."""
    recipe, _ = FAMILIES[coords]
    return PolicyFrame.from_recipe(OmegaConf.load(ROOT / "recipes" / recipe).data, processors[coords])


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
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """One converted row per scene and convention, referring to the red object (written and read back as parquet)."""
    tmp = tmp_path_factory.mktemp("frames")
    out = {}
    for name, coords in CASES:
        image, masks = _scene(name)
        path = tmp / f"{name}.png"
        Image.fromarray(image).save(path)

        def build(path: Path = path, masks: dict = masks, name: str = name) -> list[Sample]:
            return [Sample(f"{name}-red", load_image(path), masks["red"], "the red rectangle")]

        folder = tmp / f"{name}-{coords}"
        frame = policy_frame(
            coords
        )  # the converters' defaults for the family (verl-grto data convert --opt coords=...)
        run_conversion(name, name, {"val": [Task(path, name, build)]}, folder, progress=False, frame=frame)
        out[(name, coords)] = pq.read_table(folder / "val.parquet").to_pylist()[0]
        out[(name, coords, "path")] = str(folder / "val.parquet")
    return out


def _shown(row: dict, processor: Any) -> Image.Image:
    """The image the policy is shown, rendered as verl's agent loop renders the row."""
    _, images = render_row(row, processor)
    assert len(images) == 1
    return images[0]


def _box_in(image: Image.Image, colour: str) -> list[int]:
    """The tight box of a colour's pixels in an image (x2/y2 exclusive): the box a perfect policy sees."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    near = np.abs(rgb - np.array(COLOURS[colour])).sum(-1) < 60
    ys, xs = np.nonzero(near)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _perfect_box(row: dict, coords: str, processors: dict[str, Any]) -> list[int]:
    """The red object's box as a perfect policy of the family answers it: pixels of the image it is shown,
    or that box on the 0-1000 grid (rounded to integers, as Qwen3-VL writes them)."""
    shown = _shown(row, processors[coords])
    box = _box_in(shown, "red")
    if coords == PIXELS:
        return box
    w, h = shown.size
    return [round(v * 1000 / (w if k % 2 == 0 else h)) for k, v in enumerate(box)]


def _answer(box: list[int]) -> str:
    return f'<think>the red one</think><answer>[{{"bbox_2d": {json.dumps(box)}, "label": "red"}}]</answer>'


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return sample_iou(*intersection_union(a, b))


@pytest.mark.parametrize("coords", sorted(FAMILIES))
def test_the_recipe_limits_are_the_converters_defaults(coords: str) -> None:
    limits = _recipe_limits(coords)
    assert limits == default_limits(limits.factor) == policy_frame(coords).limits
    assert limits.factor == {PIXELS: 28, NORM1000: 32}[coords]
    if coords == PIXELS:
        assert limits == ResizeLimits(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize(("name", "coords"), CASES)
def test_stored_processor_and_reward_sizes_agree(name: str, coords: str, rows: dict, processors: dict) -> None:
    row = rows[(name, coords)]
    processor = processors[coords]
    (w, h), _ = SCENES[name]
    limits = _recipe_limits(coords)
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    frame = limits.size(h, w)
    assert frame != (h, w)  # the resize is not a no-op for either image
    if name == "large":
        assert h * w > limits.max_pixels >= frame[0] * frame[1]
    else:
        assert h * w < limits.min_pixels <= frame[0] * frame[1]
    # stored: the ground truth names the convention, the shown size and the factor; image and masks stay original
    assert gt.image_size == (h, w) and decode_rle(gt.mask_rle).shape == (h, w)
    assert (gt.answer_coords, gt.answer_size, gt.resize_factor) == (coords, frame, limits.factor)
    instruction = row["prompt"][0]["content"]
    if coords == PIXELS:  # the instruction names the frame the answer is in
        assert f"The image is {frame[1]}x{frame[0]} pixels." in instruction
    else:  # ... or the grid, and no size
        assert "from 0 to 1000 on each axis" in instruction and "pixels" not in instruction
    assert row["images"][0]["min_pixels"] == limits.min_pixels and row["images"][0]["max_pixels"] == limits.max_pixels
    # the processor: the image verl's pipeline shows the policy, and the processor's patch grid of it
    shown = _shown(row, processor)
    assert (shown.height, shown.width) == frame
    patch = processor.image_processor.patch_size
    grid = processor(text=["<|image_pad|>"], images=[shown], **limits.image_keys())["image_grid_thw"][0].tolist()
    assert (grid[1] * patch, grid[2] * patch) == frame
    # the reward: answers are read on the convention's grid (its far corner is inside, one more is not)
    gh, gw = frame if coords == PIXELS else (1000, 1000)
    assert gt.answer_frame == (gh, gw)
    inside = parse_policy_answer(_answer([0, 0, gw, gh]), gt)
    assert inside.ok and inside.objects[0].box == pytest.approx((0, 0, w, h))
    assert "outside" in parse_policy_answer(_answer([0, 0, gw + 1, gh]), gt).reason
    assert "outside" in parse_policy_answer(_answer([0, 0, gw, gh + 1]), gt).reason
    # the data check, as a run of the family's recipe makes it (its convention, processor factor and limits)
    policy = _policy(coords, processors)
    assert (policy.coords, policy.factor, policy.limits) == (coords, limits.factor, limits)
    assert check_row(row) == check_row(row, policy) == []


@pytest.mark.parametrize(("name", "coords"), CASES)
def test_a_box_in_the_policys_frame_selects_the_object_on_every_path(
    name: str, coords: str, rows: dict, processors: dict
) -> None:
    from verl_grto.algorithm.bto.build import make_records
    from verl_grto.eval.inference import PolicyToolPredictor
    from verl_grto.trainer.grto_trainer import _parse_view

    row = rows[(name, coords)]
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    _, masks = _scene(name)
    h, w = gt.image_size
    text = _answer(_perfect_box(row, coords, processors))

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
    assert compute_score("x", text, row["reward_model"]["ground_truth"], answer_coords=coords)["box_iou"] >= 0.95
    # BTO's buffer stores the prompts the tool trains on, in the original frame
    (record,) = make_records(row, [(text, [0.0])])
    assert record.parse_ok
    assert json.loads(record.prompts)[0]["box"] == pytest.approx(list(parsed.objects[0].box))
    # evaluate / predict: the predictor reads the answer in the policy's frame (with or without ground truth)
    predictor = object.__new__(PolicyToolPredictor)
    predictor.policy = SimpleNamespace(processor=processors[coords])
    bare = {k: v for k, v in row.items() if k != "reward_model"}
    for r in (row, bare):
        assert predictor.parse(r, text, (h, w)).objects == parsed.objects
    # read in the original frame instead, the same box misses the object (or is rejected)
    wrong = parse_answer(text, (h, w))
    if wrong.ok:
        assert _iou(mask_of(wrong.objects[0].box), masks["red"]) < 0.9


@pytest.mark.parametrize(("name", "coords"), CASES)
def test_a_box_in_the_wrong_convention_is_never_scored_as_a_good_answer(
    name: str, coords: str, rows: dict, processors: dict, tmp_path: Path
) -> None:
    """The other family's perfect answer to this row: refused by every reader that knows the policy's
    convention, and, read blindly in the row's, rejected or far from the object."""
    from verl_grto.eval.inference import PolicyToolPredictor
    from verl_grto.trainer.data_preflight import BadDataError, preflight_data

    other = OTHER[coords]
    row = rows[(name, coords)]
    gt_json = row["reward_model"]["ground_truth"]
    gt = GroundTruth.from_json(gt_json)
    _, masks = _scene(name)
    h, w = gt.image_size
    text = _answer(_perfect_box(rows[(name, other)], other, processors))  # the other family's policy, same image
    # refused, not scored: the rewards told the policy's convention, the predictor, the run-start data check
    with pytest.raises(FrameMismatchError, match=f"asks for {coords} coordinates but the policy answers in {other}"):
        parse_policy_answer(text, gt, other)
    with pytest.raises(FrameMismatchError):
        compute_score("x", text, gt_json, answer_coords=other)
    predictor = object.__new__(PolicyToolPredictor)
    predictor.policy = SimpleNamespace(processor=processors[other])
    with pytest.raises(FrameMismatchError):
        predictor.parse(row, text, (h, w))
    policy = _policy(other, processors)
    assert any(f"asks for {coords} coordinates" in p for p in check_row(row, policy))
    with pytest.raises(BadDataError, match=f"asks for {coords} coordinates"):
        preflight_data([rows[(name, coords, "path")]], [], "fail", tmp_path / "run", policy)
    # read blindly in the row's convention: rejected, or a box that is not a good answer (IoU < 0.5)
    blind = score_box_answer(text, gt)
    assert not blind.parse_ok or blind.box_iou < 0.5
    parsed = parse_policy_answer(text, gt)
    if parsed.ok:
        assert _iou(fill_boxes([parsed.objects[0].box], h, w), masks["red"]) < 0.5


def test_the_tool_segments_the_original_image_from_the_mapped_prompt(rows: dict, processors: dict) -> None:
    from verl_grto.eval.inference import ToolSegmenter

    for coords in FAMILIES:
        row = rows[("large", coords)]
        gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
        parsed = parse_policy_answer(_answer(_perfect_box(row, coords, processors)), gt)
        image = np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")).copy()
        (mask,), used, _ = ToolSegmenter(SHIPPED_TOOL).segment([image], [list(parsed.objects)])
        assert mask.shape == gt.image_size and used == [1]


def _edited(row: dict, **changes: Any) -> dict:
    """A copy of ``row`` with ground-truth keys changed (None: removed)."""
    copy = json.loads(json.dumps(row, default=lambda b: b.decode("latin1")))
    copy["images"][0]["bytes"] = row["images"][0]["bytes"]
    gt = json.loads(copy["reward_model"]["ground_truth"])
    for key, value in changes.items():
        if value is None:
            gt.pop(key, None)
        else:
            gt[key] = value
    copy["reward_model"]["ground_truth"] = json.dumps(gt)
    return copy


def test_a_stated_frame_that_is_not_the_resize_is_refused(rows: dict, processors: dict) -> None:
    row = rows[("large", PIXELS)]
    (problem,) = check_row(_edited(row, answer_size=[1300, 2000]))
    assert "answer_size is 1300x2000 (HxW) but the policy is shown the image at 784x1232 (HxW)" in problem
    # a Qwen3-VL row whose factor is not the one its size was resized with
    q3 = rows[("large", NORM1000)]
    (problem,) = check_row(_edited(q3, resize_factor=28))
    assert "answer_size is 896x1408 (HxW) but the policy is shown the image at 896x1400 (HxW)" in problem
    # a row converted for the other factor, checked for a Qwen3-VL policy
    (problem,) = check_row(_edited(q3, resize_factor=28, answer_size=[896, 1400]), _policy(NORM1000, processors))
    assert "resize_factor is 28 but the policy's processor resizes in steps of 32" in problem
    # rows written before resize_factor were Qwen2.5-VL's: read as 28, as the row they were
    assert check_row(_edited(row, resize_factor=None)) == []
    for bad, reason in (("answer_coords", "one of pixels, norm1000, got 'percent'"), ("resize_factor", "positive")):
        (problem,) = check_row(_edited(row, **{bad: "percent" if bad == "answer_coords" else 0}))
        assert problem.startswith(f"ground truth '{bad}' must be") and reason in problem


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
    assert gt.answer_size is None and gt.answer_frame == gt.image_size == (112, 112) and gt.answer_coords == PIXELS
    assert "answer_coords" not in json.loads(row["reward_model"]["ground_truth"])  # written as before
    assert "min_pixels" not in row["images"][0]  # the synthetic rows are written as before
    assert _shown(row, tiny).size == (112, 112)
    text = '<think></think><answer>{"bbox": [10.5, 20, 60, 91]}</answer>'
    assert parse_policy_answer(text, gt) == parse_answer(text, (112, 112))
    assert check_row(row) == check_row(row, PolicyFrame.from_processor(tiny, PIXELS)) == []


def test_the_tiny_qwen3vl_scenes_are_shown_at_32px_steps_and_read_on_the_grid(tmp_path: Path) -> None:
    """The tiny Qwen3-VL's rows: the same 112 px scenes, shown at 128 x 128 (a multiple of 32), answered on
    the 0-1000 grid, so the mapping does not depend on the resize."""
    from verl_grto.assets.qwen3vl import build_tiny_qwen3vl

    processor = AutoProcessor.from_pretrained(build_tiny_qwen3vl(tmp_path / "q3"))
    policy = PolicyFrame.from_processor(processor, NORM1000)
    assert (policy.coords, policy.factor) == (NORM1000, 32)
    (rl_row,) = generate_split(1, seed=0, domain="camouflage", split="val", coords=NORM1000)
    row = rl_row.to_record()
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    assert gt.answer_coords == NORM1000 and gt.answer_frame == (1000, 1000) and gt.image_size == (112, 112)
    assert row["prompt"][0]["content"].endswith("on the 0-1000 grid.")
    ids, (shown,) = render_row(row, processor)
    assert shown.size == (128, 128)
    assert ids.count(processor.image_token_id) == (128 // 32) ** 2
    x1, y1, x2, y2 = gt.boxes[0]
    grid_box = [round(x1 * 1000 / 112), round(y1 * 1000 / 112), round(x2 * 1000 / 112), round(y2 * 1000 / 112)]
    parsed = parse_policy_answer(_answer(grid_box), gt, NORM1000)
    assert parsed.objects[0].box == pytest.approx((x1, y1, x2, y2), abs=112 / 1000)
    assert check_row(row, policy) == []
    with pytest.raises(ValueError, match="grounds in norm1000"):  # a recipe naming pixels for a Qwen3-VL policy
        PolicyFrame.from_processor(processor, PIXELS)
    (problem,) = check_row(row, PolicyFrame.from_processor(AutoProcessor.from_pretrained(SHIPPED_POLICY)))
    assert "asks for norm1000 coordinates but the policy answers in pixels" in problem


@pytest.mark.parametrize("coords", sorted(FAMILIES))
def test_rows_converted_under_other_limits_than_the_recipes_are_refused(
    coords: str, rows: dict, processors: dict, tmp_path: Path
) -> None:
    from verl_grto.trainer.data_preflight import BadDataError, preflight_data

    row = rows[("large", coords)]
    policy = _policy(coords, processors)
    assert check_row(row, policy) == []
    smaller = PolicyFrame(coords, policy.factor, ResizeLimits(policy.limits.min_pixels, 500_000, policy.factor))
    (problem,) = check_row(row, smaller)
    assert "is resized again to" in problem and "data.mm_processor_kwargs" in problem
    path = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(Path(rows[("large", coords, "path")])), path)
    assert preflight_data([str(path)], [], "fail", tmp_path / "run", policy).problems == []
    with pytest.raises(BadDataError, match="resized again"):  # the cached result is not reused for another frame
        preflight_data([str(path)], [], "fail", tmp_path / "run", smaller)


def test_the_converters_take_the_policys_convention_from_the_command_line() -> None:
    """``verl-grto data convert <dataset> --opt coords=norm1000`` converts for Qwen3-VL (factor 32, its limits)."""
    from verl_grto.data.convert import CONVERTERS
    from verl_grto.data.convert.options import parse_options

    for name in CONVERTERS:
        opts = parse_options(CONVERTERS[name], ["coords=norm1000", "factor=32"])
        assert opts == {"coords": NORM1000, "factor": 32}
    assert policy_frame(NORM1000) == PolicyFrame(NORM1000, 32, default_limits(32))
    assert policy_frame(PIXELS, 14) == PolicyFrame(PIXELS, 14, default_limits(14))  # e.g. the tiny Qwen2.5-VL's
    with pytest.raises(ValueError, match="option coords must be one of pixels, norm1000, got 'percent'"):
        policy_frame("percent")
