"""`ToolEngine`: prediction and supervised updates of the segmentation tool, with checkpointing.

Why an engine separate from the model: the trainer (a verl worker, wired by the caller)
needs a small, framework-free surface: predict masks for rewards, take one optimiser step
on weighted per-rollout losses, and save/restore everything that determines the next step
(weights, AdamW state, RNG) bit-exactly so that resumed runs are reproducible.

Loss scale (lambda = ``grto.tool_loss_coef``): `ToolEngine.objective` back-propagates
lambda * L_tool, with L_tool = sum_i w_i l_i / sum_i w_i the weighted mean of the per-rollout
losses. The weights only set the rollouts' relative importance (uniform / filter / importance);
lambda multiplies the mean, *after* the division, so it cannot cancel. With plain SGD the step
is linear in lambda; with Adam(W) it is nearly scale-free (Adam divides by the gradient's
running RMS; lambda only moves the result relative to `eps`, and weight decay does not scale),
and gradient clipping (`max_grad_norm`) applies to the scaled gradient. lambda = 0 takes no step.

Data parallelism: when `torch.distributed` is initialised every rank computes gradients on
its own rollouts and the mean is the *global* weighted mean over all ranks' rollouts: the
weight sums are all-reduced first, each rank back-propagates lambda * sum_{i on rank} w_i l_i /
sum_{all i} w_i, and the gradients are summed with all-reduce. (The mean of per-rank weighted
means would weigh a rollout by 1 / (its rank's weight sum), which differs whenever the shards'
weight sums differ.) All ranks agree (by another all-reduce) on whether to skip a step, so a
non-finite loss on one rank cannot desynchronise the replicas. Every rank must make the same
`update` calls with the same `loss_scale`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from verl_grto.tool.cache import EmbeddingCache
from verl_grto.tool.losses import LossConfig, SegLosses, segmentation_losses, weighted_sum
from verl_grto.tool.model import DecodeOutput, SegmentationTool
from verl_grto.tool.preprocess import ImageLike, logits_to_masks
from verl_grto.tool.prompts import PromptLike

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


@dataclass
class ToolBatch:
    """The tool's view of a step: distinct images, and per rollout its image, prompts and ground truth.

    `images[i]` may be None when `sample_ids[i]` is already in the engine's cache this step.
    `image_index[r]` is rollout r's position in `sample_ids`. `gt_masks[r]` (boolean HxW at the
    image's original size) is needed by `update` only.
    """

    sample_ids: list[Hashable]
    images: list[ImageLike | None]
    image_index: list[int]
    prompts: list[Sequence[PromptLike]]
    gt_masks: list[np.ndarray | torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if len(self.sample_ids) != len(self.images):
            raise ValueError(f"{len(self.sample_ids)} sample ids but {len(self.images)} images")
        if len(self.image_index) != len(self.prompts):
            raise ValueError(f"{len(self.image_index)} image indices but {len(self.prompts)} prompt lists")
        if self.gt_masks is not None and len(self.gt_masks) != len(self.prompts):
            raise ValueError(f"{len(self.gt_masks)} ground-truth masks for {len(self.prompts)} rollouts")

    @property
    def num_rollouts(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class ToolEngineConfig:
    """Optimiser and loss settings of the tool: the one place their fields and defaults are written
    (a recipe sets them as ``grto.tool.*``, through :class:`verl_grto.tool.worker.ToolSettings`)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    mask_threshold: float = 0.0  # logit threshold of predicted masks
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class ToolPrediction:
    """Boolean masks at each rollout's original image size, predicted IoU, and prompt bookkeeping."""

    masks: list[torch.Tensor]
    iou: torch.Tensor
    num_objects: torch.Tensor
    prompt_issues: list[list[str]]


@dataclass
class ToolObjective:
    """The tool term of the GRTO objective for one update (docs/method.md, "Joint surrogate").

    `loss` is what `ToolEngine.update` back-propagates on this rank: lambda * sum_{i on rank}
    w_i l_i / W, where W is the sum of the weights over all ranks (the local sum without
    `torch.distributed`). Summing the ranks' gradients gives lambda * dL_tool/dphi for the global
    weighted mean L_tool. `mean`, `bce`, `dice` and `iou_loss` are global weighted means
    (unscaled, detached, the same on every rank; 0 when W = 0); `weight_sum` is W.
    """

    loss: torch.Tensor
    loss_scale: float
    mean: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    iou_loss: torch.Tensor
    weight_sum: torch.Tensor
    losses: SegLosses
    weights: torch.Tensor
    out: DecodeOutput


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_loss_scale(loss_scale: float) -> float:
    loss_scale = float(loss_scale)
    if not np.isfinite(loss_scale) or loss_scale < 0:
        raise ValueError(f"loss_scale must be finite and >= 0, got {loss_scale}")
    return loss_scale


