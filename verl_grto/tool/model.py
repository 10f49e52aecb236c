"""`SegmentationTool`: SAM2 (transformers `Sam2Model`) split into a frozen, cached encoder and a trainable decoder.

Why this split: in GRTO each image is shared by G rollouts, so the expensive Hiera encoder
runs once per image without gradients, and only the light prompt/mask decoder runs per
rollout with gradients. The mask decoder's `conv_s0`/`conv_s1` project the high-resolution
FPN features; transformers applies them inside image encoding, so cached features would
cut them off from the gradient. When they are trainable we cache the FPN features *before*
them and apply them in `decode`.

Decoding is always single-mask (`multimask_output=False`). Transformers (like Meta's
predictor) silently swaps in the best multimask output for unstable masks, but only in eval
mode; that would make `predict` (eval) and `update` (train) score different outputs, so it
is off unless `stability_fallback=True` is asked for.

Precision: the weights are float32 whatever dtype a checkpoint is stored in (`from_pretrained` asks
transformers for float32; with transformers 5's default `dtype="auto"` a bf16 checkpoint would load as
bf16, and AdamW steps of lr 1e-5 would round away on bf16 weights). Only the frozen image encoder may
run in a lower precision (`encoder_dtype`, e.g. bfloat16 on GPUs): it takes no optimiser step, and its
cached features are then stored in that dtype (half the cache's bytes) and cast to float32 where the
decoder reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import Sam2Config, Sam2Model

from verl_grto.tool.preprocess import ImageLike, images_to_pixels, original_size, scale_coords
from verl_grto.tool.prompts import PromptLike, SanitizedPrompt, sanitize_prompt

Trainable = Literal["mask_decoder", "mask_decoder+prompt_encoder"]
TRAINABLE_CHOICES: tuple[str, ...] = ("mask_decoder", "mask_decoder+prompt_encoder")

# Logit given to every pixel of a rollout with no usable prompt: sigmoid(-20) ~ 2e-9, i.e. background,
# while keeping BCE finite (Meta's -1024 "no object" score would swamp any loss it enters).
EMPTY_LOGIT = -20.0


@dataclass
class ImageFeatures:
    """Cached encoder output for a batch of images, enough to decode with gradients.

    `high_res_features` are the two high-resolution FPN levels, already projected by
    `conv_s0`/`conv_s1` if `high_res_projected`, raw otherwise (so the convs can be trained).
    """

    image_embeddings: torch.Tensor
    high_res_features: tuple[torch.Tensor, torch.Tensor]
    high_res_projected: bool
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.original_sizes)

    def select(self, indices: Sequence[int]) -> ImageFeatures:
        """The features of a subset (or re-ordering, with repeats) of the images."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.image_embeddings.device)
        s0, s1 = self.high_res_features
        return ImageFeatures(
            self.image_embeddings[idx],
            (s0[idx], s1[idx]),
            self.high_res_projected,
            [self.original_sizes[i] for i in idx.tolist()],
        )

    @staticmethod
    def concat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Stack features of several encode calls (they must come from the same tool)."""
        if not parts:
            raise ValueError("no features to concatenate")
        if len({p.high_res_projected for p in parts}) != 1:
            raise ValueError("cannot mix projected and raw high-resolution features")
        return ImageFeatures(
            torch.cat([p.image_embeddings for p in parts]),
            (torch.cat([p.high_res_features[0] for p in parts]), torch.cat([p.high_res_features[1] for p in parts])),
            parts[0].high_res_projected,
            [hw for p in parts for hw in p.original_sizes],
        )


@dataclass
class DecodeOutput:
    """One mask per rollout: low-resolution logits (R, h, w), predicted IoU (R,), and bookkeeping.

    `num_objects[r]` counts the objects that reached the model; 0 means the rollout's mask is
    the constant background `EMPTY_LOGIT` and carries no gradient. `prompt_issues[r]` lists why
    prompt parts were repaired or dropped. `original_sizes[r]` is the (H, W) of rollout r's image.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    num_objects: torch.Tensor
    prompt_issues: list[list[str]] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)


def _as_dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "float16", "float32")."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"encoder_dtype must name a floating-point torch dtype, got {value!r}")
    return dtype


