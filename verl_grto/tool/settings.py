"""`ToolSettings`: the recipe's ``grto.tool`` section, and the one place the tool is built from it.

Why a module of its own, free of verl: the trainer's workers (:mod:`verl_grto.tool.worker`), the
benchmarks and the GPU check (``benchmarks/gpu/device_check.py``, run where verl is not installed)
all build the tool from these settings, so each runs what the others run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from verl_grto.tool.engine import ToolEngineConfig
from verl_grto.tool.losses import LossConfig
from verl_grto.tool.model import SegmentationTool


@dataclass(frozen=True, kw_only=True)
class ToolSettings(ToolEngineConfig):
    """The recipe's ``grto.tool`` section: where the tool comes from (``path``, a transformers SAM2
    directory; ``trainable``, the parts that train), how it is built (``freeze_high_res_convs``: keep
    the mask decoder's ``conv_s0``/``conv_s1`` frozen, so the cache holds their ~5x smaller projected
    features; ``stability_fallback``; ``min_box_size`` in pixels; ``encoder_dtype``, e.g. ``bfloat16``
    for the frozen encoder, None: float32; see :class:`~verl_grto.tool.model.SegmentationTool`) plus its
    engine's optimiser, loss and memory settings.

    Why a subclass: the engine's settings (fields and defaults) are written once, in
    :class:`ToolEngineConfig`; the recipe names them flat (``grto.tool.lr``, ``grto.tool.loss.*``), and
    a worker hands these settings to its :class:`ToolEngine` as they are. A plain frozen dataclass: it
    travels through Ray."""

    path: str
    trainable: str = "mask_decoder"
    freeze_high_res_convs: bool = False
    stability_fallback: bool = False
    min_box_size: float = 1.0
    encoder_dtype: str | None = None

    def build_tool(self, device: torch.device | str = "cpu") -> SegmentationTool:
        """The tool these settings describe, loaded from ``path`` (float32 weights) onto ``device``."""
        return SegmentationTool.from_pretrained(
            self.path,
            trainable=self.trainable,
            freeze_high_res_convs=self.freeze_high_res_convs,
            stability_fallback=self.stability_fallback,
            min_box_size=self.min_box_size,
            encoder_dtype=self.encoder_dtype,
        ).to(device)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> ToolSettings:
        """From the section as a plain dict (``loss`` a dict of :class:`LossConfig` fields)."""
        raw = dict(raw)
        if "loss" in raw:
            raw["loss"] = LossConfig(**(raw["loss"] or {}))
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        return cls(**raw)
