"""Concurrent tool calls batched into one model call, as the ``hf`` rollout server batches generations.

verl's agent loop runs every sample of a batch concurrently (asyncio tasks in each agent-loop worker),
so calls of the segmentation tool arrive together. Decoding them one by one would encode each image
alone and run the mask decoder once per call. :class:`CallBatcher` queues the calls that arrive while
a batch runs and sends the next batch as one call of ``run_batch``, up to ``max_batch`` requests,
one batch at a time. A batch that raises fails each of its requests with that error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


class CallBatcher(Generic[Req, Res]):
    """``await batcher.submit(request)`` -> its result, from ``run_batch(requests) -> results`` (awaited,
    one batch at a time, results in request order). ``batches`` and ``requests`` count what was run."""

    def __init__(self, run_batch: Callable[[list[Req]], Awaitable[Sequence[Res]]], max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self._queue: list[tuple[Req, asyncio.Future]] = []
        self._draining = False
        self.batches = 0
        self.requests = 0

    async def submit(self, request: Req) -> Res:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # let the calls made in the same event-loop turn join this batch
                batch = [(r, f) for r, f in self._queue[: self.max_batch] if not f.done()]
                self._queue = self._queue[self.max_batch :]
                if not batch:
                    continue
                self.batches += 1
                self.requests += len(batch)
                try:
                    results: Any = await self.run_batch([r for r, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} tool calls returned {len(results)} results")
                except Exception as exc:  # noqa: BLE001  (handed to every caller of the batch)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False
