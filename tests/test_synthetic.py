"""The synthetic world: semantics, uniqueness, determinism, masks, domains, parquet and verl loading."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from verl_grto.assets.build import AssetPaths
from verl_grto.data.masks import decode_rle, mask_to_box
from verl_grto.data.schema import GroundTruth, build_short_instruction
from verl_grto.data.synthetic import (
    COLORS,
    SCENE_SHAPES,
    Expr,
    Scene,
    SceneObject,
    ensure_synthetic,
    generate_split,
    make_sample,
    make_scene,
    resolve,
    sample_referring,
    write_synthetic,
)

SIZE = 112


# ---------------------------------------------------------------- semantics on a hand-made scene


def _obj(shape: str, color: str, x1: int, y1: int, x2: int, y2: int) -> SceneObject:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return SceneObject(shape=shape, color=color, texture="solid", mask=mask, box=(x1, y1, x2, y2))


@pytest.fixture
def scene() -> Scene:
    #  0: big red circle, left       1: small blue square, middle-top   2: small red square, right
    #  3: blue triangle, below the blue square, about as big as 2
    objs = (
        _obj("circle", "red", 2, 40, 32, 70),  # area 900
        _obj("square", "blue", 45, 5, 60, 20),  # area 225
        _obj("square", "red", 85, 45, 101, 61),  # area 256
        _obj("triangle", "blue", 45, 80, 61, 96),  # area 256
    )
    return Scene(image=np.zeros((SIZE, SIZE, 3), dtype=np.uint8), objects=objs, domain="plain")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (Expr(shape="circle"), (0,)),
        (Expr(color="red"), (0, 2)),
        (Expr(color="red", shape="square"), (2,)),
        (Expr(superlative="largest"), (0,)),
        (Expr(superlative="smallest"), (1, 2, 3)),  # 225 vs 256: within the area ratio, ambiguous
        (Expr(superlative="leftmost"), (0,)),
        (Expr(superlative="topmost"), (1,)),
        (Expr(shape="square", superlative="rightmost"), (2,)),
        (Expr(relation="left of", anchor=Expr(color="blue", shape="square")), (0,)),
        (Expr(relation="right of", anchor=Expr(shape="circle")), (1, 2, 3)),
        (Expr(color="blue", relation="below", anchor=Expr(color="blue", shape="square")), (3,)),
        (Expr(relation="above", anchor=Expr(shape="triangle")), (0, 1, 2)),
        (Expr(color="blue", relation="above", anchor=Expr(shape="triangle")), (1,)),
        (Expr(relation="left of", anchor=Expr(color="red")), ()),  # anchor not unique: refers to nothing
        (Expr(superlative="largest", relation="right of", anchor=Expr(shape="circle")), (1, 2, 3)),
        (Expr(shape="diamond"), ()),
    ],
)
def test_resolve_semantics(scene: Scene, expr: Expr, expected: tuple[int, ...]) -> None:
    assert resolve(expr, scene) == expected


def test_expression_text() -> None:
    e = Expr(superlative="largest", relation="left of", anchor=Expr(shape="circle", color="red"))
    assert e.text() == "the largest shape left of the red circle"
    assert Expr(shape="triangle", superlative="topmost").text() == "the topmost triangle"
    assert e.kind == "relation" and Expr(color="red").kind == "attribute"
    with pytest.raises(ValueError):
        Expr(relation="left of")  # no anchor


# ---------------------------------------------------------------- generated scenes and expressions


def _generated(domain: str, n: int, max_objects: int = 4, seed: int = 0) -> list[tuple[Scene, object]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = make_scene(rng, domain, size=SIZE, max_objects=max_objects)
        out.append((s, sample_referring(s, rng)))
    return out


@pytest.mark.parametrize("domain", ["plain", "camouflage"])
def test_every_expression_refers_to_exactly_its_target(domain: str) -> None:
    kinds = set()
    for scene, ref in _generated(domain, 60):
        assert resolve(ref.expr, scene) == (ref.target,), ref.text
        kinds.add(ref.expr.kind)
        # a superlative or relation is only used where it is needed
        if ref.expr.superlative is not None:
            assert len(resolve(Expr(shape=ref.expr.shape, color=ref.expr.color, relation=ref.expr.relation,
                                    anchor=ref.expr.anchor), scene)) >= 2  # fmt: skip
        if ref.expr.relation is not None:
            assert len(resolve(Expr(shape=ref.expr.shape, color=ref.expr.color), scene)) >= 2
    assert kinds == {"attribute", "superlative", "relation"}


def test_scene_objects_masks_and_boxes() -> None:
    for scene, _ in _generated("plain", 30):
        assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
        assert 2 <= len(scene.objects) <= 4
        total = np.zeros((SIZE, SIZE), dtype=int)
        for obj in scene.objects:
            assert obj.mask.any()
            assert list(obj.box) == mask_to_box(obj.mask)
            total += obj.mask
        assert total.max() == 1  # visible masks never overlap


def test_single_object_curriculum() -> None:
    for scene, ref in _generated("plain", 20, max_objects=1):
        assert len(scene.objects) == 1 and ref.target == 0 and ref.expr.kind == "attribute"


def _surround(scene: Scene, obj: SceneObject, margin: int = 4) -> np.ndarray:
    """The pixels within ``margin`` of the object's box that belong to no object."""
    x1, y1, x2, y2 = (int(v) for v in obj.box)
    ring = np.zeros_like(obj.mask)
    ring[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin] = True
    return ring & ~np.any([o.mask for o in scene.objects], axis=0)


