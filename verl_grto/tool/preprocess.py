"""Image, prompt-coordinate and mask conversions between the original image frame and SAM2's frame.

Why not call `Sam2Processor` directly: it works on nested Python lists and pads prompts with
sentinel values, while the tool needs per-object tensors it can batch itself and a
differentiable path for logits. The arithmetic here reproduces the processor exactly
(`tests/test_tool_model.py` checks equality): the uint8 image is resized to a square
`image_size` with antialiased bilinear interpolation (still uint8, as transformers does),
then normalised with ImageNet mean/std; coordinates are scaled per axis by
`image_size / W` and `image_size / H`; low-resolution logits are resized bilinearly
(align_corners=False) straight to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as tvF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageLike = np.ndarray | torch.Tensor


def _as_chw_uint8(image: ImageLike) -> torch.Tensor:
    """Accept an HxWx3 uint8 array/tensor (the dataset's layout) and return a 3xHxW uint8 tensor."""
    tensor = torch.as_tensor(np.asarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got dtype {tensor.dtype} shape {tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1)


def image_to_pixels(image: ImageLike, image_size: int) -> torch.Tensor:
    """One HxWx3 uint8 image -> normalised float32 pixels of shape (3, image_size, image_size)."""
    chw = _as_chw_uint8(image)
    resized = tvF.resize(chw, [image_size, image_size], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN) * 255.0
    std = torch.tensor(IMAGENET_STD) * 255.0
    return (resized.to(torch.float32) - mean[:, None, None]) / std[:, None, None]


def images_to_pixels(images: Sequence[ImageLike], image_size: int) -> torch.Tensor:
    """A batch of HxWx3 uint8 images (any sizes) -> (B, 3, image_size, image_size) float32."""
    return torch.stack([image_to_pixels(image, image_size) for image in images])


def original_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of an HxWx3 image."""
    return int(image.shape[0]), int(image.shape[1])


def scale_coords(coords: torch.Tensor, original_hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """Map (..., 2) x/y pixel coordinates of the original image into the model's input frame.

    Boxes are passed as (..., 2, 2) corner pairs. Scaling is per axis because the image is
    resized to a square without keeping its aspect ratio.
    """
    height, width = original_hw
    scale = torch.tensor([image_size / width, image_size / height], dtype=torch.float32, device=coords.device)
    return coords.to(torch.float32) * scale


def logits_to_original(mask_logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
    """Low-resolution (N, h, w) mask logits -> (N, H, W) logits at the original image size (differentiable)."""
    return F.interpolate(mask_logits[:, None], size=original_hw, mode="bilinear", align_corners=False)[:, 0]


def logits_to_masks(mask_logits: torch.Tensor, original_hw: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """Low-resolution (N, h, w) logits -> (N, H, W) boolean masks at the original size (logit > threshold)."""
    return logits_to_original(mask_logits, original_hw) > threshold
