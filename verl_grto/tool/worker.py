"""The SAM2 tool as a verl worker: predict, update, save/load, in verl's single-controller style.

:class:`ToolWorkerMixin` holds the tool operations as ``@register``-dispatched methods. Mixed into
verl's ``ActorRolloutRefWorker`` (:class:`ActorRolloutRefToolWorker`, the default) the tool lives in
the actor's processes, on the actor's devices, and its data-parallel gradient all-reduce uses the
process group the actor already initialised. Each rank gets a shard of the rollouts
(``Dispatch.DP_COMPUTE``: the driver passes one ``ToolBatch`` per rank); every rank ends an update
with identical weights, so rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import encode_rle
from verl_grto.faults import kill_point
from verl_grto.tool.engine import ToolBatch, ToolEngine, ToolPrediction
from verl_grto.tool.settings import ToolSettings


class ToolJob(Protocol):
    """Work sent from a layer above the tool to run on every rank with that rank's engine.

    Why a callable rather than a method per algorithm: the worker only hosts the engine; training
    loops such as BTO's off-policy stage (:class:`verl_grto.algorithm.bto.train.BTORequest`) belong
    to the algorithm layer, which the tool layer must not import (docs/architecture.md). A job must
    be picklable (it travels through Ray): a dataclass instance of a module-level class is.
    """

    def __call__(self, engine: ToolEngine, rank: int, world_size: int) -> dict[str, Any]: ...


@dataclass
class ToolScores:
    """One rank's predictions as they travel back to the driver: per rollout (R of them) the pixel
    overlap of its mask with its ground truth (``intersection``, ``union``: int64 ``(R,)``, ignore
    regions left out; None when the batch had no ground truth), the same for its boxes filled when
    asked (``fill_*``), the predicted IoU and objects decoded ``(R,)``; prompt issues and masks (COCO
    RLE, original size) only for the rollouts that have issues / were asked for.

    Why no masks: a mask is 1-3 MB at 1-3 MP, a step has ~1000 rollouts, and the driver only needs
    their scores; a few RLE masks feed the logged overlays."""

    intersection: np.ndarray | None
    union: np.ndarray | None
    fill_intersection: np.ndarray | None
    fill_union: np.ndarray | None
    iou_pred: np.ndarray
    num_objects: np.ndarray
    prompt_issues: dict[int, list[str]]
    masks: dict[int, dict[str, Any]]

    @property
    def num_rollouts(self) -> int:
        return len(self.iou_pred)

    @classmethod
    def empty(cls) -> ToolScores:
        zeros = np.zeros(0, dtype=np.int64)
        return cls(zeros, zeros, None, None, np.zeros(0, np.float32), np.zeros(0, np.int32), {}, {})

    @classmethod
    def from_prediction(cls, pred: ToolPrediction, mask_rows: list[int]) -> ToolScores:
        return cls(
            pred.intersection,
            pred.union,
            pred.fill_intersection,
            pred.fill_union,
            pred.iou.numpy().astype(np.float32),
            pred.num_objects.numpy().astype(np.int32),
            {r: list(p) for r, p in enumerate(pred.prompt_issues) if p},
            {r: encode_rle(pred.masks[r].numpy()) for r in mask_rows if pred.masks[r] is not None},
        )


def worker_device() -> torch.device:
    """The device verl gave this worker process (the actor's), through verl's platform layer."""
    from verl.utils.device import get_device_id, get_device_name

    name = get_device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, get_device_id())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class ToolWorkerMixin:
    """Tool operations for a verl worker class (see the module docstring)."""

    tool_engine: ToolEngine

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_tool(self, settings: ToolSettings, image_files: list[str] | None = None) -> int:
        """Build the tool on this worker's device; with ``image_files`` (the run's parquet files) the
        engine reads the images it needs itself, by key, so they never travel through the driver."""
        loader = SampleImageStore(image_files).image_by_key if image_files else None
        self.tool_engine = ToolEngine(settings.build_tool(worker_device()), settings, image_loader=loader)
        return sum(p.numel() for p in self.tool_engine.params)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_begin_step(self) -> None:
        """A new step: image embeddings cached for the previous step are dropped."""
        self.tool_engine.begin_step()

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def tool_predict(
        self, batch: ToolBatch, mask_rows: list[int] | None = None, fill_baseline: bool = False
    ) -> ToolScores:
        """Score this rank's shard (:class:`ToolScores`); ``mask_rows``: the rollouts whose masks come back.
        ``Dispatch.DP_COMPUTE``: the driver passes one value per rank for every argument."""
        if batch.num_rollouts == 0:
            return ToolScores.empty()
        rows = list(mask_rows or [])
        pred = self.tool_engine.predict(batch, return_masks=rows, fill_baseline=fill_baseline)
        return ToolScores.from_prediction(pred, rows)

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def tool_update(self, batch: ToolBatch, weights: list[float], loss_scale: float = 1.0) -> dict[str, float]:
        """One tool step on this rank's shard; `loss_scale` is lambda (`ToolEngine.objective`), the same
        on every rank (``Dispatch.DP_COMPUTE``: the driver passes a list with one copy per rank)."""
        metrics = self.tool_engine.update(batch, weights, loss_scale)
        kill_point("grto.tool_update")  # the tool is updated in memory, the step's checkpoint not written
        return metrics

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_run(self, job: ToolJob) -> dict[str, Any]:
        """Run ``job`` on every rank with this rank's engine (e.g. BTO stage 2, which trains on the
        rank's share of the buffer; the engine's all-reduce keeps the ranks' weights identical).
        Returns the job's result."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return job(self.tool_engine, _rank(), world)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_save(self, directory: str) -> None:
        if _rank() == 0:
            self.tool_engine.save(directory)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_load(self, directory: str) -> int:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no tool checkpoint at {directory}")
        self.tool_engine.load(directory)
        return self.tool_engine.step

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_settings(self) -> dict[str, Any]:
        return asdict(self.tool_engine.config)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_fingerprint(self) -> dict[str, Any]:
        """Rank, world size, backend, device, Ray node, tool step and a SHA-256 of the trainable weights.

        Why: replicas must hold identical weights after every update (rank 0 alone checkpoints);
        comparing digests across ranks checks that without moving the weights to the driver. Here,
        not only on the tool's own pool, so the check holds for both placements."""
        import ray

        digest = hashlib.sha256()
        for p in self.tool_engine.params:
            digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        initialized = torch.distributed.is_initialized()
        return {
            "rank": _rank(),
            "world_size": torch.distributed.get_world_size() if initialized else 1,
            "backend": str(torch.distributed.get_backend()) if initialized else "none",
            "device": str(self.tool_engine.tool.device),
            "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "step": self.tool_engine.step,
            "digest": digest.hexdigest(),
        }


def fingerprint_metrics(fingerprints: list[dict[str, Any]]) -> dict[str, float]:
    """Per-step metrics from every rank's :meth:`ToolWorkerMixin.tool_fingerprint`.

    ``grto/tool/ranks``; ``grto/tool/distinct_weights``, the number of different weight digests
    among the ranks (1 when the data-parallel all-reduce kept the replicas equal; more means rank 0's
    checkpoint is not what the other ranks trained with); ``grto/tool/distinct_steps`` likewise for
    the optimiser step; ``grto/tool/nodes``, the Ray nodes the ranks run on."""
    return {
        "grto/tool/ranks": float(len(fingerprints)),
        "grto/tool/distinct_weights": float(len({f["digest"] for f in fingerprints})),
        "grto/tool/distinct_steps": float(len({f["step"] for f in fingerprints})),
        "grto/tool/nodes": float(len({f["node"] for f in fingerprints})),
    }


class ActorRolloutRefToolWorker(ActorRolloutRefWorker, ToolWorkerMixin):
    """verl's hybrid actor/rollout/ref worker that also hosts the tool (colocated: same devices)."""