def test_camouflage_changes_the_look_but_keeps_the_hue() -> None:
    """The shift hurts a tool trained on plain scenes (clutter, textured objects, weaker edges) while the
    policy can still read the referred colour."""
    stats: dict[str, dict[str, list[float]]] = {}
    for domain in ("plain", "camouflage"):
        d = stats.setdefault(domain, {"background_std": [], "interior_std": [], "contrast": [], "hue_cos": []})
        for scene, _ in _generated(domain, 40, max_objects=1):
            img = scene.image.astype(float)
            obj = scene.objects[0]
            background = ~obj.mask
            d["background_std"].append(float(img[background].std(0).mean()))
            d["interior_std"].append(float(img[obj.mask].std(0).mean()))
            shift = img[obj.mask].mean(0) - img[_surround(scene, obj)].mean(0)
            d["contrast"].append(float(np.linalg.norm(shift)))
            named = np.asarray(COLORS[obj.color], dtype=float)
            towards = named - named.mean()  # the named colour's hue direction (grey removed)
            d["hue_cos"].append(float(shift @ towards / (np.linalg.norm(shift) * np.linalg.norm(towards) + 1e-9)))
    plain, camo = ({k: float(np.mean(v)) for k, v in stats[d].items()} for d in ("plain", "camouflage"))
    assert camo["background_std"] > 3 * plain["background_std"], (plain, camo)  # cluttered, not flat
    assert camo["interior_std"] > 2 * plain["interior_std"], (plain, camo)  # textured, not solid
    assert camo["contrast"] < 0.7 * plain["contrast"], (plain, camo)  # blended into its surroundings
    assert camo["hue_cos"] > 0.5 and plain["hue_cos"] > 0.5, (plain, camo)  # the colour still reads


def test_filling_the_box_is_a_weak_answer() -> None:
    """Solid non-convex shapes: a mask filling the exact box scores about 0.5, so a tool has room to beat it."""
    fills = []
    for scene, _ in _generated("plain", 200, max_objects=1):
        obj = scene.objects[0]
        assert obj.shape in SCENE_SHAPES
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        fills.append(obj.area / ((x2 - x1) * (y2 - y1)))  # IoU of the filled box with the mask it contains
    assert 0.4 < float(np.mean(fills)) < 0.6, np.mean(fills)


# ---------------------------------------------------------------- rows, determinism


def _records(rows: list) -> list[dict]:
    return [r.to_record() for r in rows]


def test_rows_are_deterministic_and_seed_dependent() -> None:
    a = _records(generate_split(12, seed=3, domain="plain", split="train"))
    assert a == _records(generate_split(12, seed=3, domain="plain", split="train"))
    assert a[:5] == _records(generate_split(5, seed=3, domain="plain", split="train"))  # per-sample streams
    other_seed = _records(generate_split(12, seed=4, domain="plain", split="train"))
    val = _records(generate_split(12, seed=3, domain="plain", split="val"))
    for other in (other_seed, val):
        assert all(x["images"][0]["bytes"] != y["images"][0]["bytes"] for x, y in zip(a, other, strict=True))


