"""The router between verl's agent-loop workers and the tool GRTO trains (verl_grto/agent/router.py).

The router is used here as a plain object, with the tool's worker methods called in-process (what a Ray
actor handle does, ``handle.tool_predict.remote(...)`` -> an awaitable, without the processes): the
calls are batched, dealt over the ranks by image, and every mask comes from the weights the workers hold
*now*: after the engine's update, the same call gets the updated tool's mask.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from verl_grto.agent.data import tool_fields
from verl_grto.agent.router import SegmentRequest, ToolCallRouter, request_batch, shard_requests
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.synthetic import generate_split
from verl_grto.reward.answer import ToolPrompt
from verl_grto.tool.engine import ToolBatch, ToolEngine, ToolEngineConfig, ToolTarget
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.worker import ToolWorkerMixin

TOOL = Path(__file__).resolve().parents[1] / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"


class _Remote:
    """``method.remote(*args)`` -> an awaitable of ``method(*args)``, as a Ray actor method."""

    def __init__(self, fn: Any, log: list) -> None:
        self.fn, self.log = fn, log

    def remote(self, *args: Any) -> Any:
        self.log.append(args[0].num_rollouts)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class LocalToolWorker(ToolWorkerMixin):
    """One tool rank in this process (the worker's own ``tool_predict``, its own engine)."""

    def __init__(self, engine: ToolEngine) -> None:
        self.tool_engine = engine
        self.calls: list[int] = []

    @property
    def predict(self) -> _Remote:
        return _Remote(self.tool_predict, self.calls)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    records = [
        tool_fields(r.to_record()) for r in generate_split(6, 0, "camouflage", "val", min_objects=1, max_objects=1)
    ]
    return records, write_rows_atomic(records, tmp_path_factory.mktemp("agent") / "val.parquet")


def _requests(records: list[dict]) -> list[SegmentRequest]:
    out = []
    for record in records:
        box = json.loads(record["reward_model"]["ground_truth"])["boxes"][0]
        out.append(SegmentRequest(record["extra_info"]["sample_id"], ToolPrompt(box=tuple(box))))
    return out


def _segment_all(router: ToolCallRouter, requests: list[SegmentRequest]) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*[router.segment(r) for r in requests]))

    return asyncio.run(main())


def test_requests_are_dealt_out_by_image() -> None:
    assert shard_requests(["a", "b", "a", "c", "b"], 2) == [[0, 2, 3], [1, 4]]
    batch = request_batch(["a", "b", "a"], [ToolPrompt(box=(0.0, 0.0, 1.0, 1.0))] * 3)
    assert batch.image_keys == ["a", "b"] and batch.image_index == [0, 1, 0] and batch.targets is None


def test_calls_get_the_masks_of_the_current_weights(data) -> None:
    records, path = data
    store = SampleImageStore([path])
    engine = ToolEngine(
        SegmentationTool.from_pretrained(str(TOOL), trainable="mask_decoder"),
        ToolEngineConfig(lr=5e-3),
        image_loader=store.image_by_key,
    )
    ranks = [LocalToolWorker(engine), LocalToolWorker(engine)]  # two ranks holding the same weights
    router = ToolCallRouter(ranks, "predict", [str(path)], max_batch=64)
    requests = _requests(records)

    def direct() -> list[np.ndarray]:
        keys = [store.key(r.sample_id) for r in requests]
        batch = ToolBatch(keys, [None] * len(keys), list(range(len(keys))), [[r.prompt] for r in requests])
        return [m.numpy() for m in engine.predict(batch).masks]

    before = _segment_all(router, requests)
    assert router.stats() == {"requests": 6, "batches": 1}  # made together: one batch, split over both ranks
    assert sorted(ranks[0].calls + ranks[1].calls) == [3, 3]
    expected = direct()
    for result, mask in zip(before, expected, strict=True):
        assert np.array_equal(decode_rle(result.mask_rle), mask)

    # an update of the tool the router serves: the same calls now get the updated tool's masks
    keys = [store.key(r.sample_id) for r in requests]
    targets = [ToolTarget(json.loads(r["reward_model"]["ground_truth"])["mask"]) for r in records]
    batch = ToolBatch(keys, [None] * len(keys), list(range(len(keys))), [[r.prompt] for r in requests], targets)
    for _ in range(3):
        assert engine.update(batch)["skipped"] == 0
    after = _segment_all(router, requests)
    updated = direct()
    for result, mask in zip(after, updated, strict=True):
        assert np.array_equal(decode_rle(result.mask_rle), mask)
    changed = sum(
        not np.array_equal(decode_rle(a.mask_rle), decode_rle(b.mask_rle)) for a, b in zip(before, after, strict=True)
    )
    assert changed >= 1, "the update did not change any mask: the test cannot tell stale weights from current ones"
