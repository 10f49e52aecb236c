"""Tool configs: the tiny config is small and runs; Meta configs reproduce Meta's architectures."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tool_helpers import tiny_tool
from transformers import Sam2Model

from verl_grto.tool.configs import (
    META_CONFIG_NAMES,
    META_HIERA_SPECS,
    build_sam2_config,
    meta_hiera_spec,
    meta_sam2_config,
    tiny_sam2_config,
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("image_size", [128, 256])
def test_tiny_config_is_small_and_runs(image_size):
    tool = tiny_tool(image_size=image_size)
    assert 300_000 <= _count(tool.model) <= 1_000_000
    assert tool.image_size == image_size
    features = tool.encode([torch.zeros(image_size, image_size, 3, dtype=torch.uint8)])
    assert features.image_embeddings.shape[-2:] == (image_size // 16, image_size // 16)
    assert features.high_res_features[0].shape[-2:] == (image_size // 4, image_size // 4)


def test_tiny_config_has_sam2_architecture():
    config = tiny_sam2_config()
    backbone = config.vision_config.backbone_config
    assert len(backbone.blocks_per_stage) == 4  # Hiera: 4 stages, 3 of them pooling
    assert backbone.global_attention_blocks and config.mask_decoder_config.num_hidden_layers == 2
    assert config.vision_config.backbone_channel_list == backbone.embed_dim_per_stage[::-1]
    assert config.prompt_encoder_config.hidden_size == config.mask_decoder_config.hidden_size
    assert config.vision_config.fpn_hidden_size == config.mask_decoder_config.hidden_size


def test_global_attention_on_a_pooling_block_is_rejected():
    with pytest.raises(ValueError, match="first \\(pooling\\) block"):
        build_sam2_config(
            image_size=128,
            embed_dim=8,
            num_heads=1,
            blocks_per_stage=[1, 1, 2, 1],
            global_attention_blocks=[2],  # block 2 starts stage 3
            window_size_per_stage=[8, 4, 4, 4],
            window_positional_embedding_background_size=[4, 4],
            fpn_hidden_size=32,
            decoder_mlp_dim=64,
            decoder_num_heads=2,
            iou_head_hidden_dim=32,
        )


def test_image_size_must_suit_the_strides():
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_sam2_config(100)


def test_unknown_meta_name_is_rejected():
    with pytest.raises(ValueError, match="unknown SAM2 config"):
        meta_sam2_config("sam3_hiera_t")


@pytest.mark.parametrize(
    ("name", "encoder_params"),
    [("sam2.1_hiera_t", 27.2e6), ("sam2.1_hiera_b+", 69.1e6)],  # sizes measured from Meta's code (shared notes)
)
def test_meta_config_sizes(name, encoder_params):
    with torch.device("meta"):
        model = Sam2Model(meta_sam2_config(name))
    assert _count(model.vision_encoder) == pytest.approx(encoder_params, rel=2e-3)
    assert _count(model.mask_decoder) == pytest.approx(4.2e6, rel=5e-3)


def test_sam2_and_sam21_share_the_image_architecture():
    for size in META_HIERA_SPECS:
        assert meta_sam2_config(f"sam2_{size}").to_dict() == meta_sam2_config(f"sam2.1_{size}").to_dict()


@pytest.mark.sam2
@pytest.mark.skipif(
    importlib.util.find_spec("sam2") is None, reason="Meta's `sam2` package (the yaml source) is not installed"
)
@pytest.mark.parametrize("name", META_CONFIG_NAMES)
def test_hiera_specs_match_meta_yaml(name):
    """The spec table against Meta's packaged yaml, read as plain yaml (no `import sam2`, no Hydra)."""
    from omegaconf import OmegaConf

    package = os.path.dirname(importlib.util.find_spec("sam2").origin)
    cfg = OmegaConf.load(os.path.join(package, "configs", name.split("_")[0], f"{name}.yaml"))
    trunk = cfg.model.image_encoder.trunk
    spec = meta_hiera_spec(name)
    hiera_defaults = {
        "stages": (2, 3, 16, 3),
        "global_att_blocks": (12, 16, 20),
        "window_pos_embed_bkg_spatial_size": (14, 14),
        "window_spec": (8, 4, 14, 7),
    }
    for field, default in hiera_defaults.items():
        assert tuple(trunk.get(field, default)) == getattr(spec, field), field
    assert (trunk.embed_dim, trunk.num_heads) == (spec.embed_dim, spec.num_heads)
    assert cfg.model.image_encoder.neck.d_model == 256 and cfg.model.image_size == 1024
    assert list(cfg.model.image_encoder.neck.backbone_channel_list) == [spec.embed_dim * 2**i for i in (3, 2, 1, 0)]
