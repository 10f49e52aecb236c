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

Memory is bounded by configuration, not by the batch (`ToolEngineConfig.chunk_images`,
`cache_bytes`): `predict` and `update` walk the batch in chunks of `chunk_images` images, each with
all of its rollouts (so an image is encoded once, whatever the number of rollouts), and the feature
cache is an LRU bounded in bytes. `update` back-propagates chunk by chunk, accumulating gradients:
the activations of one chunk are alive at a time.

Masks stay where they are made: `predict` scores each rollout's mask against the ground truth the
batch carries (decoded here, once per dataset row, as COCO RLE travels compactly) and returns two
integers per rollout, the pixel intersection and union (ignore regions left out,
`verl_grto.reward.mask_iou.count_overlap`); whole masks only for the rollouts asked for.

Data parallelism: when `torch.distributed` is initialised every rank computes gradients on
its own rollouts and the mean is the *global* weighted mean over all ranks' rollouts: each rank
back-propagates lambda * sum_{i on rank} w_i l_i, one all-reduce (a single flat bucket holding the
weight and loss sums, the skip flags, which parameters have gradients, and every gradient) sums
them over ranks, and the gradients are then divided by the global weight sum sum_{all i} w_i.
(The mean of per-rank weighted means would weigh a rollout by 1 / (its rank's weight sum), which
differs whenever the shards' weight sums differ.) All ranks take the same skip decision from the
reduced flags, so a non-finite loss on one rank cannot desynchronise the replicas. Every rank must
make the same `update` calls with the same `loss_scale`.

Randomness: the tool draws from its own stream (a `torch.Generator` per device, `ToolEngine.rng`),
swapped in around its training forward passes, saved and restored with its checkpoint; the
process's global RNG (which verl saves and restores per actor rank) is never set by the tool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from verl_grto.data.masks import decode_rle, fill_boxes
from verl_grto.reward.mask_iou import count_overlap
from verl_grto.tool.cache import EmbeddingCache
from verl_grto.tool.losses import LossConfig, SegLosses, segmentation_losses, weighted_sum
from verl_grto.tool.model import DecodeOutput, ImageFeatures, SegmentationTool
from verl_grto.tool.preprocess import ImageLike, logits_to_masks
from verl_grto.tool.prompts import PromptLike

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"

#: A ground-truth mask: bool HxW (numpy or torch), or a COCO RLE dict ``{"size": [H, W], "counts": str}``.
MaskLike = np.ndarray | torch.Tensor | dict


@dataclass(frozen=True)
class ToolTarget:
    """One dataset row's ground truth, as the tool scores and trains against it: the referred objects'
    mask and the pixels no score counts (ReasonSeg's ignore regions; None: none), both at the image's
    original size. RLE dicts travel compactly and are decoded where they are used, once per row."""

    mask: MaskLike
    ignore: MaskLike | None = None


TargetLike = ToolTarget | np.ndarray | torch.Tensor | dict


def _as_target(target: TargetLike) -> ToolTarget:
    return target if isinstance(target, ToolTarget) else ToolTarget(target)


def _bool_mask(mask: MaskLike, device: torch.device) -> torch.Tensor:
    """A bool (H, W) tensor on ``device`` from a mask or a COCO RLE dict."""
    if isinstance(mask, dict):
        mask = decode_rle(mask)
    return torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask, device=device).bool()


@dataclass
class ToolBatch:
    """The tool's view of a step: distinct images, and per rollout its image, prompts and ground truth.

    ``image_keys[j]`` is image j's key in the feature cache (rows that show the same image share it,
    :class:`verl_grto.data.image_store.SampleImageStore`); ``images[j]`` may be None when the engine's
    cache holds its features or its ``image_loader`` can read it by key. ``image_index[r]`` is rollout
    r's image. ``targets`` are the distinct ground truths (one per dataset row) and ``target_index[r]``
    rollout r's (None: one target per rollout, in order); needed by ``update`` and for scores.
    """

    image_keys: list[Hashable]
    images: list[ImageLike | None]
    image_index: list[int]
    prompts: list[Sequence[PromptLike]]
    targets: list[TargetLike] | None = None
    target_index: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.image_keys) != len(self.images):
            raise ValueError(f"{len(self.image_keys)} image keys but {len(self.images)} images")
        if len(self.image_index) != len(self.prompts):
            raise ValueError(f"{len(self.image_index)} image indices but {len(self.prompts)} prompt lists")
        if self.targets is None:
            if self.target_index is not None:
                raise ValueError("target_index without targets")
            return
        if self.target_index is None:
            if len(self.targets) != len(self.prompts):
                raise ValueError(f"{len(self.targets)} ground truths for {len(self.prompts)} rollouts")
            self.target_index = list(range(len(self.prompts)))
        if len(self.target_index) != len(self.prompts):
            raise ValueError(f"{len(self.target_index)} target indices for {len(self.prompts)} rollouts")
        if self.target_index and not 0 <= min(self.target_index) <= max(self.target_index) < len(self.targets):
            raise ValueError(f"target_index outside the {len(self.targets)} targets")

    @property
    def num_rollouts(self) -> int:
        return len(self.prompts)

    def target(self, r: int) -> ToolTarget:
        """Rollout r's ground truth."""
        if self.targets is None or self.target_index is None:
            raise ValueError("this batch carries no ground truth")
        return _as_target(self.targets[self.target_index[r]])


