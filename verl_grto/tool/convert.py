"""Convert SAM2 checkpoints between Meta's format and transformers' `Sam2Model`, in both directions.

Why both directions: the tool trains a transformers `Sam2Model`, but released checkpoints
(and downstream users of a trained tool) speak Meta's `{"model": state_dict}` `.pt` format.
The key mapping below is a bidirectional table of name templates (`*` = one dotted segment),
so one table drives import and export and a Meta -> HF -> Meta round trip is exact.

Meta's checkpoints also hold the video-memory modules, which `Sam2Model` (image only) lacks.
Import drops them (they are listed, so any *other* unmapped key is an error); export takes
them from `base_checkpoint`, the checkpoint the tool started from, because Meta's
`build_sam2` refuses checkpoints with missing keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache

import torch
from transformers import Sam2Config, Sam2Model

from verl_grto.tool.configs import meta_sam2_config

# (Meta template, transformers template); `*` matches one key segment, captured in order.
_KEY_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("no_mem_embed", "no_memory_embedding"),
    # Hiera trunk
    ("image_encoder.trunk.pos_embed", "vision_encoder.backbone.pos_embed"),
    ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
    ("image_encoder.trunk.patch_embed.proj.*", "vision_encoder.backbone.patch_embed.projection.*"),
    ("image_encoder.trunk.blocks.*.norm*.*", "vision_encoder.backbone.blocks.*.layer_norm*.*"),
    ("image_encoder.trunk.blocks.*.attn.*.*", "vision_encoder.backbone.blocks.*.attn.*.*"),
    ("image_encoder.trunk.blocks.*.proj.*", "vision_encoder.backbone.blocks.*.proj.*"),
    ("image_encoder.trunk.blocks.*.mlp.layers.0.*", "vision_encoder.backbone.blocks.*.mlp.proj_in.*"),
    ("image_encoder.trunk.blocks.*.mlp.layers.1.*", "vision_encoder.backbone.blocks.*.mlp.proj_out.*"),
    # FPN neck
    ("image_encoder.neck.convs.*.conv.*", "vision_encoder.neck.convs.*.*"),
    # prompt encoder (point_embeddings.{0..3} <-> rows of point_embed.weight is handled separately)
    (
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("sam_prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("sam_prompt_encoder.mask_downscaling.0.*", "prompt_encoder.mask_embed.conv1.*"),
    ("sam_prompt_encoder.mask_downscaling.1.*", "prompt_encoder.mask_embed.layer_norm1.*"),
    ("sam_prompt_encoder.mask_downscaling.3.*", "prompt_encoder.mask_embed.conv2.*"),
    ("sam_prompt_encoder.mask_downscaling.4.*", "prompt_encoder.mask_embed.layer_norm2.*"),
    ("sam_prompt_encoder.mask_downscaling.6.*", "prompt_encoder.mask_embed.conv3.*"),
    # mask decoder: high-res convs, upscaling
    ("sam_mask_decoder.conv_s*.*", "mask_decoder.conv_s*.*"),
    ("sam_mask_decoder.output_upscaling.0.*", "mask_decoder.upscale_conv1.*"),
    ("sam_mask_decoder.output_upscaling.1.*", "mask_decoder.upscale_layer_norm.*"),
    ("sam_mask_decoder.output_upscaling.3.*", "mask_decoder.upscale_conv2.*"),
    # mask decoder: 3-layer heads (Meta: layers.0..2; transformers: proj_in, layers.0, proj_out)
    ("sam_mask_decoder.*.layers.0.*", "mask_decoder.*.proj_in.*"),
    ("sam_mask_decoder.*.layers.1.*", "mask_decoder.*.layers.0.*"),
    ("sam_mask_decoder.*.layers.2.*", "mask_decoder.*.proj_out.*"),
    ("sam_mask_decoder.output_hypernetworks_mlps.*.layers.0.*", "mask_decoder.output_hypernetworks_mlps.*.proj_in.*"),
    ("sam_mask_decoder.output_hypernetworks_mlps.*.layers.1.*", "mask_decoder.output_hypernetworks_mlps.*.layers.0.*"),
    ("sam_mask_decoder.output_hypernetworks_mlps.*.layers.2.*", "mask_decoder.output_hypernetworks_mlps.*.proj_out.*"),
    # mask decoder: two-way transformer
    ("sam_mask_decoder.transformer.layers.*.*.out_proj.*", "mask_decoder.transformer.layers.*.*.o_proj.*"),
    ("sam_mask_decoder.transformer.layers.*.*.*_proj.*", "mask_decoder.transformer.layers.*.*.*_proj.*"),
    ("sam_mask_decoder.transformer.layers.*.norm*.*", "mask_decoder.transformer.layers.*.layer_norm*.*"),
    ("sam_mask_decoder.transformer.layers.*.mlp.layers.0.*", "mask_decoder.transformer.layers.*.mlp.proj_in.*"),
    ("sam_mask_decoder.transformer.layers.*.mlp.layers.1.*", "mask_decoder.transformer.layers.*.mlp.proj_out.*"),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.*",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.*",
    ),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.*_proj.*",
        "mask_decoder.transformer.final_attn_token_to_image.*_proj.*",
    ),
    ("sam_mask_decoder.transformer.norm_final_attn.*", "mask_decoder.transformer.layer_norm_final_attn.*"),
    # last, as it would also match the specific rules above: iou_token, mask_tokens, obj_score_token
    ("sam_mask_decoder.*.weight", "mask_decoder.*.weight"),
)

_META_POINT_EMBED = "sam_prompt_encoder.point_embeddings.{}.weight"
_HF_POINT_EMBED = "prompt_encoder.point_embed.weight"
_HF_PROMPT_PE = "prompt_encoder.shared_embedding.positional_embedding"
_HF_IMAGE_PE = "shared_image_embedding.positional_embedding"  # a second copy of Meta's single matrix

# Meta's video-memory modules: not part of the image model.
_META_VIDEO_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
)
_META_VIDEO_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in template.split("*")]
    return re.compile("([^.]+?)".join(parts) + r"\Z")


def _fill(template: str, groups: tuple[str, ...]) -> str:
    pieces = template.split("*")
    return "".join(p + g for p, g in zip(pieces, groups, strict=False)) + pieces[-1]


@lru_cache(maxsize=2)
def _rules(meta_to_hf: bool) -> tuple[tuple[re.Pattern[str], str], ...]:
    pairs = _KEY_TEMPLATES if meta_to_hf else tuple((hf, meta) for meta, hf in _KEY_TEMPLATES)
    return tuple((_template_regex(src), dst) for src, dst in pairs)


def _rename(key: str, meta_to_hf: bool) -> str | None:
    """Translate one key with the first matching template; None if no template matches."""
    for pattern, target in _rules(meta_to_hf):
        match = pattern.match(key)
        if match:
            return _fill(target, match.groups())
    return None


def is_meta_video_key(key: str) -> bool:
    """True for keys of Meta's video-memory modules (absent from the image-only `Sam2Model`)."""
    return key.startswith(_META_VIDEO_PREFIXES) or key in _META_VIDEO_KEYS


