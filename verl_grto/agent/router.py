"""The way from verl's agent-loop workers to the tool that GRTO trains: a named Ray actor that batches calls.

In trained mode the segmentation tool runs where GRTO trains it: on the tool's worker group, colocated
with the actor (:class:`verl_grto.tool.worker.ActorRolloutRefToolWorker`) or in a pool of its own
(:mod:`verl_grto.tool.pool`). Every call therefore segments with the weights of the last update, the
ones the next update starts from, and the image features a call computes stay in the worker's cache
for the step's own tool phase.

The agent-loop workers (CPU Ray actors verl starts, one per ``rollout.agent.num_workers``) do not know
the tool workers' names (verl prefixes them at random). The trainer starts one :class:`ToolCallRouter`
under a name derived from the Ray job (:func:`router_name`); every :class:`~verl_grto.agent.segment_tool.SegmentTool`
of the job finds it with ``ray.get_actor``. The router batches the calls that arrive together
(:class:`~verl_grto.batching.RequestBatcher`), groups them by image, deals the images out over the
tool's ranks (every rank holds the same weights) and calls each rank's ``tool_predict`` on its share:
one encoder pass per image, the decoder once per batch. Masks come back as COCO RLE at the original
image size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from verl_grto.batching import RequestBatcher
from verl_grto.data.image_store import SampleImageStore
from verl_grto.reward.answer import ToolPrompt
from verl_grto.tool.engine import ToolBatch

ROUTER_PREFIX = "verl_grto_tool_router"


def router_name(job_id: str | None = None) -> str:
    """The router's Ray actor name in this job (the trainer and the agent-loop workers share the job)."""
    job = job_id if job_id is not None else ray.get_runtime_context().get_job_id()
    return f"{ROUTER_PREFIX}_{job}"


@dataclass(frozen=True)
class SegmentRequest:
    """One call: the dataset row (its ``extra_info.sample_id``, whose image the tool's workers read from the
    run's parquet files) and the prompt in the original image's pixels."""

    sample_id: str
    prompt: ToolPrompt


@dataclass(frozen=True)
class SegmentResult:
    """The mask (COCO RLE at the original size), the tool's predicted IoU, the prompt's issues (clipping)."""

    mask_rle: dict[str, Any]
    iou_pred: float
    issues: tuple[str, ...]


def shard_requests(keys: Sequence[str], world: int) -> list[list[int]]:
    """Request indices per rank: the distinct images in order of first appearance, image k to rank k % world,
    each image with all its requests (so a rank encodes an image once)."""
    order: dict[str, int] = {}
    for key in keys:
        order.setdefault(key, len(order))
    shards: list[list[int]] = [[] for _ in range(world)]
    for i, key in enumerate(keys):
        shards[order[key] % world].append(i)
    return shards


def request_batch(keys: Sequence[str], prompts: Sequence[ToolPrompt]) -> ToolBatch:
    """The :class:`ToolBatch` of some requests: one entry per distinct image (read by key on the worker),
    one prompt list per request, no ground truth (predicted, not scored)."""
    image_keys: list[str] = []
    position: dict[str, int] = {}
    for key in keys:
        if key not in position:
            position[key] = len(image_keys)
            image_keys.append(key)
    return ToolBatch(
        image_keys=list(image_keys),
        images=[None] * len(image_keys),
        image_index=[position[k] for k in keys],
        prompts=[[p] for p in prompts],
    )


class ToolCallRouter:
    """Ray actor (async): ``await router.segment.remote(request)`` -> :class:`SegmentResult`.

    ``workers``: the tool worker group's Ray actors (one per rank), ``method``: the actor-side name of
    ``tool_predict`` on them (``<role>_tool_predict`` on a colocated group,
    :func:`verl_grto.patches.worker_group_method_name`), ``image_files``: the run's parquet files (the
    sample id -> image key index; the workers read the images themselves). ``max_batch`` bounds the
    calls per batch."""

    def __init__(self, workers: list[Any], method: str, image_files: list[str], max_batch: int = 256) -> None:
        if not workers:
            raise ValueError("the router needs at least one tool worker")
        self.workers = list(workers)
        self.method = method
        self.store = SampleImageStore(image_files)
        self.batcher: RequestBatcher[SegmentRequest, SegmentResult] = RequestBatcher(self._run, max_batch)

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        return await self.batcher.submit(request)

    def stats(self) -> dict[str, int]:
        """Calls answered and batches run since the router started."""
        return {"requests": self.batcher.requests, "batches": self.batcher.batches}

    async def _run(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        keys = [self.store.key(r.sample_id) for r in requests]
        shards = [rows for rows in shard_requests(keys, len(self.workers)) if rows]
        refs = []
        for rank, rows in enumerate(shards):
            batch = request_batch([keys[i] for i in rows], [requests[i].prompt for i in rows])
            worker = self.workers[rank % len(self.workers)]
            refs.append(getattr(worker, self.method).remote(batch, list(range(len(rows))), False))
        per_rank = await asyncio.gather(*refs)
        results: list[SegmentResult | None] = [None] * len(requests)
        for rows, scores in zip(shards, per_rank, strict=True):
            for k, i in enumerate(rows):
                results[i] = SegmentResult(
                    scores.masks[k], float(scores.iou_pred[k]), tuple(scores.prompt_issues.get(k, ()))
                )
        return results  # type: ignore[return-value]


def start_router(
    workers: list[Any], method: str, image_files: list[str], max_batch: int = 256, job_id: str | None = None
) -> Any:
    """Start (or replace) this job's :class:`ToolCallRouter`; returns its handle. Called by the trainer once
    its tool workers hold the tool."""
    name = router_name(job_id)
    with contextlib.suppress(ValueError):  # a previous trainer of this job (a restart in the same driver)
        ray.kill(ray.get_actor(name))
    actor = ray.remote(ToolCallRouter).options(name=name, num_cpus=0, max_concurrency=1024)
    handle = actor.remote(workers, method, list(image_files), max_batch)
    ray.get(handle.stats.remote())  # raises here if the router cannot start (e.g. an unreadable data file)
    return handle
