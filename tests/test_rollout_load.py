"""The `hf` rollout server under load: 512 concurrent requests, a prompt over the limit, a caller that leaves.

Behaviour only; the memory bound is measured by benchmarks/rollout_load.py (peak RSS of 512 requests
against 64, docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import verl  # noqa: F401  (plugin registration)
from PIL import Image

from verl_grto.data.schema import build_instruction
from verl_grto.rollout.hf_server import HFRolloutServer, PromptTooLongError

MAX_NUM_SEQS = 64
#: prompts of different lengths (the expressions) and answers of different limits (max_tokens)
EXPRESSIONS = ("the red circle", "the smallest shape of all the shapes in this picture", "it", "the blue square")
MAX_TOKENS = (1, 3, 8)


@pytest.fixture(scope="module")
def server(tiny_assets):
    config = {"response_length": 8, "prompt_length": 256, "max_num_seqs": MAX_NUM_SEQS}
    return HFRolloutServer(str(tiny_assets.policy), config, seed=0)


@pytest.fixture
def batch_sizes(server, monkeypatch):
    """The size of every ``generate`` batch the server runs during the test."""
    sizes: list[int] = []
    original = server._generate_batch

    def recording(batch):
        sizes.append(len(batch))
        return original(batch)

    monkeypatch.setattr(server, "_generate_batch", recording)
    return sizes


def _prompt(server: HFRolloutServer, seed: int, expression: str, with_image: bool) -> tuple[list[int], list | None]:
    content = [{"type": "text", "text": build_instruction(expression, 112, 112)}]
    if not with_image:
        text = server.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return server.tokenizer(text)["input_ids"], None
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, *content]}]
    text = server.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return server.processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist(), [image]


def _request(server: HFRolloutServer, k: int, ids: list[int], images: list | None, max_tokens: int):
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": max_tokens}
    return server.generate(prompt_ids=ids, sampling_params=sampling, request_id=str(k), image_data=images)


def test_512_concurrent_requests_of_mixed_lengths_are_all_answered_in_bounded_batches(server, batch_sizes):
    prompts = [_prompt(server, k, e, with_image=k % 4 != 3) for k, e in enumerate(EXPRESSIONS * 2)]
    assert len({len(ids) for ids, _ in prompts}) >= 4  # mixed prompt lengths, with and without images
    plan = [(prompts[k % len(prompts)], MAX_TOKENS[k % len(MAX_TOKENS)]) for k in range(512)]

    async def run():
        calls = [_request(server, k, ids, images, m) for k, ((ids, images), m) in enumerate(plan)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outputs = asyncio.run(run())
    errors = [o for o in outputs if isinstance(o, BaseException)]
    assert not errors, errors[:3]
    for (_, max_tokens), out in zip(plan, outputs, strict=True):
        assert 1 <= len(out.token_ids) <= max_tokens and len(out.log_probs) == len(out.token_ids)
    assert sum(batch_sizes) == 512
    assert max(batch_sizes) <= MAX_NUM_SEQS  # never more than max_num_seqs sequences at once
    assert max(batch_sizes) == MAX_NUM_SEQS  # and batched: full batches while the queue is long


def test_a_prompt_over_the_limit_fails_alone_with_a_clear_message(server, batch_sizes):
    ids, images = _prompt(server, 0, "the red circle", with_image=True)
    too_long = ids + [ids[-1]] * (server.context_limit - len(ids))  # no room left for one answer token
    assert server.context_limit == 256 + 8

    async def run():
        calls = [_request(server, k, ids, images, 3) for k in range(3)]
        calls.insert(1, _request(server, 99, too_long, images, 3))
        return await asyncio.gather(*calls, return_exceptions=True)

    outputs = asyncio.run(run())
    assert isinstance(outputs[1], PromptTooLongError)
    message = str(outputs[1])
    assert "request 99" in message and f"{len(too_long)} tokens" in message and "limit of 264" in message
    assert all(not isinstance(o, BaseException) and o.token_ids for i, o in enumerate(outputs) if i != 1)
    assert batch_sizes == [3]  # refused before it could join (and spoil) a batch


def test_the_server_survives_callers_that_go_away_mid_request(server, batch_sizes, monkeypatch):
    """One caller cancelled while its batch runs, one while queued: the others are answered, the
    queued one is never generated, and the server keeps serving."""
    started, release = threading.Event(), threading.Event()
    recording = server._generate_batch

    def held(batch):  # the first batch waits until the test has cancelled its callers
        if not started.is_set():
            started.set()
            release.wait(timeout=60)
        return recording(batch)

    monkeypatch.setattr(server, "_generate_batch", held)
    ids, images = _prompt(server, 1, "the blue square", with_image=True)

    async def run():
        running = [asyncio.ensure_future(_request(server, k, ids, images, 3)) for k in range(4)]
        await asyncio.to_thread(started.wait, 60)  # the batch of these four is generating now
        queued = [asyncio.ensure_future(_request(server, 10 + k, ids, images, 2)) for k in range(3)]
        await asyncio.sleep(0)  # let them reach the queue
        running[0].cancel()  # its batch is already running
        queued[0].cancel()  # still waiting for a batch
        release.set()
        # bounded: before the fix a cancelled caller's future broke the queue and the others waited forever
        results = await asyncio.wait_for(asyncio.gather(*running, *queued, return_exceptions=True), 120)
        after = await _request(server, 20, ids, images, 1)
        return results, after

    results, after = asyncio.run(run())
    assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[4], asyncio.CancelledError)
    assert all(not isinstance(r, BaseException) and r.token_ids for i, r in enumerate(results) if i not in (0, 4))
    assert batch_sizes == [4, 2, 1]  # the cancelled queued request was dropped, not generated
    assert len(after.token_ids) == 1
