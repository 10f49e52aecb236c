"""The ``grto:`` section of a recipe, as dataclasses (verl's own config style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_grto.agent.calls import FINAL_MASK_MODES
from verl_grto.algorithm.bto.train import DEFAULT_CACHE_BYTES
from verl_grto.algorithm.tool_step import CALL_WEIGHTINGS
from verl_grto.algorithm.tool_weights import get_weighting, weighting_names
from verl_grto.reward.mask_reward import MaskRewardConfig
from verl_grto.tool.settings import ToolSettings
from verl_grto.trainer.data_preflight import DATA_CHECK_MODES

PLACEMENTS = ("colocated", "separate")
#: What the grto trainer can give a tool-loss weighting (``GRTOTrainer._tool_weights``): the step's
#: sequence advantages and their groups. No target log-probs: ``importance`` is BTO's (library only).
TRAINER_WEIGHTING_INPUTS = ("advantages", "group_ids")


def _plain(cfg: DictConfig | dict[str, Any] | None) -> dict[str, Any]:
    """A recipe section as a plain, resolved dict (empty for a missing section)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


@dataclass
class GRTOConfig:
    """GRTO: the tool gives the rewards, and is trained on the same rollouts.

    ``tool_loss_coef`` is lambda of the joint objective: it multiplies the tool's weighted-mean loss
    (``ToolEngine.objective``; the weights stay relative), so with SGD the tool's step is linear in
    it, while with the tool's AdamW it is nearly scale-free (the learning rate sets the step); 0
    freezes the tool (plain GRPO with tool rewards: no tool update is made). ``weighting`` picks w_i,
    by its name in the registry of verl_grto/algorithm/tool_weights.py, among those that read only
    what the trainer has (:data:`TRAINER_WEIGHTING_INPUTS`: ``uniform``, ``advantage``). ``placement``: ``colocated``
    hosts the tool in the actor's processes (shares their devices); ``separate`` gives
    it a resource pool of its own (``tool_workers_per_node`` devices on each of the trainer's
    nodes), where its update overlaps the actor's. ``min_box_iou`` > 0 trains the tool only on the
    rollouts whose box overlaps the ground truth at least that much (as ``bto.min_box_iou``: a mask
    loss on a prompt that misses the object teaches the tool to predict background); the policy's
    rewards and advantages are unchanged. ``data_check`` says what a bad row of ``data.train_files`` /
    ``data.val_files`` does when the run starts (verl_grto/trainer/data_preflight.py): ``fail`` stops
    the run listing file, row and reason; ``skip`` trains on copies without the bad rows (written to
    the run's ``data_check/`` folder, with a report); ``off`` checks nothing. ``iou_after`` predicts the
    step's rollouts a second time after the tool's update, to log ``grto/tool/iou_after`` beside
    ``iou_before`` (one more pass of the decoder over every rollout: the tiny recipes turn it on).
    The tool's memory is set in ``tool`` (``chunk_images``, ``cache_bytes``; :class:`ToolSettings`).
    """

    tool: ToolSettings
    reward: MaskRewardConfig = field(default_factory=MaskRewardConfig)
    tool_loss_coef: float = 1.0
    weighting: str = "uniform"
    tool_epochs: int = 1
    placement: str = "colocated"
    tool_workers_per_node: int = 1
    min_box_iou: float = 0.0
    log_images_every: int = 0
    num_logged_images: int = 4
    data_check: str = "fail"
    iou_after: bool = False

    def __post_init__(self) -> None:
        try:
            spec = get_weighting(self.weighting)
        except ValueError as exc:  # names the registered weightings
            raise ValueError(f"grto.weighting: {exc}") from None
        missing = [k for k in spec.needs if k not in TRAINER_WEIGHTING_INPUTS]
        if missing:
            usable = [w for w in weighting_names() if set(get_weighting(w).needs) <= set(TRAINER_WEIGHTING_INPUTS)]
            raise ValueError(
                f"grto.weighting: {self.weighting!r} needs {' and '.join(missing)}, which the grto trainer does not"
                f" supply; use one of {usable}. ({self.weighting!r} weights are library-only, for BTO on a buffer of"
                " another policy: verl_grto.algorithm.bto.train.train_tool_on_buffer(weighting=..., target_logprob_fn=...))"
            )
        if not 0 <= self.tool_loss_coef < float("inf"):  # also refuses NaN
            raise ValueError(f"grto.tool_loss_coef must be finite and >= 0, got {self.tool_loss_coef}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"grto.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.tool_workers_per_node < 1:
            raise ValueError(f"grto.tool_workers_per_node must be >= 1, got {self.tool_workers_per_node}")
        if not 0.0 <= self.min_box_iou <= 1.0:
            raise ValueError(f"grto.min_box_iou must be in [0, 1], got {self.min_box_iou}")
        if self.data_check not in DATA_CHECK_MODES:
            raise ValueError(f"grto.data_check must be one of {DATA_CHECK_MODES}, got {self.data_check!r}")

    @property
    def trains_tool(self) -> bool:
        return self.tool_loss_coef > 0 and self.tool_epochs > 0

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any] | None) -> GRTOConfig:
        if cfg is None:
            raise ValueError("the grto trainer needs a `grto:` section with at least grto.tool.path")
        raw = _plain(cfg)
        tool = raw.pop("tool", None)
        if not tool or not tool.get("path"):
            raise ValueError("grto.tool.path is required (a transformers SAM2 directory)")
        reward = raw.pop("reward", {}) or {}
        return cls(tool=ToolSettings.from_config(tool), reward=MaskRewardConfig(**reward), **raw)