def meta_to_hf_state_dict(meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta SAM2 state dict -> `Sam2Model` state dict (video-memory keys dropped, unknown keys rejected)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    point_rows: dict[int, torch.Tensor] = {}
    point_pattern = _template_regex(_META_POINT_EMBED.format("*"))
    for key, value in meta.items():
        if is_meta_video_key(key):
            continue
        point = point_pattern.match(key)
        if point:
            point_rows[int(point.group(1))] = value
            continue
        new_key = _rename(key, meta_to_hf=True)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise KeyError(
            f"Meta keys with no transformers counterpart: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    if sorted(point_rows) != list(range(len(point_rows))) or not point_rows:
        raise KeyError(f"point embeddings rows {sorted(point_rows)} are not 0..n-1")
    out[_HF_POINT_EMBED] = torch.cat([point_rows[i] for i in range(len(point_rows))], dim=0)
    out[_HF_IMAGE_PE] = out[_HF_PROMPT_PE].clone()
    return out


def hf_to_meta_state_dict(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`Sam2Model` state dict -> the image-model part of a Meta SAM2 state dict.

    Meta has one prompt positional matrix where transformers keeps two copies; they must be
    equal (true for converted checkpoints and for `SegmentationTool.from_config`).
    """
    if not torch.equal(hf[_HF_PROMPT_PE], hf[_HF_IMAGE_PE]):
        raise ValueError(f"{_HF_PROMPT_PE} and {_HF_IMAGE_PE} differ; Meta's format stores one matrix")
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in hf.items():
        if key == _HF_IMAGE_PE:
            continue
        if key == _HF_POINT_EMBED:
            for i, row in enumerate(value):
                out[_META_POINT_EMBED.format(i)] = row[None].clone()
            continue
        new_key = _rename(key, meta_to_hf=False)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise KeyError(f"transformers keys with no Meta counterpart: {unknown[:10]}")
    return out


# How torch's weights-only unpickler names the global it refused (torch 2.6+): "Unsupported global:
# GLOBAL mod.Name was not an allowed global by default" or "... GLOBAL mod.Name whose module mod is blocked".
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


class UnsafeCheckpointError(ValueError):
    """A `.pt` file names a global outside `torch.load(weights_only=True)`'s allow-list; nothing it names ran.

    A ValueError, so callers that report "not a checkpoint" (the CLI) report this too, in one line.
    """

    def __init__(self, path: str, global_name: str) -> None:
        self.path = path
        self.global_name = global_name  # `module.Name`, as the pickle spells it
        super().__init__(
            f"{path}: refusing to load: the checkpoint needs global {global_name}, which is not allowed under "
            "torch.load(weights_only=True) (only tensors and plain containers are); nothing it names was run"
        )


def _weights_only_reason(exc: Exception) -> str:
    """One line for why `torch.load(weights_only=True)` failed.

    torch's own message is several lines with terminal escapes and suggests `weights_only=False`,
    which is exactly what must not be done with a file of unknown origin; keep only its cause.
    """
    message = str(exc)
    if "Weights only load failed" not in message:
        return f"{type(exc).__name__}: {message}"
    inner = message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load")[0]
    lines = [line.strip() for line in inner.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(exc).__name__}: {lines[-1] if lines else 'weights-only load failed'}"


def load_meta_state_dict(pt_path: str) -> dict[str, torch.Tensor]:
    """Read a Meta `.pt` checkpoint safely (`weights_only=True`); accepts `{"model": sd}` or a bare state dict.

    Raises UnsafeCheckpointError (a ValueError naming the file and the refused global) for a
    pickle that names anything outside torch's weights-only allow-list, and ValueError for a file
    that is not a state dict of tensors, so that callers (the CLI) report a wrong file as such
    rather than as whatever `torch.load` happened to raise (for arbitrary bytes that is a bare
    `KeyError`).
    """
    try:
        checkpoint = torch.load(pt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, KeyError...: all mean "not a checkpoint"
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise UnsafeCheckpointError(pt_path, refused.group(1)) from exc
        raise ValueError(f"{pt_path} is not a readable torch checkpoint ({_weights_only_reason(exc)})") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{pt_path} is not a Meta SAM2 checkpoint: expected {{'model': state_dict}} or a state dict")
    return state


def convert_meta_checkpoint(pt_path: str, config_name: str | Sam2Config, out_dir: str | None = None) -> Sam2Model:
    """Meta `.pt` -> `Sam2Model` (saved with `save_pretrained` to `out_dir` if given).

    `config_name` is a Meta name such as `sam2.1_hiera_t` (see `configs.META_CONFIG_NAMES`) or
    a `Sam2Config`. Loading is strict: a missing, unexpected or mis-shaped key raises.
    """
    config = meta_sam2_config(config_name) if isinstance(config_name, str) else config_name
    state = meta_to_hf_state_dict(load_meta_state_dict(pt_path))
    with torch.device("meta"):
        model = Sam2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not initialised by the checkpoint: {left[:10]}")
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def export_meta_checkpoint(
    hf_dir_or_model: str | Sam2Model | torch.nn.Module,
    out_pt: str,
    base_checkpoint: str | None = None,
) -> dict[str, torch.Tensor]:
    """`Sam2Model` (a directory, a model, or a `SegmentationTool`) -> Meta `{"model": state_dict}` `.pt`.

    With `base_checkpoint` (a Meta `.pt`), its video-memory weights are carried over and its
    key order kept, giving a file Meta's `build_sam2` loads; every image-model key must match
    it in name and shape. Without it, only the image model is written, which Meta's strict
    loader rejects but `model.load_state_dict(..., strict=False)` accepts.
    Returns the written state dict.
    """
    if isinstance(hf_dir_or_model, str):
        model = Sam2Model.from_pretrained(hf_dir_or_model)
    else:
        model = getattr(hf_dir_or_model, "model", hf_dir_or_model)
    image_part = hf_to_meta_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if base_checkpoint is None:
        state = image_part
    else:
        base = load_meta_state_dict(base_checkpoint)
        base_image_keys = {k for k in base if not is_meta_video_key(k)}
        if base_image_keys != set(image_part):
            diff = sorted(base_image_keys ^ set(image_part))
            raise KeyError(f"model and base checkpoint disagree on image-model keys: {diff[:10]}")
        mismatched = [k for k in image_part if image_part[k].shape != base[k].shape]
        if mismatched:
            raise ValueError(f"shape mismatch with the base checkpoint: {mismatched[:10]}")
        state = {k: image_part.get(k, v) for k, v in base.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_pt)), exist_ok=True)
    torch.save({"model": state}, out_pt)
    return state
