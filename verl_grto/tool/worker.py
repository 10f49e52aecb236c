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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl_grto.faults import kill_point
from verl_grto.tool.engine import ToolBatch, ToolEngine, ToolEngineConfig
from verl_grto.tool.losses import LossConfig
from verl_grto.tool.model import SegmentationTool


@dataclass(frozen=True, kw_only=True)
class ToolSettings(ToolEngineConfig):
    """The recipe's ``grto.tool`` section: where the tool comes from (``path``, a transformers SAM2
    directory; ``trainable``, the parts that train) plus its engine's optimiser and loss settings.

    Why a subclass: the engine's settings (fields and defaults) are written once, in
    :class:`ToolEngineConfig`; the recipe names them flat (``grto.tool.lr``, ``grto.tool.loss.*``), and
    a worker hands these settings to its :class:`ToolEngine` as they are. A plain frozen dataclass: it
    travels through Ray."""

    path: str
    trainable: str = "mask_decoder"

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> ToolSettings:
        """From the section as a plain dict (``loss`` a dict of :class:`LossConfig` fields)."""
        raw = dict(raw)
        if "loss" in raw:
            raw["loss"] = LossConfig(**(raw["loss"] or {}))
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        return cls(**raw)


class ToolJob(Protocol):
    """Work sent from a layer above the tool to run on every rank with that rank's engine.

    Why a callable rather than a method per algorithm: the worker only hosts the engine; training
    loops such as BTO's off-policy stage (:class:`verl_grto.algorithm.bto.train.BTORequest`) belong
    to the algorithm layer, which the tool layer must not import (docs/architecture.md). A job must
    be picklable (it travels through Ray): a dataclass instance of a module-level class is.
    """

    def __call__(self, engine: ToolEngine, rank: int, world_size: int) -> dict[str, Any]: ...


@dataclass
class ToolMasks:
    """One rank's predictions: boolean masks (original image size), predicted IoU, prompt issues."""

    masks: list[np.ndarray]
    iou_pred: list[float]
    prompt_issues: list[list[str]]


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
    def init_tool(self, settings: ToolSettings) -> int:
        tool = SegmentationTool.from_pretrained(settings.path, trainable=settings.trainable).to(worker_device())
        self.tool_engine = ToolEngine(tool, settings)
        return sum(p.numel() for p in self.tool_engine.params)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tool_begin_step(self) -> None:
        """A new step: image embeddings cached for the previous step are dropped."""
        self.tool_engine.begin_step()

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def tool_predict(self, batch: ToolBatch) -> ToolMasks:
        if batch.num_rollouts == 0:
            return ToolMasks([], [], [])
        pred = self.tool_engine.predict(batch)
        return ToolMasks(
            masks=[m.cpu().numpy().astype(bool) for m in pred.masks],
            iou_pred=[float(v) for v in pred.iou],
            prompt_issues=[list(p) for p in pred.prompt_issues],
        )

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