@dataclass
class BTOConfig:
    """The ``bto:`` section of a ``bgrto`` recipe: BTO before GRTO (docs/method.md, B-GRTO).

    ``group_size`` answers per training prompt (None: ``actor_rollout_ref.rollout.n``) from the
    initial policy, which *is* the reference policy mu at step 0; ``max_prompts`` caps the prompts
    (None: the whole training set, once); ``epochs`` over the buffer with ``batch_size`` images per
    tool update. Weights are uniform: at BTO time pi_theta = mu, so importance weights are all 1
    (reusing a buffer of another policy with importance weights is
    :func:`verl_grto.algorithm.bto.train.train_tool_on_buffer`'s ``weighting="importance"``).
    ``min_box_iou`` > 0 trains only on rollouts whose box overlaps the ground truth at least that
    much (a policy that does not localise yet otherwise teaches the tool to predict background).
    ``validate_after`` runs a validation between BTO and GRTO (the bootstrap's own effect).
    ``cache_bytes`` bounds the stage's image-feature cache (None: unbounded); when the buffer's images do
    not fit, each is encoded at most once per epoch (:func:`verl_grto.algorithm.bto.train.epoch_order`).
    ``prompts_per_generate`` prompts are sent to verl's rollout at once while the buffer is built
    (None: ``data.train_batch_size``); the buffer is saved after each such chunk, so a crash loses
    at most one. Larger chunks let the rollout servers batch more answers per forward pass.
    """

    group_size: int | None = None
    max_prompts: int | None = None
    prompts_per_generate: int | None = None
    epochs: int = 4
    batch_size: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    min_box_iou: float = 0.0
    validate_after: bool = True
    cache_bytes: int | None = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ValueError(f"bto.cache_bytes must be >= 0 or null, got {self.cache_bytes}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"bto.group_size must be >= 1 or null, got {self.group_size}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"bto.max_prompts must be >= 1 or null, got {self.max_prompts}")
        if self.prompts_per_generate is not None and self.prompts_per_generate < 1:
            raise ValueError(f"bto.prompts_per_generate must be >= 1 or null, got {self.prompts_per_generate}")
        if not 0.0 <= self.min_box_iou <= 1.0:
            raise ValueError(f"bto.min_box_iou must be in [0, 1], got {self.min_box_iou}")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(
                "bto.epochs, bto.batch_size and bto.checkpoint_every must be >= 1: "
                f"{self.epochs}, {self.batch_size}, {self.checkpoint_every}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any] | None) -> BTOConfig:
        return cls(**_plain(cfg))


@dataclass
class AgentConfig:
    """The ``grto_agent:`` section of a multi-turn recipe (trainer mode ``grto_agent``, docs/method.md,
    "Multi-turn: the tool as a call"); the ``grto:`` section is the single-turn trainer's, unchanged.

    ``final_mask`` is the mask a trajectory's reward scores (:func:`verl_grto.agent.calls.final_mask`):
    ``last_call`` (default: the last valid call's, the mask the policy saw last and stopped at; its
    answer's prompts when it made no valid call) or ``answer`` (its final ``<answer>``'s prompts; the last
    valid call's when the answer does not parse). ``call_weighting``: how a trajectory's tool weight is
    shared by its calls, ``split`` (default; every trajectory weighs the same) or ``each``
    (:func:`verl_grto.algorithm.tool_step.tool_call_weights`). ``trace_every`` / ``trace_rows``: every
    that many steps (0: never) the first trajectories of the step are written, turn by turn, to
    ``<default_local_dir>/agent_trace/step_<N>.json``. ``router_max_batch``: calls per batch on the
    tool's workers (:class:`verl_grto.agent.router.ToolCallRouter`)."""

    final_mask: str = "last_call"
    call_weighting: str = "split"
    trace_every: int = 1
    trace_rows: int = 4
    router_max_batch: int = 256

    def __post_init__(self) -> None:
        if self.final_mask not in FINAL_MASK_MODES:
            raise ValueError(f"grto_agent.final_mask must be one of {FINAL_MASK_MODES}, got {self.final_mask!r}")
        if self.call_weighting not in CALL_WEIGHTINGS:
            raise ValueError(f"grto_agent.call_weighting must be one of {CALL_WEIGHTINGS}, got {self.call_weighting!r}")
        if self.trace_every < 0 or self.trace_rows < 0 or self.router_max_batch < 1:
            raise ValueError(
                "grto_agent.trace_every and trace_rows must be >= 0 and router_max_batch >= 1, got "
                f"{self.trace_every}, {self.trace_rows}, {self.router_max_batch}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any] | None) -> AgentConfig:
        raw = _plain(cfg)
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"grto_agent: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**raw)