class SegmentationTool(nn.Module):
    """SAM2 with a frozen image encoder and a configurable trainable part, decoding one (OR-ed) mask per rollout."""

    def __init__(
        self,
        model: Sam2Model,
        trainable: Trainable = "mask_decoder",
        freeze_high_res_convs: bool = False,
        stability_fallback: bool = False,
        min_box_size: float = 1.0,
        encoder_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE_CHOICES:
            raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
        if min_box_size <= 0:
            raise ValueError(f"min_box_size must be > 0 pixels, got {min_box_size}")
        model.float()  # master weights: float32 whatever the checkpoint's dtype (see the module docstring)
        if encoder_dtype is not None:
            model.vision_encoder.to(_as_dtype(encoder_dtype))
        self.model = model
        self.trainable = trainable
        self.min_box_size = min_box_size
        self.image_size = int(model.config.prompt_encoder_config.image_size)
        model.mask_decoder.dynamic_multimask_via_stability = stability_fallback

        model.requires_grad_(False)
        model.mask_decoder.requires_grad_(True)
        if trainable == "mask_decoder+prompt_encoder":
            model.prompt_encoder.requires_grad_(True)
        if freeze_high_res_convs:
            model.mask_decoder.conv_s0.requires_grad_(False)
            model.mask_decoder.conv_s1.requires_grad_(False)

    @classmethod
    def from_config(cls, config: Sam2Config, seed: int | None = None, **kwargs) -> SegmentationTool:
        """A randomly initialised tool (e.g. the tiny test model).

        transformers initialises its two copies of the prompt positional matrix independently;
        Meta's model has one. We tie them so a model trained from scratch can be exported.
        """
        if seed is not None:
            torch.manual_seed(seed)
        model = Sam2Model(config)
        with torch.no_grad():
            model.shared_image_embedding.positional_embedding.copy_(
                model.prompt_encoder.shared_embedding.positional_embedding
            )
        return cls(model, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> SegmentationTool:
        """Load a transformers-format SAM2 directory (e.g. the output of `convert_meta_checkpoint`), in
        float32 whatever dtype it is stored in."""
        return cls(Sam2Model.from_pretrained(path, dtype=torch.float32), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.no_memory_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's (and the optimiser's) dtype: float32."""
        return self.model.no_memory_embedding.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.model.vision_encoder.parameters()).dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser should see (everything else is frozen)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _convs_trainable(self) -> bool:
        decoder = self.model.mask_decoder
        return any(p.requires_grad for m in (decoder.conv_s0, decoder.conv_s1) for p in m.parameters())

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, original_sizes: list[tuple[int, int]]) -> ImageFeatures:
        """Run the frozen encoder on normalised (B, 3, S, S) pixels."""
        model = self.model
        store = self.encoder_dtype  # the features are cached in the encoder's dtype
        out = model.vision_encoder(pixels.to(self.device, store), return_dict=True)
        s0, s1, last = out.fpn_hidden_states
        embeddings = (last.to(self.dtype) + model.no_memory_embedding.view(1, -1, 1, 1)).to(store)
        projected = not self._convs_trainable()
        if projected:
            s0 = model.mask_decoder.conv_s0(s0.to(self.dtype)).to(store)
            s1 = model.mask_decoder.conv_s1(s1.to(self.dtype)).to(store)
        return ImageFeatures(embeddings, (s0, s1), projected, list(original_sizes))

    def encode(self, images: Sequence[ImageLike]) -> ImageFeatures:
        """Encode HxWx3 uint8 images (any sizes) without gradients."""
        pixels = images_to_pixels(images, self.image_size)
        return self.encode_pixels(pixels, [original_size(image) for image in images])

    def _project(self, features: ImageFeatures) -> ImageFeatures:
        """Apply `conv_s0`/`conv_s1` if the cache holds raw features (with gradients, as they are trainable
        then), and cast the features to the decoder's dtype.

        Done once per image, before features are repeated per object.
        """
        dtype = self.dtype
        s0, s1 = (f.to(dtype) for f in features.high_res_features)
        if not features.high_res_projected:
            decoder = self.model.mask_decoder
            s0, s1 = decoder.conv_s0(s0), decoder.conv_s1(s1)
        return ImageFeatures(features.image_embeddings.to(dtype), (s0, s1), True, features.original_sizes)

    def _to_model_frame(self, coords: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """Scale (N, K, 2) pixel coordinates, row n belonging to an image of size sizes[n]."""
        return torch.stack([scale_coords(c, hw, self.image_size) for c, hw in zip(coords, sizes, strict=True)])

    def _decode_group(
        self, features: ImageFeatures, image_rows: list[int], prompts: list[SanitizedPrompt]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode objects whose prompts share a signature, so their token sequences need no padding.

        `features` must be projected (see `_project`); `image_rows[i]` is object i's row in it.
        """
        model = self.model
        device = self.device
        feats = features.select(image_rows)
        s0, s1 = feats.high_res_features

        boxes = points = labels = None
        if prompts[0].box is not None:
            corners = torch.tensor([p.box for p in prompts], dtype=torch.float32, device=device).view(-1, 2, 2)
            boxes = self._to_model_frame(corners, feats.original_sizes).view(-1, 1, 4)  # (N, 1 box per mask, 4)
        if prompts[0].points:
            pts = torch.tensor([p.points for p in prompts], dtype=torch.float32, device=device)
            points = self._to_model_frame(pts, feats.original_sizes)[:, None]  # (N, 1, P, 2)
            labels = torch.tensor([p.labels for p in prompts], dtype=torch.int32, device=device)[:, None]

        sparse, dense = model.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=boxes, input_masks=None
        )
        positional = model.get_image_wide_positional_embeddings().repeat(len(prompts), 1, 1, 1)
        masks, iou, _, _ = model.mask_decoder(
            image_embeddings=feats.image_embeddings.to(sparse.dtype),
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            high_resolution_features=[s0, s1],
        )
        return masks[:, 0, 0], iou[:, 0, 0]

    def empty_output(self) -> DecodeOutput:
        """The decode result for zero rollouts (e.g. an empty data-parallel shard), without touching features."""
        dtype = self.dtype
        side = self.image_size // 4  # the decoder's low-resolution mask size
        empty = torch.empty(0, side, side, dtype=dtype, device=self.device)
        return DecodeOutput(empty, torch.empty(0, dtype=dtype, device=self.device), torch.zeros(0, dtype=torch.long))

    def decode(
        self,
        features: ImageFeatures,
        prompts: Sequence[Sequence[PromptLike]],
        image_index: Sequence[int],
    ) -> DecodeOutput:
        """One mask per rollout from its object prompts; gradients flow into the trainable part.

        `prompts[r]` lists rollout r's objects (boxes/points in pixels of its original image),
        `image_index[r]` is the row of `features` holding its image. Each object gets its own
        single-mask prediction; a multi-object answer is their union, taken as the pixel-wise
        max of logits (a differentiable OR: the mask is on where any object's mask is on; the
        gradient goes to the object with the highest logit). Its `iou_pred` is the mean over
        objects. A rollout with no usable object gets a constant background mask.
        """
        if len(prompts) != len(image_index):
            raise ValueError(f"{len(prompts)} prompt lists but {len(image_index)} image indices")
        prompt_issues: list[list[str]] = []
        owners: list[int] = []
        rows: list[int] = []
        clean: list[SanitizedPrompt] = []
        for r, (objects, row) in enumerate(zip(prompts, image_index, strict=True)):
            if not 0 <= row < len(features):
                raise IndexError(f"rollout {r}: image index {row} outside the {len(features)} encoded images")
            reasons: list[str] = []
            for obj in objects:
                sanitized, why = sanitize_prompt(obj, features.original_sizes[row], self.min_box_size)
                reasons.extend(why)
                if sanitized is not None:
                    owners.append(r)
                    rows.append(int(row))
                    clean.append(sanitized)
            prompt_issues.append(reasons)

        num_rollouts = len(prompts)
        h, w = features.high_res_features[0].shape[-2:]
        dtype = self.dtype
        device = self.device
        object_logits: list[torch.Tensor | None] = [None] * len(clean)
        object_iou: list[torch.Tensor | None] = [None] * len(clean)
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, p in enumerate(clean):
            groups.setdefault(p.signature, []).append(i)
        used = sorted(set(rows))
        position = {row: i for i, row in enumerate(used)}
        projected = self._project(features.select(used)) if used else features
        for members in groups.values():
            positions = [position[rows[i]] for i in members]
            logits, iou = self._decode_group(projected, positions, [clean[i] for i in members])
            for j, i in enumerate(members):
                object_logits[i], object_iou[i] = logits[j], iou[j]

        mask_logits: list[torch.Tensor] = []
        iou_pred: list[torch.Tensor] = []
        owner_array = np.asarray(owners, dtype=np.int64)
        for r in range(num_rollouts):
            mine = np.flatnonzero(owner_array == r).tolist()
            if mine:
                mask_logits.append(torch.stack([object_logits[i] for i in mine]).amax(dim=0))
                iou_pred.append(torch.stack([object_iou[i] for i in mine]).mean())
            else:
                mask_logits.append(torch.full((h, w), EMPTY_LOGIT, dtype=dtype, device=device))
                iou_pred.append(torch.zeros((), dtype=dtype, device=device))
        if num_rollouts == 0:
            return self.empty_output()
        counts = torch.bincount(torch.as_tensor(owners, dtype=torch.long), minlength=num_rollouts)
        sizes = [features.original_sizes[int(row)] for row in image_index]
        return DecodeOutput(torch.stack(mask_logits), torch.stack(iou_pred), counts, prompt_issues, sizes)
