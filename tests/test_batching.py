"""The batcher the hf rollout server and the segmentation tool share (verl_grto/batching.py)."""

from __future__ import annotations

import asyncio

import pytest

from verl_grto.batching import RequestBatcher


def test_requests_with_one_key_share_a_call_oldest_key_first_and_failures_stay_with_their_request():
    seen: list[list[str]] = []

    async def run_batch(requests: list[str]) -> list[object]:
        seen.append(list(requests))
        return [ValueError(r) if r.endswith("!") else r.upper() for r in requests]

    async def main() -> list[object]:
        batcher = RequestBatcher(run_batch, max_batch=2, key=lambda r: r[0])
        names = ["a1", "b1", "a2!", "a3", "b2"]
        return await asyncio.gather(*[batcher.submit(n) for n in names], return_exceptions=True)

    results = asyncio.run(main())
    # the oldest request's key first, at most max_batch per call, arrival order within a key
    assert seen == [["a1", "a2!"], ["b1", "b2"], ["a3"]]
    assert [r if isinstance(r, str) else type(r).__name__ for r in results] == ["A1", "B1", "ValueError", "A3", "B2"]


def test_a_batch_that_returns_the_wrong_number_of_results_fails_each_of_its_requests():
    async def short(requests: list[int]) -> list[int]:
        return requests[:-1]

    async def main() -> list[object]:
        batcher = RequestBatcher(short)
        return await asyncio.gather(*[batcher.submit(i) for i in range(3)], return_exceptions=True)

    errors = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "returned 2 results" in str(e) for e in errors)
    with pytest.raises(ValueError, match="max_batch"):
        RequestBatcher(short, max_batch=0)
