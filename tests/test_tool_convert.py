"""Meta SAM2 <-> transformers conversion, checked against Meta's own code.

Tests that build Meta's model need the `sam2` extra; they are marked `sam2` and skip without it.

Meta's models are built from the packaged yaml with OmegaConf + hydra's `instantiate`, not
`build_sam2`: importing `sam2` initialises Hydra's global state, which clashes with Hydra
apps such as verl (see shared/notes/sam2.md). The fixture clears that state afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from tool_helpers import random_image
from transformers import Sam2Model

from verl_grto.tool.configs import META_CONFIG_NAMES, build_sam2_config, meta_sam2_config
from verl_grto.tool.convert import (
    convert_meta_checkpoint,
    export_meta_checkpoint,
    hf_to_meta_state_dict,
    is_meta_video_key,
    meta_to_hf_state_dict,
)
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.preprocess import image_to_pixels, logits_to_original
from verl_grto.tool.prompts import ObjectPrompt

SAM2_MISSING = (
    "Meta's SAM2 code is not installed (the `sam2` extra: see shared/notes/sam2.md for the CPU-safe pip line)"
)


# A Meta-expressible tiny model: Meta hard-codes the decoder MLP (2048), heads (8) and IoU head (256).
TINY = dict(
    image_size=128,
    embed_dim=16,
    num_heads=1,
    stages=[1, 1, 2, 1],
    global_blocks=[3],
    windows=[8, 4, 4, 4],
    bkg=[4, 4],
    dim=32,
)
TINY_OVERRIDES = [
    f"model.image_size={TINY['image_size']}",
    f"model.image_encoder.trunk.embed_dim={TINY['embed_dim']}",
    f"model.image_encoder.trunk.num_heads={TINY['num_heads']}",
    f"model.image_encoder.trunk.stages={TINY['stages']}",
    f"model.image_encoder.trunk.global_att_blocks={TINY['global_blocks']}",
    f"model.image_encoder.trunk.window_spec={TINY['windows']}",
    f"model.image_encoder.trunk.window_pos_embed_bkg_spatial_size={TINY['bkg']}",
    f"model.image_encoder.neck.d_model={TINY['dim']}",
    f"model.image_encoder.neck.position_encoding.num_pos_feats={TINY['dim']}",
    f"model.image_encoder.neck.backbone_channel_list={[TINY['embed_dim'] * 2**i for i in (3, 2, 1, 0)]}",
]


def tiny_hf_config():
    return build_sam2_config(
        image_size=TINY["image_size"],
        embed_dim=TINY["embed_dim"],
        num_heads=TINY["num_heads"],
        blocks_per_stage=TINY["stages"],
        global_attention_blocks=TINY["global_blocks"],
        window_size_per_stage=TINY["windows"],
        window_positional_embedding_background_size=TINY["bkg"],
        fpn_hidden_size=TINY["dim"],
        decoder_mlp_dim=2048,
        decoder_num_heads=8,
        iou_head_hidden_dim=256,
    )


@pytest.fixture(scope="module")
def meta_yaml():
    """Returns a builder of Meta models from packaged yaml (+ dotlist overrides); restores Hydra's global state."""
    if importlib.util.find_spec("sam2") is None:
        pytest.skip(SAM2_MISSING)
    from hydra.core.global_hydra import GlobalHydra

    was_initialized = GlobalHydra.instance().is_initialized()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    package = os.path.dirname(importlib.util.find_spec("sam2").origin)

    def build(name: str, overrides: tuple[str, ...] = ()) -> torch.nn.Module:
        version = name.split("_")[0]
        cfg = OmegaConf.load(os.path.join(package, "configs", version, f"{name}.yaml"))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return instantiate(cfg.model, _recursive_=True)

    yield build
    if not was_initialized:
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def parameters_on_meta_device() -> Iterator[None]:
    """Build modules without allocating or initialising weights (Meta's Hiera calls .item(), so no device ctx)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Meta zero-initialises some tensors (pos embeds, no_mem_embed); random values make the comparison meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale + tensor)


@pytest.mark.sam2
@pytest.mark.parametrize("name", META_CONFIG_NAMES)
def test_key_mapping_matches_every_meta_architecture(meta_yaml, name):
    with parameters_on_meta_device():
        meta = meta_yaml(name)
    with torch.device("meta"):
        hf = Sam2Model(meta_sam2_config(name))
    meta_sd, hf_sd = meta.state_dict(), hf.state_dict()
    converted = meta_to_hf_state_dict(meta_sd)
    assert set(converted) == set(hf_sd), sorted(set(converted) ^ set(hf_sd))[:10]
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in hf_sd.items()}
    back = hf_to_meta_state_dict(converted)
    assert list(back) == [k for k in meta_sd if not is_meta_video_key(k)] or set(back) == {
        k for k in meta_sd if not is_meta_video_key(k)
    }
    assert all(back[k].shape == meta_sd[k].shape for k in back)


def test_unknown_meta_key_is_rejected():
    with pytest.raises(KeyError, match="no transformers counterpart"):
        meta_to_hf_state_dict({"image_encoder.trunk.mystery.weight": torch.zeros(1)})


class _FixedPixels:
    """Meta's transforms, except that the image becomes the given pixel tensor.

    Meta resizes in float, transformers (and the tool) in uint8; feeding both the same pixels
    isolates the model and prompt handling, and the tool's preprocessing is checked against
    transformers' processor elsewhere.
    """

    def __init__(self, inner, pixels: torch.Tensor) -> None:
        self._inner, self._pixels = inner, pixels

    def __call__(self, image):
        return self._pixels

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _meta_predictor(meta, image: np.ndarray, image_size: int):
    """Meta's image predictor with the image set (encoded once for all prompts)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(meta)
    predictor._bb_feat_sizes = [(image_size // s, image_size // s) for s in (4, 8, 16)]
    predictor._transforms = _FixedPixels(predictor._transforms, image_to_pixels(image, image_size))
    predictor.set_image(image)
    return predictor


def _meta_predict(predictor, prompt: ObjectPrompt):
    """Low-res logits (clamped to +-32 by Meta), predicted IoU, full-size logits (not clamped)."""
    masks, iou, low_res = predictor.predict(
        point_coords=np.array(prompt.points, dtype=np.float32) if prompt.points else None,
        point_labels=np.array(prompt.labels, dtype=np.int64) if prompt.points else None,
        box=np.array(prompt.box, dtype=np.float32) if prompt.box else None,
        multimask_output=False,
        return_logits=True,
    )
    return torch.from_numpy(low_res[0]), float(iou[0]), torch.from_numpy(masks[0])


PROMPTS = {
    "box": ObjectPrompt((20.5, 15.0, 130.0, 80.25)),
    "points": ObjectPrompt(None, ((40.0, 30.0), (100.5, 70.0), (10.0, 85.0)), (1, 1, 0)),
    "box+points": ObjectPrompt((20.5, 15.0, 130.0, 80.25), ((60.0, 40.0), (25.0, 75.0)), (1, 0)),
}


def _compare(meta, tool: SegmentationTool, image: np.ndarray, stability_fallback: bool) -> None:
    meta.sam_mask_decoder.dynamic_multimask_via_stability = stability_fallback
    tool.model.mask_decoder.dynamic_multimask_via_stability = stability_fallback
    predictor = _meta_predictor(meta, image, tool.image_size)
    features = tool.encode([image])
    for name, prompt in PROMPTS.items():
        meta_low, meta_iou, meta_full = _meta_predict(predictor, prompt)
        with torch.no_grad():
            out = tool.decode(features, [[prompt]], [0])
        assert out.prompt_issues == [[]]
        torch.testing.assert_close(out.mask_logits[0].clamp(-32, 32), meta_low, atol=1e-4, rtol=1e-4, msg=name)
        assert out.iou_pred[0].item() == pytest.approx(meta_iou, abs=1e-5), name
        full = logits_to_original(out.mask_logits, image.shape[:2])[0]
        torch.testing.assert_close(full, meta_full, atol=1e-4, rtol=1e-4, msg=name)


def _save_meta(meta, path: str) -> None:
    torch.save({"model": meta.state_dict()}, path)


@pytest.mark.sam2
@pytest.mark.parametrize("stability_fallback", [False, True])
def test_tiny_meta_and_converted_model_agree(meta_yaml, tmp_path, stability_fallback):
    torch.manual_seed(0)
    meta = meta_yaml("sam2.1_hiera_t", tuple(TINY_OVERRIDES)).eval()
    randomize_(meta, seed=1)
    pt = str(tmp_path / "tiny.pt")
    _save_meta(meta, pt)
    convert_meta_checkpoint(pt, tiny_hf_config(), str(tmp_path / "hf"))
    tool = SegmentationTool.from_pretrained(str(tmp_path / "hf")).eval()
    image = random_image(np.random.default_rng(0), 96, 160)  # not square, not the model size
    _compare(meta, tool, image, stability_fallback)
    if stability_fallback:  # the fallback must actually have fired, or this case tests nothing new
        with torch.no_grad():
            fallback = tool.decode(tool.encode([image]), [[PROMPTS["box"]]], [0]).iou_pred
            tool.model.mask_decoder.dynamic_multimask_via_stability = False
            token0 = tool.decode(tool.encode([image]), [[PROMPTS["box"]]], [0]).iou_pred
        assert not torch.equal(fallback, token0)


@pytest.mark.sam2
def test_meta_hf_meta_round_trip_is_exact(meta_yaml, tmp_path):
    torch.manual_seed(0)
    meta = meta_yaml("sam2.1_hiera_t", tuple(TINY_OVERRIDES))
    randomize_(meta, seed=2)
    pt, out_pt = str(tmp_path / "meta.pt"), str(tmp_path / "exported.pt")
    _save_meta(meta, pt)
    convert_meta_checkpoint(pt, tiny_hf_config(), str(tmp_path / "hf"))
    export_meta_checkpoint(str(tmp_path / "hf"), out_pt, base_checkpoint=pt)
    original = torch.load(pt, weights_only=True)["model"]
    exported = torch.load(out_pt, weights_only=True)["model"]
    assert list(exported) == list(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    # ...and Meta's model loads it strictly
    meta.load_state_dict(exported, strict=True)


@pytest.mark.sam2
def test_export_of_a_tool_trained_from_scratch_loads_into_meta(meta_yaml, tmp_path):
    """A tool built from config (positional matrices tied) exports to a file Meta's model loads and reproduces."""
    meta = meta_yaml("sam2.1_hiera_t", tuple(TINY_OVERRIDES)).eval()
    base = str(tmp_path / "base.pt")
    _save_meta(meta, base)
    tool = SegmentationTool.from_config(tiny_hf_config(), seed=3).eval()
    randomize_(tool.model, seed=4)
    with torch.no_grad():  # randomize_ untied the two positional copies; Meta has one
        tool.model.shared_image_embedding.positional_embedding.copy_(
            tool.model.prompt_encoder.shared_embedding.positional_embedding
        )
    export_meta_checkpoint(tool, str(tmp_path / "tool.pt"), base_checkpoint=base)
    meta.load_state_dict(torch.load(str(tmp_path / "tool.pt"), weights_only=True)["model"], strict=True)
    _compare(meta, tool, random_image(np.random.default_rng(1), 128, 160), stability_fallback=False)


def test_export_refuses_untied_positional_matrices():
    tool = SegmentationTool.from_config(tiny_hf_config(), seed=0)
    with torch.no_grad():
        tool.model.shared_image_embedding.positional_embedding.add_(1.0)
    with pytest.raises(ValueError, match="differ"):
        hf_to_meta_state_dict(tool.model.state_dict())


@pytest.mark.sam2
def test_hiera_t_meta_and_converted_model_agree(meta_yaml, tmp_path):
    """The real sam2.1_hiera_t architecture at 1024 px (random weights), one image, all prompt kinds."""
    torch.manual_seed(0)
    meta = meta_yaml("sam2.1_hiera_t").eval()
    randomize_(meta, seed=5, scale=0.02)  # 12 blocks deep: larger noise blows activations up
    pt = str(tmp_path / "hiera_t.pt")
    _save_meta(meta, pt)
    model = convert_meta_checkpoint(pt, "sam2.1_hiera_t")  # no save_pretrained: saves ~0.1 GB of disk writes
    tool = SegmentationTool(model).eval()
    _compare(meta, tool, random_image(np.random.default_rng(2), 150, 200), stability_fallback=True)