def test_row_contents() -> None:
    rows = generate_split(20, seed=0, domain="camouflage", split="val")
    assert len({r.sample_id for r in rows}) == 20
    for i, row in enumerate(rows):
        rec = row.to_record()
        assert rec["data_source"] == "grto/synthetic/camouflage"
        assert rec["prompt"][0]["content"] == build_short_instruction(row.expression)
        assert rec["extra_info"]["index"] == i and rec["extra_info"]["split"] == "val"
        img = np.asarray(Image.open(io.BytesIO(rec["images"][0]["bytes"])))
        assert img.shape == (SIZE, SIZE, 3)
        gt = GroundTruth.from_json(rec["reward_model"]["ground_truth"])
        mask = decode_rle(gt.mask_rle)
        assert mask.shape == (SIZE, SIZE) and gt.image_size == (SIZE, SIZE)
        assert gt.boxes == [mask_to_box(mask)]
        object_boxes = json.loads(rec["extra_info"]["object_boxes"])
        assert gt.boxes[0] in object_boxes and 2 <= len(object_boxes) <= 4


def test_ground_truth_mask_is_the_target_objects_visible_mask() -> None:
    rows = generate_split(8, seed=5, domain="plain", split="train")
    for i, row in enumerate(rows):
        scene, ref = make_sample(5, "plain", "train", i)
        assert ref.text == row.expression
        target = scene.objects[ref.target]
        assert np.array_equal(decode_rle(row.ground_truth.mask_rle), target.mask)
        # the mask is the object's visible pixels: painted in the object's own colour family, not the background's
        img = np.asarray(Image.open(io.BytesIO(row.image_png))).astype(float)
        background = ~np.any([o.mask for o in scene.objects], axis=0)
        assert np.linalg.norm(img[target.mask].mean(0) - img[background].mean(0)) > 20


# ---------------------------------------------------------------- files


def test_write_synthetic_parquet(tmp_path: Path) -> None:
    paths = write_synthetic(tmp_path / "a", n_train=10, n_val=4, seed=1, domain="plain")
    df = pd.read_parquet(paths["train"])
    assert list(df.columns) == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    assert len(df) == 10 and len(pd.read_parquet(paths["val"])) == 4
    assert df["prompt"].iloc[0][0]["content"].count("<image>") == 1
    assert set(df["extra_info"].iloc[0]) >= {"index", "sample_id", "split", "expression"}
    again = write_synthetic(tmp_path / "b", n_train=10, n_val=4, seed=1, domain="plain")
    assert paths["train"].read_bytes() == again["train"].read_bytes()
    assert paths["val"].read_bytes() == again["val"].read_bytes()


def test_ensure_synthetic_builds_once(tmp_path: Path) -> None:
    paths = ensure_synthetic(tmp_path, "plain", n_train=6, n_val=2, seed=0, max_objects=1)
    stamp = paths["train"].stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, "plain", n_train=6, n_val=2, seed=0, max_objects=1) == paths
    assert paths["train"].stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [paths["train"].parent.name]


def test_verl_rlhf_dataset_loads_rows_with_the_tiny_processor(
    tmp_path: Path, tiny_assets: AssetPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's own dataset must keep every row (it silently drops rows whose processing fails)."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf_datasets")  # not ~/.cache
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer import build_multimodal_processor_inputs, hf_processor, hf_tokenizer

    paths = write_synthetic(tmp_path, n_train=6, n_val=2, seed=0, domain="plain")
    tokenizer = hf_tokenizer(str(tiny_assets.policy))
    processor = hf_processor(str(tiny_assets.policy))
    assert processor is not None
    config = OmegaConf.create(
        {"max_prompt_length": 256, "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1,
         "cache_dir": str(tmp_path / "verl_cache")}
    )  # fmt: skip
    ds = RLHFDataset(str(paths["train"]), tokenizer, config, processor=processor)
    assert len(ds) == 6  # nothing filtered
    row = ds[0]
    messages = row["raw_prompt"]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text"]
    images, videos, _ = RLHFDataset._process_multi_modal_info(messages, ds.image_patch_size, config)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = build_multimodal_processor_inputs(processor, text=[text], images=images, videos=videos)
    assert tuple(inputs["image_grid_thw"][0].tolist()) == (1, 16, 16)  # 112 px in 7-px patches
    assert inputs["pixel_values"].shape == (256, 3 * 2 * 7 * 7)
    assert int((inputs["input_ids"][0] == processor.image_token_id).sum()) == 64  # 2x2 merged
    assert inputs["input_ids"].shape[1] <= 256
