"""The ``grto:`` section of a recipe, as dataclasses (verl's own config style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_grto.algorithm.tool_weights import WEIGHTINGS
from verl_grto.reward.mask_reward import MaskRewardConfig
from verl_grto.tool.worker import ToolSettings


@dataclass
class GRTOConfig:
    """GRTO: the tool gives the rewards, and is trained on the same rollouts.

    ``tool_loss_coef`` is lambda of the joint objective; 0 freezes the tool (plain GRPO with tool
    rewards). ``weighting`` picks w_i (verl_grto/algorithm/tool_weights.py).
    """

    tool: ToolSettings
    reward: MaskRewardConfig = field(default_factory=MaskRewardConfig)
    tool_loss_coef: float = 1.0
    weighting: str = "uniform"
    importance_clip: float = 2.0
    tool_epochs: int = 1
    log_images_every: int = 0
    num_logged_images: int = 4

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"grto.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.tool_loss_coef < 0:
            raise ValueError(f"grto.tool_loss_coef must be >= 0, got {self.tool_loss_coef}")

    @property
    def trains_tool(self) -> bool:
        return self.tool_loss_coef > 0 and self.tool_epochs > 0

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any] | None) -> GRTOConfig:
        if cfg is None:
            raise ValueError("the grto trainer needs a `grto:` section with at least grto.tool.path")
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        tool = raw.pop("tool", None)
        if not tool or not tool.get("path"):
            raise ValueError("grto.tool.path is required (a transformers SAM2 directory)")
        reward = raw.pop("reward", {}) or {}
        return cls(tool=ToolSettings(**tool), reward=MaskRewardConfig(**reward), **raw)
