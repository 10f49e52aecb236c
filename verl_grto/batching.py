"""Concurrent requests answered by batched calls: what the ``hf`` rollout server and the segmentation
tool's callers share.

verl's agent loop runs every sample of a batch concurrently (asyncio tasks in each agent-loop worker), so
generation requests reach the rollout server together, and tool calls reach the tool together. Serving
them one by one would run the model once per request. :class:`RequestBatcher` queues the requests that
arrive while a batch runs and sends the next batch as one call of ``run_batch``, one batch at a time:
the oldest request and up to ``max_batch - 1`` more with the same ``key`` (requests that can share a
call, e.g. equal sampling parameters), in arrival order.

Failures stay with their requests: ``run_batch`` may return an exception in a request's place (that
request alone fails), and a ``run_batch`` that raises fails every request of its batch. A request whose
caller went away (its task cancelled) is dropped from the queue, or, if its batch is already running,
its answer is discarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


class RequestBatcher(Generic[Req, Res]):
    """``await batcher.submit(request)`` -> its result, from ``await run_batch(requests)`` -> one result (or
    exception) per request, in order. ``batches`` and ``requests`` count what was run."""

    def __init__(
        self,
        run_batch: Callable[[list[Req]], Awaitable[Sequence[Res | BaseException]]],
        max_batch: int = 64,
        key: Callable[[Req], Hashable] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.key = key
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

    def _take_batch(self) -> list[tuple[Req, asyncio.Future]]:
        self._queue = [(r, f) for r, f in self._queue if not f.done()]  # callers that went away
        if not self._queue:
            return []
        if self.key is None:
            batch = self._queue[: self.max_batch]
        else:
            first = self.key(self._queue[0][0])
            batch = [(r, f) for r, f in self._queue if self.key(r) == first][: self.max_batch]
        taken = {id(f) for _, f in batch}
        self._queue = [(r, f) for r, f in self._queue if id(f) not in taken]
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # let the requests made in the same event-loop turn join this batch
                batch = self._take_batch()
                if not batch:
                    continue
                self.batches += 1
                self.requests += len(batch)
                try:
                    results: Any = await self.run_batch([r for r, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} requests returned {len(results)} results")
                except Exception as exc:  # noqa: BLE001  (handed to every caller of the batch)
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller went away while the batch ran
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False
