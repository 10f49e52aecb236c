"""The `hf` rollout server: generation with images, and log-probs that match the actor after a sync."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import verl  # noqa: F401  (plugin registration)
from PIL import Image

from verl_grto.data.schema import build_instruction
from verl_grto.rollout.hf_server import HFRolloutServer

#: rollout vs actor log-prob agreement, fp32 weights on both sides (measured ~1e-6 here)
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_assets):
    return HFRolloutServer(str(tiny_assets.policy), {"response_length": 24, "prompt_length": 256}, seed=0)


def _prompt(
    server: HFRolloutServer, seed: int = 0, expression: str = "the red circle"
) -> tuple[list[int], list[Image.Image]]:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": build_instruction(expression, 112, 112)}],
        }
    ]
    text = server.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = server.processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    return ids, [image]


def _actor_logprobs(model: torch.nn.Module, server: HFRolloutServer, prompt_ids, images, response_ids) -> torch.Tensor:
    """Teacher-forced log-probs of the response, as verl's actor computes them (3-D mrope positions)."""
    inputs = server._model_inputs([list(prompt_ids) + list(response_ids)], [images])
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    with torch.no_grad():
        logits = model(**inputs, position_ids=position_ids).logits[0].float()
    n = len(response_ids)
    step_logits = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]
    return torch.log_softmax(step_logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def _generate(server, ids, images, **params):
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, **params}
    return asyncio.run(server.generate(prompt_ids=ids, sampling_params=sampling, request_id="t", image_data=images))


def _generate_concurrently(server, prompts, **params):
    """The requests sent at once, as verl's agent loop sends a batch's samples; exceptions returned."""
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, **params}

    async def run():
        calls = [
            server.generate(prompt_ids=ids, sampling_params=dict(sampling), request_id=str(k), image_data=images)
            for k, (ids, images) in enumerate(prompts)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(run())


#: prompts of different lengths (the expression's), so a batch of them is left-padded
EXPRESSIONS = ("the red circle", "the smallest shape of all", "the blue square", "the largest shape")


def test_generates_from_image_with_logprobs(server):
    ids, images = _prompt(server)
    assert sum(i == server._image_token_id for i in ids) == 64  # 112 px in 7-px patches, 2x2 merged
    out = _generate(server, ids, images)
    assert 1 <= len(out.token_ids) <= 24
    assert len(out.log_probs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.log_probs)
    vision_ids = set(server.model.generation_config.suppress_tokens or [])
    assert not vision_ids & set(out.token_ids)


def test_sampling_is_reproducible_per_seed(tiny_assets):
    a = HFRolloutServer(str(tiny_assets.policy), {"response_length": 16, "prompt_length": 256}, seed=3)
    b = HFRolloutServer(str(tiny_assets.policy), {"response_length": 16, "prompt_length": 256}, seed=3)
    ids, images = _prompt(a)
    assert _generate(a, ids, images).token_ids == _generate(b, ids, images).token_ids


def test_logprobs_match_actor_after_weight_sync(server, tiny_assets):
    from transformers import AutoModelForImageTextToText

    actor = AutoModelForImageTextToText.from_pretrained(str(tiny_assets.policy), dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the actor has trained: its weights differ from the server's
    ids, images = _prompt(server)

    stale = _generate(server, ids, images)
    stale_gap = (
        (torch.tensor(stale.log_probs) - _actor_logprobs(actor, server, ids, images, stale.token_ids)).abs().max()
    )
    assert stale_gap > 10 * LOGPROB_TOL  # before the sync the two disagree

    n = server.update_weights({k: v.clone() for k, v in actor.state_dict().items()}, global_steps=1)
    assert n == len(actor.state_dict())
    out = _generate(server, ids, images)
    gap = (torch.tensor(out.log_probs) - _actor_logprobs(actor, server, ids, images, out.token_ids)).abs().max()
    assert gap < LOGPROB_TOL, f"rollout/actor log-prob gap {gap:.2e} after sync"
    assert out.extra_fields["global_steps"] == 1


def test_unknown_weight_names_are_refused(server):
    with pytest.raises(KeyError, match="not in the served model"):
        server.update_weights({"not.a.param": torch.zeros(1)})


def test_prompt_image_token_mismatch_is_a_clear_error(server):
    ids, images = _prompt(server)
    with pytest.raises(ValueError, match="image tokens"):
        _generate(server, ids, images + images)


def test_concurrent_requests_share_one_generate_call_and_match_each_alone(server, tiny_assets):
    from transformers import AutoModelForImageTextToText

    prompts = [_prompt(server, seed=k, expression=e) for k, e in enumerate(EXPRESSIONS)]
    assert len({len(ids) for ids, _ in prompts}) > 1  # the batch needs padding
    alone = [_generate(server, ids, images, temperature=0.0) for ids, images in prompts]
    before = server.batches_run
    together = _generate_concurrently(server, prompts, temperature=0.0)
    assert server.batches_run == before + 1
    actor = AutoModelForImageTextToText.from_pretrained(str(tiny_assets.policy), dtype=torch.float32).eval()
    actor.load_state_dict(server.model.state_dict())  # the module's server may have been synced by now
    for (ids, images), a, t in zip(prompts, alone, together, strict=True):
        assert t.token_ids == a.token_ids
        assert t.stop_reason == a.stop_reason
        np.testing.assert_allclose(t.log_probs, a.log_probs, atol=LOGPROB_TOL)
        gap = (torch.tensor(t.log_probs) - _actor_logprobs(actor, server, ids, images, t.token_ids)).abs().max()
        assert gap < LOGPROB_TOL, f"batched rollout/actor log-prob gap {gap:.2e}"


def test_requests_with_other_sampling_parameters_are_not_batched_together(server):
    prompts = [_prompt(server, seed=k) for k in range(4)]
    sampling = {"top_p": 1.0, "top_k": -1, "logprobs": True}

    async def run():
        return await asyncio.gather(
            *[
                server.generate(
                    prompt_ids=ids,
                    sampling_params={**sampling, "temperature": 0.0 if k % 2 else 1.0},
                    request_id=str(k),
                    image_data=images,
                )
                for k, (ids, images) in enumerate(prompts)
            ]
        )

    before = server.batches_run
    outs = asyncio.run(run())
    assert server.batches_run == before + 2  # one greedy batch, one sampled batch
    assert outs[1].token_ids == _generate(server, *prompts[1], temperature=0.0).token_ids


def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered(server):
    good = [_prompt(server, seed=k) for k in range(3)]
    ids, images = good[1]
    requests = [good[0], (ids, images + images), good[2]]  # the middle one sends an image too many
    outs = _generate_concurrently(server, requests, temperature=0.0)
    assert isinstance(outs[1], ValueError) and "image tokens" in str(outs[1])
    for (ids, images), out in zip([good[0], good[2]], [outs[0], outs[2]], strict=True):
        assert out.token_ids == _generate(server, ids, images, temperature=0.0).token_ids