@dataclass(frozen=True)
class ToolEngineConfig:
    """Optimiser, loss and memory settings of the tool: the one place their fields and defaults are
    written (a recipe sets them as ``grto.tool.*``, through :class:`verl_grto.tool.worker.ToolSettings`).

    ``chunk_images`` images (with all their rollouts) are encoded and decoded at a time, in prediction
    and in updates; ``cache_bytes`` bounds the feature cache (None: unbounded); ``seed`` starts the
    tool's own RNG stream."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    mask_threshold: float = 0.0  # logit threshold of predicted masks
    loss: LossConfig = field(default_factory=LossConfig)
    chunk_images: int = 4
    cache_bytes: int | None = 2 << 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {self.chunk_images}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 or null, got {self.cache_bytes}")


@dataclass
class ToolPrediction:
    """Per rollout (R of them): boolean masks at the original image size (None where not asked for),
    predicted IoU ``(R,)``, objects decoded ``(R,)``, prompt issues; when the batch has ground truths,
    the pixel ``intersection`` and ``union`` of each mask with its ground truth ``(R,)`` int64 (ignore
    pixels in neither), and with ``fill_baseline`` the same counts for the mask that fills the
    rollout's boxes (``fill_intersection`` / ``fill_union``)."""

    masks: list[torch.Tensor | None]
    iou: torch.Tensor
    num_objects: torch.Tensor
    prompt_issues: list[list[str]]
    intersection: np.ndarray | None = None
    union: np.ndarray | None = None
    fill_intersection: np.ndarray | None = None
    fill_union: np.ndarray | None = None


