"""The tiny Qwen3-VL: built offline like a hub checkpoint, served by the `hf` rollout with the actor's log-probs.

What the Qwen3-VL paths rest on besides the frames (tests/test_image_frame.py): the model loads through
``AutoModelForImageTextToText`` / ``AutoProcessor`` as Qwen3-VL-8B does, its processor resizes in 32-px
steps, and the `hf` rollout's log-probs are the teacher-forced ones with Qwen3-VL's 3-D positions
(``mm_token_type_ids``). Positions matter for this model: with 1-D positions the same tokens' log-probs
move by far more than the tolerance, which is what makes the e2e run's rollout/actor agreement
(tests/test_e2e_qwen3vl.py) a check of the actor's 4-row position ids.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import verl  # noqa: F401  (plugin registration)
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from verl_grto.assets.qwen3vl import build_tiny_qwen3vl
from verl_grto.data.frame import NORM1000, PolicyFrame
from verl_grto.data.synthetic import generate_split
from verl_grto.policy.inputs import render_row
from verl_grto.rollout.hf_server import HFRolloutServer

#: rollout vs teacher-forced log-prob agreement, fp32 on both sides (as tests/test_hf_rollout.py)
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl"))


def test_the_tiny_qwen3vl_builds_deterministically_with_qwen3vls_processor(tiny_qwen3vl: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen3vl(tmp_path / "again")
    first, second = load_file(tiny_qwen3vl / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    processor = AutoProcessor.from_pretrained(tiny_qwen3vl)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (16, 2)
    assert PolicyFrame.from_processor(processor) == PolicyFrame(NORM1000, 32)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    ids = processor.tokenizer.convert_tokens_to_ids
    assert model.config.image_token_id == ids("<|image_pad|>") == processor.image_token_id
    assert model.config.vision_start_token_id == ids("<|vision_start|>")


def test_the_moe_stand_in_is_a_mixture_of_experts(tmp_path: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(build_tiny_qwen3vl(tmp_path / "moe", moe=True))
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert (model.config.text_config.num_experts, model.config.text_config.num_experts_per_tok) == (4, 2)


def test_the_hf_rollout_serves_it_with_the_teacher_forced_log_probs(tiny_qwen3vl: Path) -> None:
    server = HFRolloutServer(str(tiny_qwen3vl), {"response_length": 12, "prompt_length": 256}, seed=0)
    (rl_row,) = generate_split(1, seed=0, domain="camouflage", split="val", coords=NORM1000)
    ids, images = render_row(rl_row.to_record(), server.processor)  # as verl's agent loop renders it
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
    out = asyncio.run(server.generate(prompt_ids=ids, sampling_params=sampling, request_id="q3", image_data=images))
    assert 1 <= len(out.token_ids) <= 12 and len(out.log_probs) == len(out.token_ids)

    inputs = server._model_inputs([ids + list(out.token_ids)], [images])
    assert "mm_token_type_ids" in inputs and int(inputs["mm_token_type_ids"].sum()) == 16  # 128 px, 32-px patches
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl).eval()

    def teacher_forced(**extra: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**inputs, **extra).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)]
        return torch.log_softmax(steps, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]

    gap = (torch.tensor(out.log_probs) - teacher_forced()).abs().max().item()
    assert gap < LOGPROB_TOL
    length = inputs["input_ids"].shape[1]
    flat = torch.arange(length)[None, None].expand(3, 1, length)  # 1-D positions on every mrope axis
    assert (torch.tensor(out.log_probs) - teacher_forced(position_ids=flat)).abs().max().item() > 100 * LOGPROB_TOL


def test_predict_asks_a_qwen3vl_policy_for_the_grid_and_reads_its_answer_there(
    tiny_qwen3vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``verl-grto predict --policy <Qwen3-VL>``: the instruction asks for 0-1000 coordinates, the image entry
    carries 32-px limits, and the answer is read on the grid (the policy's greedy answer is fixed here:
    the tiny model is untrained)."""
    import json

    import numpy as np
    from PIL import Image

    from verl_grto.cli import main
    from verl_grto.data.frame import default_limits
    from verl_grto.policy.generate import GreedyPolicy

    asked: list[dict] = []

    def answer(self: GreedyPolicy, rows: list[dict], max_new_tokens: int) -> list[str]:
        asked.extend(rows)
        return ['<think></think><answer>{"bbox": [0, 0, 500, 500]}</answer>'] * len(rows)

    monkeypatch.setattr(GreedyPolicy, "answer", answer)
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((300, 400, 3), 128, dtype=np.uint8)).save(image)
    tool = Path(__file__).resolve().parents[1] / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"
    out = tmp_path / "mask.png"
    args = ["predict", "--policy", str(tiny_qwen3vl), "--tool", str(tool), "--image", str(image)]
    assert main([*args, "--prompt", "the grey thing", "--out", str(out), "--device", "cpu"]) == 0
    (row,) = asked
    assert "from 0 to 1000 on each axis" in row["prompt"][0]["content"]
    limits = default_limits(32)
    assert (row["images"][0]["min_pixels"], row["images"][0]["max_pixels"]) == (limits.min_pixels, limits.max_pixels)
    report = json.loads(capsys.readouterr().out)
    assert report["parse_reason"] == "" and report["objects_used"] == 1
    mask = np.asarray(Image.open(out)) > 0
    assert mask.shape == (300, 400) and not mask[150:, :].any() and not mask[:, 200:].any()  # the top-left quarter