class ToolEngine:
    """Holds the tool, its AdamW optimiser over trainable parameters, and the per-step embedding cache."""

    def __init__(self, tool: SegmentationTool, config: ToolEngineConfig | None = None) -> None:
        self.tool = tool
        self.config = config or ToolEngineConfig()
        self.cache = EmbeddingCache(tool)
        self.params = tool.trainable_parameters()
        if not self.params:
            raise ValueError("the tool has no trainable parameters")
        cfg = self.config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.step = 0

    def begin_step(self) -> None:
        """Start a training step: drop the previous step's cached image features."""
        self.cache.clear()

    def _decode(self, batch: ToolBatch, train: bool) -> DecodeOutput:
        self.tool.train(train)
        if batch.num_rollouts == 0:  # an empty shard: `update` must still join the other ranks' collectives
            return self.tool.empty_output()
        features = self.cache.get(batch.sample_ids, batch.images)
        return self.tool.decode(features, batch.prompts, batch.image_index)

    @torch.no_grad()
    def predict(self, batch: ToolBatch) -> ToolPrediction:
        """Masks for the rollouts' prompts (for rewards and evaluation); no gradients."""
        out = self._decode(batch, train=False)
        masks = [
            logits_to_masks(logits[None], size, self.config.mask_threshold)[0]
            for logits, size in zip(out.mask_logits, out.original_sizes, strict=True)
        ]
        return ToolPrediction(masks, out.iou_pred, out.num_objects, out.prompt_issues)

    def objective(
        self, batch: ToolBatch, weights: Sequence[float] | torch.Tensor | None = None, loss_scale: float = 1.0
    ) -> ToolObjective:
        """lambda * L_tool (lambda = `loss_scale`), the one place the tool's loss coefficient is applied.

        L_tool = sum_i w_i l_i / sum_i w_i over every rank's rollouts (see `ToolObjective`), so
        weights w and c * w (c > 0) give the same objective and lambda scales it linearly. With
        `torch.distributed` initialised this is a collective (one all-reduce of the weight and
        loss sums): every rank must call it.
        """
        if batch.gt_masks is None:
            raise ValueError("update needs gt_masks")
        loss_scale = _check_loss_scale(loss_scale)
        out = self._decode(batch, train=True)
        losses = segmentation_losses(out.mask_logits, batch.gt_masks, out.iou_pred, self.config.loss)
        w = torch.ones(batch.num_rollouts) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        # Rollouts without a usable prompt have a constant mask: nothing to learn from them.
        w = torch.where(out.num_objects.to(w.device) > 0, w, torch.zeros_like(w)).to(losses.total)
        local_sum, local_weight = weighted_sum(losses.total, w)
        parts = [weighted_sum(v.detach(), w)[0] for v in (losses.total, losses.bce, losses.dice, losses.iou_loss)]
        sums = torch.stack([local_weight.detach(), *parts]).to(self.tool.device, torch.float32)
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        weight_sum = sums[0].clamp(min=torch.finfo(sums.dtype).tiny)
        means = sums[1:] / weight_sum
        loss = local_sum / weight_sum.to(local_sum)
        if loss_scale != 1.0:  # lambda after the mean (lambda = 1: the exact loss of an unscaled run)
            loss = loss * loss_scale
        return ToolObjective(
            loss=loss,
            loss_scale=loss_scale,
            mean=means[0],
            bce=means[1],
            dice=means[2],
            iou_loss=means[3],
            weight_sum=sums[0],
            losses=losses,
            weights=w,
            out=out,
        )

    def _sync_flags(self, nonfinite: bool, has_signal: bool) -> tuple[bool, bool]:
        """Make every rank take the same skip decision."""
        if not _distributed():
            return nonfinite, has_signal
        flags = torch.tensor([float(nonfinite), float(has_signal)], device=self.tool.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _all_reduce_grads(self) -> None:
        """Sum gradients over ranks (each rank's loss is already divided by the global weight sum).

        A parameter no rank produced a gradient for (e.g. the object-score head, never in the
        loss) keeps `grad=None`, so AdamW leaves it alone exactly as in a single-process run;
        a rank that lacks a gradient others have contributes zeros.
        """
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=self.tool.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        for p, anywhere in zip(self.params, present.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def update(
        self, batch: ToolBatch, weights: Sequence[float] | torch.Tensor | None = None, loss_scale: float = 1.0
    ) -> dict[str, float]:
        """One optimiser step on `loss_scale` * the weighted mean of per-rollout losses (`objective`).

        `weights` set the rollouts' relative importance only (rescaling them changes nothing);
        `loss_scale` is lambda, applied after the mean: with SGD the step is proportional to it,
        with this engine's AdamW it is nearly scale-free (see the module docstring). The step is
        skipped (metric `skipped` = 1) when `loss_scale` is 0 (the tool stays frozen, optimiser
        state untouched), when the loss or the gradient norm is non-finite on any rank, or when
        no rollout on any rank has both a usable prompt and a positive weight.

        Metrics: `loss`, `bce`, `dice`, `iou_loss` are the unscaled global weighted means,
        `scaled_loss` = `loss_scale` * `loss` (what was back-propagated), `grad_norm` the norm of
        the scaled gradient before clipping; `iou_before` is the mean IoU, over this rank's
        rollouts, of the masks predicted in this forward pass (before the step), at the loss
        resolution.
        """
        obj = self.objective(batch, weights, loss_scale)
        loss, losses, w, out = obj.loss, obj.losses, obj.weights, obj.out
        nonfinite = not (bool(torch.isfinite(loss)) and bool(torch.isfinite(obj.mean)))
        has_signal = bool(loss.requires_grad and (w > 0).any() and obj.loss_scale > 0)
        nonfinite, has_signal = self._sync_flags(nonfinite, has_signal)

        self.optimizer.zero_grad(set_to_none=True)
        if has_signal and not nonfinite and loss.requires_grad:
            loss.backward()
        grad_norm = float("nan")
        skipped = nonfinite or not has_signal
        if not skipped:
            if _distributed():
                self._all_reduce_grads()
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if not np.isfinite(grad_norm):  # identical on all ranks after the all-reduce
                skipped = True
            else:
                self.optimizer.step()
                self.step += 1
        self.optimizer.zero_grad(set_to_none=True)

        return {
            "loss": float(obj.mean),
            "scaled_loss": obj.loss_scale * float(obj.mean),
            "loss_scale": obj.loss_scale,
            "weight_sum": float(obj.weight_sum),
            "bce": float(obj.bce),
            "dice": float(obj.dice),
            "iou_loss": float(obj.iou_loss),
            "grad_norm": grad_norm,
            "iou_before": float(losses.iou.mean()) if len(losses.iou) else float("nan"),
            "skipped": float(skipped),
            "num_rollouts": float(batch.num_rollouts),
            "num_empty": float((out.num_objects == 0).sum()),
            "num_prompt_issues": float(sum(len(r) for r in out.prompt_issues)),
        }

    # ---- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the next step: weights, optimiser state, step count, RNG states."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.tool.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (strict: every weight must be present)."""
        self.tool.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.cache.clear()

    def save(self, directory: str) -> None:
        """Write `model.safetensors` + `config.json` (a valid transformers Sam2 directory), optimizer and RNG files."""
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict()
        weights = {k: v.detach().contiguous() for k, v in state["model"].items()}
        save_file(weights, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
        self.tool.model.config.save_pretrained(directory)
        torch.save({"optimizer": state["optimizer"], "step": state["step"]}, os.path.join(directory, OPTIMIZER_FILE))
        torch.save(state["rng"], os.path.join(directory, RNG_FILE))

    def load(self, directory: str) -> None:
        """Restore what `save` wrote (safetensors for weights, `weights_only` loads for the rest)."""
        device = str(self.tool.device)
        opt = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=device, weights_only=True)
        rng = torch.load(os.path.join(directory, RNG_FILE), map_location="cpu", weights_only=True)
        model = load_file(os.path.join(directory, WEIGHTS_FILE), device=device)
        self.load_state_dict({"model": model, "optimizer": opt["optimizer"], "step": opt["step"], "rng": rng})
