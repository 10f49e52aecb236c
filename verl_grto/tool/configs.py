"""Sam2 model configurations: a tiny one for CPU tests and Meta's released architectures.

Why a module of its own: every other part of the tool (model, conversion, tests, the
learnability probe) must agree on the same shapes, and a converted Meta checkpoint only
loads without missing/unexpected keys if the config reproduces Meta's architecture
exactly. Keeping the configs here makes that single source of truth explicit.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Sam2Config

# Meta's `sam2/modeling/sam2_base.py` hard-codes the SAM heads: a 2-layer two-way
# transformer with mlp_dim 2048 and 8 heads, a 3-layer IoU head of width 256, three
# multimask outputs, object-score MLP and sigmoid IoU. Transformers' defaults match these.
_META_FPN_DIM = 256
_META_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class HieraSpec:
    """The trunk hyper-parameters that differ between Meta's released SAM2 sizes.

    Field names follow Meta's yaml (`sam2/configs/sam2.1/*.yaml`) so the table below can be
    checked against the packaged configs by eye and by test.
    """

    embed_dim: int
    num_heads: int
    stages: tuple[int, int, int, int]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    window_spec: tuple[int, int, int, int] = (8, 4, 14, 7)


# Values from Meta's packaged yaml; b+ leaves stages/global blocks/bkg size at Hiera's defaults.
META_HIERA_SPECS: dict[str, HieraSpec] = {
    "hiera_t": HieraSpec(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "hiera_s": HieraSpec(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "hiera_b+": HieraSpec(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "hiera_l": HieraSpec(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}

META_CONFIG_NAMES: tuple[str, ...] = tuple(
    f"{version}_{size}" for version in ("sam2.1", "sam2") for size in META_HIERA_SPECS
)


def _check_hiera(image_size: int, blocks_per_stage: list[int], global_blocks: list[int], windows: list[int]) -> None:
    """Reject configs that build but fail (or silently mis-behave) at forward time."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (patch stride 4 x 3 pooling stages), got {image_size}")
    if (image_size // 4) % windows[0]:
        raise ValueError(f"image_size/4={image_size // 4} must be a multiple of the first window size {windows[0]}")
    stage_starts = [sum(blocks_per_stage[:i]) for i in range(1, len(blocks_per_stage))]
    clash = sorted(set(stage_starts) & set(global_blocks))
    if clash:
        # The first block of a stage pools its queries; as a global-attention block it breaks.
        raise ValueError(f"global-attention blocks {clash} are the first (pooling) block of a stage")


def build_sam2_config(
    *,
    image_size: int,
    embed_dim: int,
    num_heads: int,
    blocks_per_stage: list[int],
    global_attention_blocks: list[int],
    window_size_per_stage: list[int],
    window_positional_embedding_background_size: list[int],
    fpn_hidden_size: int,
    decoder_mlp_dim: int,
    decoder_num_heads: int,
    iou_head_hidden_dim: int,
) -> Sam2Config:
    """Assemble a consistent `Sam2Config` from the handful of numbers that define a SAM2 image model.

    Why: the nested transformers config repeats the same facts in several places (channel list,
    feature sizes, prompt-encoder image size and width, decoder width); deriving them here keeps
    them consistent. Channels and heads double per stage, as in Meta's Hiera.
    """
    _check_hiera(image_size, blocks_per_stage, global_attention_blocks, window_size_per_stage)
    dims = [embed_dim * 2**i for i in range(4)]
    heads = [num_heads * 2**i for i in range(4)]
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": embed_dim,
        "num_attention_heads": num_heads,
        "image_size": [image_size, image_size],
        "blocks_per_stage": list(blocks_per_stage),
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": list(window_size_per_stage),
        "global_attention_blocks": list(global_attention_blocks),
        "window_positional_embedding_background_size": list(window_positional_embedding_background_size),
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": dims[::-1],
        "backbone_feature_sizes": [[image_size // s, image_size // s] for s in (4, 8, 16)],
        "fpn_hidden_size": fpn_hidden_size,
    }
    prompt = {"hidden_size": fpn_hidden_size, "image_size": image_size, "patch_size": 16}
    decoder = {
        "hidden_size": fpn_hidden_size,
        "mlp_dim": decoder_mlp_dim,
        "num_attention_heads": decoder_num_heads,
        "iou_head_hidden_dim": iou_head_hidden_dim,
    }
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def tiny_sam2_config(image_size: int = 128) -> Sam2Config:
    """A ~0.36M-parameter SAM2 (Hiera 16-32-64-128, decoder width 32) for CPU tests and the synthetic task.

    Same architecture as SAM2 (4-stage Hiera with windowed and global attention, FPN neck,
    two-way-transformer mask decoder with high-res skip features), only narrow.
    """
    return build_sam2_config(
        image_size=image_size,
        embed_dim=16,
        num_heads=1,
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],  # stage starts are 0, 1, 2, 4
        window_size_per_stage=[8, 4, 4, 4],
        window_positional_embedding_background_size=[4, 4],
        fpn_hidden_size=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )


def meta_hiera_spec(name: str) -> HieraSpec:
    """The trunk spec of a Meta config name such as `sam2.1_hiera_t` or `sam2_hiera_b+`."""
    if name not in META_CONFIG_NAMES:
        raise ValueError(f"unknown SAM2 config {name!r}; expected one of {META_CONFIG_NAMES}")
    return META_HIERA_SPECS[name.split("_", 1)[1]]


def meta_sam2_config(name: str) -> Sam2Config:
    """The transformers config of one of Meta's released SAM2 / SAM2.1 image models (1024 px).

    SAM2 and SAM2.1 share the image-model architecture (they differ in video-memory modules,
    which `Sam2Model` does not have), so both names give the same config.
    """
    spec = meta_hiera_spec(name)
    return build_sam2_config(
        image_size=_META_IMAGE_SIZE,
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        blocks_per_stage=list(spec.stages),
        global_attention_blocks=list(spec.global_att_blocks),
        window_size_per_stage=list(spec.window_spec),
        window_positional_embedding_background_size=list(spec.window_pos_embed_bkg_spatial_size),
        fpn_hidden_size=_META_FPN_DIM,
        decoder_mlp_dim=2048,
        decoder_num_heads=8,
        iou_head_hidden_dim=256,
    )