@dataclass
class ToolObjective:
    """The tool term of the GRTO objective for one update (docs/method.md, "Joint surrogate").

    `loss` is this rank's share of lambda * L_tool: lambda * sum_{i on rank} w_i l_i / W, where W is
    the sum of the weights over all ranks (the local sum without `torch.distributed`). Summing the
    ranks' gradients gives lambda * dL_tool/dphi for the global weighted mean L_tool. `mean`, `bce`,
    `dice` and `iou_loss` are global weighted means (unscaled, detached, the same on every rank; 0
    when W = 0); `weight_sum` is W.
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
    num_objects: torch.Tensor


@dataclass
class _Chunk:
    """A chunk's decoded rollouts: their positions in the batch, the decoder output, per-rollout losses and
    weights (0 where no object was decoded)."""

    rollouts: list[int]
    out: DecodeOutput
    losses: SegLosses
    weights: torch.Tensor


#: Sums all-reduced with every update, in this order (the flat bucket's head).
_SUMS = ("weight", "loss", "bce", "dice", "iou_loss", "iou", "rollouts", "empty", "prompt_issues")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_loss_scale(loss_scale: float) -> float:
    loss_scale = float(loss_scale)
    if not np.isfinite(loss_scale) or loss_scale < 0:
        raise ValueError(f"loss_scale must be finite and >= 0, got {loss_scale}")
    return loss_scale


class ToolEngine:
    """Holds the tool, its AdamW optimiser over trainable parameters, the bounded feature cache and the
    tool's RNG. ``image_loader(key)`` (optional) reads an image the batch does not carry and the cache
    does not hold (the tool's workers read from the dataset's parquet files, so images never travel
    through the driver)."""

    def __init__(
        self,
        tool: SegmentationTool,
        config: ToolEngineConfig | None = None,
        image_loader: Callable[[Hashable], ImageLike] | None = None,
    ) -> None:
        self.tool = tool
        self.config = config or ToolEngineConfig()
        self.cache = EmbeddingCache(tool, encode_batch_size=self.config.chunk_images, max_bytes=self.config.cache_bytes)
        self.image_loader = image_loader
        self.params = tool.trainable_parameters()
        if not self.params:
            raise ValueError("the tool has no trainable parameters")
        cfg = self.config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.rng = self._new_rng(cfg.seed)

    def begin_step(self) -> None:
        """Start a training step: drop the previous step's cached image features."""
        self.cache.clear()

    # ---- randomness --------------------------------------------------------------------------
    def _new_rng(self, seed: int) -> dict[str, torch.Generator]:
        """The tool's RNG: one generator for the CPU and, on an accelerator, one for the tool's device."""
        gens = {"cpu": torch.Generator(device="cpu").manual_seed(seed)}
        if self.tool.device.type == "cuda":
            gens["cuda"] = torch.Generator(device=self.tool.device).manual_seed(seed)
        return gens

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run the block on the tool's RNG stream: the global states are swapped for the tool's generators'
        and restored after (``torch.random.fork_rng``), the generators keep what the block drew."""
        cuda = "cuda" in self.rng
        devices = [self.tool.device.index or 0] if cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.rng["cpu"].get_state())
            if cuda:
                torch.cuda.set_rng_state(self.rng["cuda"].get_state(), devices[0])
            try:
                yield
            finally:
                self.rng["cpu"].set_state(torch.get_rng_state())
                if cuda:
                    self.rng["cuda"].set_state(torch.cuda.get_rng_state(devices[0]))

    # ---- chunks ------------------------------------------------------------------------------
    def chunks(self, batch: ToolBatch) -> list[tuple[list[int], list[int]]]:
        """(images, rollouts) of each chunk: ``chunk_images`` images in batch order with all their rollouts
        (rollouts in batch order); images without a rollout are skipped."""
        rollouts_of: dict[int, list[int]] = {}
        for r, j in enumerate(batch.image_index):
            if not 0 <= j < len(batch.image_keys):
                raise IndexError(f"rollout {r}: image index {j} outside the batch's {len(batch.image_keys)} images")
            rollouts_of.setdefault(j, []).append(r)
        images = sorted(rollouts_of)
        k = self.config.chunk_images
        return [
            (images[s : s + k], sorted(r for j in images[s : s + k] for r in rollouts_of[j]))
            for s in range(0, len(images), k)
        ]

    def _features(self, batch: ToolBatch, images: Sequence[int]) -> ImageFeatures:
        keys = [batch.image_keys[j] for j in images]
        given = [batch.images[j] for j in images]
        if self.image_loader is not None:
            given = [
                self.image_loader(key) if image is None and key not in self.cache else image
                for key, image in zip(keys, given, strict=True)
            ]
        return self.cache.get(keys, given)

    def _decode_chunk(self, batch: ToolBatch, images: list[int], rollouts: list[int]) -> DecodeOutput:
        features = self._features(batch, images)
        local = {j: i for i, j in enumerate(images)}
        return self.tool.decode(
            features, [batch.prompts[r] for r in rollouts], [local[batch.image_index[r]] for r in rollouts]
        )

    # ---- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self, batch: ToolBatch, *, return_masks: bool | Sequence[int] = True, fill_baseline: bool = False
    ) -> ToolPrediction:
        """Masks for the rollouts' prompts, under no gradient; scored against the batch's ground truths
        when it has them (see :class:`ToolPrediction`). ``return_masks``: True for every rollout's mask,
        False for none, or the rollout positions to keep; ``fill_baseline`` also scores the rollouts'
        boxes filled (the trivial baseline validation reports)."""
        self.tool.train(False)
        n = batch.num_rollouts
        keep = set(range(n)) if return_masks is True else set(return_masks or ())
        scored = batch.targets is not None
        masks: list[torch.Tensor | None] = [None] * n
        iou = torch.zeros(n)
        num_objects = torch.zeros(n, dtype=torch.long)
        issues: list[list[str]] = [[] for _ in range(n)]
        counts = np.zeros((4, n), dtype=np.int64)  # intersection, union, fill intersection, fill union
        for images, rollouts in self.chunks(batch):
            out = self._decode_chunk(batch, images, rollouts)
            for k, r in enumerate(rollouts):
                iou[r], num_objects[r], issues[r] = (
                    float(out.iou_pred[k]),
                    int(out.num_objects[k]),
                    out.prompt_issues[k],
                )
            position = {r: k for k, r in enumerate(rollouts)}
            for j in images:  # one image's rollouts at once: one upsampling, one size
                mine = [r for r in rollouts if batch.image_index[r] == j]
                size = out.original_sizes[position[mine[0]]]
                pred = logits_to_masks(out.mask_logits[[position[r] for r in mine]], size, self.config.mask_threshold)
                for k, r in enumerate(mine):
                    if r in keep:
                        masks[r] = pred[k].cpu()
                if scored:
                    self._score(batch, mine, pred, size, counts, fill_baseline)
        return ToolPrediction(
            masks,
            iou,
            num_objects,
            issues,
            *((counts[0], counts[1]) if scored else (None, None)),
            *((counts[2], counts[3]) if scored and fill_baseline else (None, None)),
        )

    def _score(
        self,
        batch: ToolBatch,
        rollouts: list[int],
        pred: torch.Tensor,
        size: tuple[int, int],
        counts: np.ndarray,
        fill_baseline: bool,
    ) -> None:
        """Write the overlap counts of one image's predicted masks ``pred`` (len(rollouts), H, W) into
        ``counts``; each distinct ground truth is decoded once."""
        device = pred.device
        assert batch.target_index is not None
        by_target: dict[int, list[int]] = {}
        for k, r in enumerate(rollouts):
            by_target.setdefault(batch.target_index[r], []).append(k)
        for t, ks in by_target.items():
            target = _as_target(batch.targets[t])  # type: ignore[index]
            gt = _bool_mask(target.mask, device)
            if tuple(gt.shape) != tuple(size):
                raise ValueError(f"ground truth {tuple(gt.shape)} differs from its image's size {tuple(size)}")
            ignore = None if target.ignore is None else _bool_mask(target.ignore, device)
            inter, union = count_overlap(pred[ks], gt, ignore)
            idx = [rollouts[k] for k in ks]
            counts[0, idx], counts[1, idx] = inter.cpu().numpy(), union.cpu().numpy()
            if fill_baseline:
                filled = np.stack(
                    [fill_boxes([p.box for p in batch.prompts[r] if p.box is not None], *size) for r in idx]
                )
                inter, union = count_overlap(torch.as_tensor(filled, device=device), gt, ignore)
                counts[2, idx], counts[3, idx] = inter.cpu().numpy(), union.cpu().numpy()

    # ---- the tool's loss ---------------------------------------------------------------------
    def _chunk_losses(self, batch: ToolBatch, images: list[int], rollouts: list[int], w_all: torch.Tensor) -> _Chunk:
        """Decode one chunk in training mode and compute its rollouts' losses (graph attached)."""
        out = self._decode_chunk(batch, images, rollouts)
        device = out.mask_logits.device
        targets = [batch.target(r) for r in rollouts]
        decoded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for r, target in zip(rollouts, targets, strict=True):
            t = batch.target_index[r]  # type: ignore[index]
            if t not in decoded:
                decoded[t] = (
                    _bool_mask(target.mask, device),
                    None if target.ignore is None else _bool_mask(target.ignore, device),
                )
        pairs = [decoded[batch.target_index[r]] for r in rollouts]  # type: ignore[index]
        ignores = [ig for _, ig in pairs]
        losses = segmentation_losses(
            out.mask_logits,
            [gt for gt, _ in pairs],
            out.iou_pred,
            self.config.loss,
            ignores if any(ig is not None for ig in ignores) else None,
        )
        w = w_all[rollouts]
        # Rollouts without a usable prompt have a constant mask: nothing to learn from them.
        w = torch.where(out.num_objects.to(w.device) > 0, w, torch.zeros_like(w)).to(losses.total)
        return _Chunk(rollouts, out, losses, w)

    def _weights(self, batch: ToolBatch, weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
        if batch.targets is None:
            raise ValueError("update needs the batch's ground truths (targets)")
        w = torch.ones(batch.num_rollouts) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (batch.num_rollouts,):
            raise ValueError(f"{tuple(w.shape)} weights for {batch.num_rollouts} rollouts")
        return w

    def objective(
        self, batch: ToolBatch, weights: Sequence[float] | torch.Tensor | None = None, loss_scale: float = 1.0
    ) -> ToolObjective:
        """lambda * L_tool (lambda = `loss_scale`): the tool term of docs/method.md as one differentiable value.

        L_tool = sum_i w_i l_i / sum_i w_i over every rank's rollouts (see `ToolObjective`), so weights w
        and c * w (c > 0) give the same objective and lambda scales it linearly. `update` takes the
        gradient of exactly this, chunk by chunk (tests/test_tool_engine.py checks they agree). With
        `torch.distributed` initialised this is a collective (one all-reduce of the weight and loss
        sums): every rank must call it. It keeps every chunk's graph: for tests and small batches.
        """
        loss_scale = _check_loss_scale(loss_scale)
        w_all = self._weights(batch, weights)
        self.tool.train(True)
        with self.own_rng():
            parts = [self._chunk_losses(batch, i, r, w_all) for i, r in self.chunks(batch)]
        if parts:
            losses = SegLosses(
                *(torch.cat([getattr(c.losses, f) for c in parts]) for f in SegLosses.__dataclass_fields__)
            )
            w = torch.cat([c.weights for c in parts])
            num_objects = torch.cat([c.out.num_objects for c in parts])
        else:  # an empty shard: it must still join the other ranks' collective
            empty = torch.zeros(0, device=self.tool.device, requires_grad=False)
            losses, w, num_objects = (
                SegLosses(empty, empty, empty, empty, empty),
                empty,
                torch.zeros(0, dtype=torch.long),
            )
        local_sum, local_weight = weighted_sum(losses.total, w)
        sums = [weighted_sum(v.detach(), w)[0] for v in (losses.total, losses.bce, losses.dice, losses.iou_loss)]
        sums = torch.stack([local_weight.detach(), *sums]).to(self.tool.device, torch.float32)
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        weight_sum = sums[0].clamp(min=torch.finfo(sums.dtype).tiny)
        means = sums[1:] / weight_sum
        loss = local_sum / weight_sum.to(local_sum)
        if loss_scale != 1.0:  # lambda after the mean (lambda = 1: the exact loss of an unscaled run)
            loss = loss * loss_scale
        return ToolObjective(loss, loss_scale, means[0], means[1], means[2], means[3], sums[0], losses, w, num_objects)

    # ---- one optimiser step ------------------------------------------------------------------
    def update(
        self, batch: ToolBatch, weights: Sequence[float] | torch.Tensor | None = None, loss_scale: float = 1.0
    ) -> dict[str, float]:
        """One optimiser step on `loss_scale` * the weighted mean of per-rollout losses (`objective`).

        Chunk by chunk (``chunk_images`` images and their rollouts, last chunk first: what a preceding
        ``predict`` of the batch left in the cache comes first), each rank back-propagates
        lambda * sum_{i in chunk} w_i l_i, accumulating gradients, so one chunk's activations are alive at
        a time; then one all-reduce (a flat bucket) sums the gradients and the weight and loss sums over
        ranks, and the gradients are divided by the global weight sum: the gradient of `objective`.
        `weights` set the rollouts' relative importance only (rescaling them changes nothing);
        `loss_scale` is lambda, applied after the mean: with SGD the step is proportional to it, with
        this engine's AdamW it is nearly scale-free (see the module docstring). The step is skipped
        (metric `skipped` = 1) when `loss_scale` is 0 (the tool stays frozen, optimiser state
        untouched), when the loss or the gradient norm is non-finite on any rank, or when no rollout on
        any rank has both a usable prompt and a positive weight.

        Metrics, the same on every rank (reduced over all of them): `loss`, `bce`, `dice`, `iou_loss`
        are the unscaled global weighted means, `scaled_loss` = `loss_scale` * `loss` (what was
        back-propagated), `grad_norm` the norm of the scaled gradient before clipping, `iou_before` the
        mean IoU of the masks of this forward pass (before the step) at the loss resolution,
        `num_rollouts`, `num_empty` (rollouts without a decoded object), `num_prompt_issues`;
        `chunks` is this rank's number of chunks.
        """
        loss_scale = _check_loss_scale(loss_scale)
        w_all = self._weights(batch, weights)
        # Chunks back-propagate lambda * sum_i (w_i / S) l_i with S this rank's weight total, known before
        # any decode: the accumulated gradient stays at the scale of one rollout's (w and c * w give the
        # same bits), and is multiplied back by S once, before the ranks' gradients are summed.
        rank_scale = float(w_all.sum()) if float(w_all.sum()) > 0 else 1.0
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        nonfinite = has_signal = False
        # last chunk first: a `predict` of this batch (the step's rewards) walked the chunks in order, so
        # the images it left in the bounded cache are its last ones; starting there, only the images the
        # cache could not keep are encoded again
        chunks = self.chunks(batch)[::-1]
        self.tool.train(True)
        with self.own_rng():
            for images, rollouts in chunks:
                chunk = self._chunk_losses(batch, images, rollouts, w_all)
                local_sum, local_weight = weighted_sum(chunk.losses.total, chunk.weights)
                parts = [
                    weighted_sum(v.detach(), chunk.weights)[0]
                    for v in (chunk.losses.bce, chunk.losses.dice, chunk.losses.iou_loss)
                ]
                sums += torch.tensor(
                    [
                        float(local_weight),
                        float(local_sum.detach()),
                        *(float(v) for v in parts),
                        float(chunk.losses.iou.sum()),
                        float(len(rollouts)),
                        float((chunk.out.num_objects == 0).sum()),
                        float(sum(len(p) for p in chunk.out.prompt_issues)),
                    ],
                    dtype=torch.float64,
                )
                if not bool(torch.isfinite(local_sum)):
                    nonfinite = True
                elif not nonfinite and loss_scale > 0 and float(local_weight) > 0 and local_sum.requires_grad:
                    (local_sum * (loss_scale / rank_scale)).backward()  # this chunk's graph is freed here
                    has_signal = True
        nonfinite, has_signal, sums = self._reduce_gradients(sums, nonfinite, has_signal, rank_scale)
        metrics = dict(zip(_SUMS, sums.tolist(), strict=True))
        weight_sum = metrics["weight"]
        mean = lambda key: metrics[key] / weight_sum if weight_sum > 0 else 0.0  # noqa: E731
        grad_norm = float("nan")
        skipped = nonfinite or not has_signal or not np.isfinite(mean("loss"))
        if not skipped:
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if not np.isfinite(grad_norm):  # identical on all ranks after the all-reduce
                skipped = True
            else:
                self.optimizer.step()
                self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": mean("loss"),
            "scaled_loss": loss_scale * mean("loss"),
            "loss_scale": loss_scale,
            "weight_sum": weight_sum,
            "bce": mean("bce"),
            "dice": mean("dice"),
            "iou_loss": mean("iou_loss"),
            "grad_norm": grad_norm,
            "iou_before": metrics["iou"] / metrics["rollouts"] if metrics["rollouts"] else float("nan"),
            "skipped": float(skipped),
            "num_rollouts": metrics["rollouts"],
            "num_empty": metrics["empty"],
            "num_prompt_issues": metrics["prompt_issues"],
            "chunks": float(len(chunks)),
        }

    def _reduce_gradients(
        self, sums: torch.Tensor, nonfinite: bool, has_signal: bool, rank_scale: float
    ) -> tuple[bool, bool, torch.Tensor]:
        """Sum the accumulated gradients (times ``rank_scale``, undoing the chunks' normalisation), ``sums``
        and the skip flags over ranks in one all-reduce (one flat bucket), then divide the gradients by the
        global weight sum. Returns (nonfinite anywhere, signal anywhere, reduced sums).

        A parameter no rank produced a gradient for (e.g. the object-score head, never in the loss) keeps
        `grad=None`, so AdamW leaves it alone exactly as in a single-process run; a rank that lacks a
        gradient others have contributes zeros."""
        device = self.tool.device
        present = [p.grad is not None for p in self.params]
        head = torch.cat(
            [
                sums.to(torch.float32),
                torch.tensor([float(nonfinite), float(has_signal)]),
                torch.tensor(present, dtype=torch.float32),
            ]
        ).to(device)
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device) for p in self.params
        ]
        bucket = torch.cat([head, *[g.to(torch.float32) for g in grads]])
        bucket[len(head) :] *= rank_scale
        if _distributed():
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
        k = len(_SUMS)
        reduced = bucket[:k].to(torch.float64).cpu()
        flags = bucket[k : k + 2].tolist()
        anywhere = bucket[k + 2 : k + 2 + len(self.params)].tolist()
        weight_sum = max(float(reduced[0]), torch.finfo(torch.float32).tiny)
        offset = k + 2 + len(self.params)
        for p, has_grad in zip(self.params, anywhere, strict=True):
            size = p.numel()
            if has_grad > 0:
                p.grad = (bucket[offset : offset + size] / weight_sum).view_as(p).to(p.dtype)
            else:
                p.grad = None
            offset += size
        return flags[0] > 0, flags[1] > 0, reduced

    # ---- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the next step: weights, optimiser state, step count, the tool's RNG
        (its own generators' states, never the process's)."""
        rng = {f"tool_{device}": gen.get_state() for device, gen in self.rng.items()}
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
        for device, gen in self.rng.items():
            saved = state["rng"].get(f"tool_{device}")
            if saved is not None:  # a checkpoint from another device type keeps this device's seeded stream
                gen.set_state(saved.cpu())
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
