"""Tiny assets: load through the Auto* classes and verl, agree on token ids, generate safely, rebuild identically."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Sam2Model

from verl_grto.assets.build import AssetPaths, build_tiny_sam2, default_home, ensure_assets
from verl_grto.assets.qwen25vl import MERGE_SIZE, PATCH_SIZE, ROPE_THETA, build_tiny_qwen25vl
from verl_grto.assets.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, VISION_TOKENS, VOCAB_SIZE
from verl_grto.atomic import STAMP_NAME
from verl_grto.data.schema import build_instruction
from verl_grto.data.synthetic import make_scene


@pytest.fixture(scope="module")
def loaded(tiny_assets: AssetPaths):
    path = tiny_assets.policy
    return (
        AutoModelForImageTextToText.from_pretrained(path).eval(),
        AutoProcessor.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
    )


def _messages(expression: str = "the red circle") -> list[dict]:
    # what verl's RLHFDataset builds from "<image>..." before calling apply_chat_template
    text = build_instruction(expression, 112, 112).replace("<image>", "")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _image() -> np.ndarray:
    return make_scene(np.random.default_rng(0), "plain", size=112).image


def test_loads_through_auto_classes(loaded) -> None:
    model, processor, tokenizer = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert tokenizer.padding_side == "left" and processor.tokenizer.padding_side == "left"
    text_cfg = model.config.text_config
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.num_key_value_heads) == (128, 2, 2)
    assert text_cfg.rope_parameters["rope_theta"] == ROPE_THETA
    assert text_cfg.rope_parameters["mrope_section"] == [2, 7, 7]


def test_token_ids_agree_everywhere(loaded) -> None:
    model, processor, tokenizer = loaded
    ids = tokenizer.convert_tokens_to_ids
    assert len(tokenizer) == VOCAB_SIZE == model.config.text_config.vocab_size
    # Qwen's special tokens in Qwen's order, right after the BPE vocabulary, then the tag tokens
    first = ids(SPECIAL_TOKENS[0])
    assert [ids(t) for t in SPECIAL_TOKENS] == list(range(first, first + len(SPECIAL_TOKENS)))
    assert [ids(t) for t in TAG_TOKENS] == list(range(first + len(SPECIAL_TOKENS), VOCAB_SIZE))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.image_token_id == processor.image_token_id == ids("<|image_pad|>")
    assert model.config.video_token_id == ids("<|video_pad|>")
    assert model.config.vision_start_token_id == ids("<|vision_start|>")
    assert model.config.vision_end_token_id == ids("<|vision_end|>")
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    gen = model.generation_config
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in gen.eos_token_id
    assert sorted(gen.suppress_tokens) == sorted(ids(t) for t in VISION_TOKENS)


def test_digits_are_single_tokens_and_tags_are_atomic(loaded) -> None:
    _, _, tokenizer = loaded
    tokens = tokenizer.tokenize('{"bbox": [1203, 45, 67, 899]}')
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("1203456789") + ["9"]
    for tag in TAG_TOKENS:  # one token whatever surrounds it (BPE alone would merge "]}</" etc.)
        for context in ("x", "]}", " ", ">"):
            assert tag in tokenizer.tokenize(f"{context}{tag}{context}"), (tag, context)
    text = '<think>a b</think><answer>{"bbox": [1, 2, 3, 4]}</answer>'
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_chat_template_renders_image_parts_like_qwen(loaded) -> None:
    _, processor, tokenizer = loaded
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        + _messages()[0]["content"][1]["text"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False) == expected
    assert tokenizer.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False) == expected
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )


def test_generate_with_an_image_never_emits_vision_tokens(loaded) -> None:
    model, processor, _ = loaded
    model = copy.deepcopy(model)  # its weights are tampered with below
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    # one pad per merged patch: 112 px / (patch x merge) squared (64 at patch 7)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == (112 // (PATCH_SIZE * MERGE_SIZE)) ** 2 == 64
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]  # 112 px is not resized

    vision_ids = torch.tensor(model.generation_config.suppress_tokens)
    with torch.no_grad():  # make the vision tokens the model's favourite next tokens
        model.lm_head.weight[vision_ids] *= 50.0
        logits = model(**inputs).logits[0, -1]
    assert int(logits.argmax()) in vision_ids.tolist()  # without suppression they would be emitted

    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) > 0
    assert not torch.isin(new, vision_ids).any()


def test_same_seed_gives_identical_files_and_seed_matters(tmp_path: Path, tiny_assets: AssetPaths) -> None:
    again = build_tiny_qwen25vl(tmp_path / "again", seed=0)
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "generation_config.json",
        "processor_config.json",
    ):
        assert (again / name).read_bytes() == (tiny_assets.policy / name).read_bytes(), name
    sam_a = build_tiny_sam2(tmp_path / "sam_a", seed=0)
    assert (sam_a / "model.safetensors").read_bytes() == (tiny_assets.tool / "model.safetensors").read_bytes()
    sam_b = build_tiny_sam2(tmp_path / "sam_b", seed=1)
    assert (sam_b / "model.safetensors").read_bytes() != (sam_a / "model.safetensors").read_bytes()


def test_tiny_sam2_loads(tiny_assets: AssetPaths) -> None:
    model = Sam2Model.from_pretrained(tiny_assets.tool)
    assert sum(p.numel() for p in model.parameters()) < 1e6


def test_ensure_assets_reuses_a_finished_build(tiny_assets: AssetPaths) -> None:
    root = tiny_assets.policy.parent.parent
    stamp = (tiny_assets.policy / STAMP_NAME).stat().st_mtime_ns
    assert ensure_assets(root=root, seed=0) == tiny_assets
    assert (tiny_assets.policy / STAMP_NAME).stat().st_mtime_ns == stamp
    leftovers = [p.name for p in tiny_assets.policy.parent.iterdir() if p.name.endswith((".tmp", ".stale"))]
    assert leftovers == []


def test_default_home_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERL_GRTO_HOME", str(tmp_path / "home"))
    assert default_home() == tmp_path / "home"
    monkeypatch.delenv("VERL_GRTO_HOME")
    assert default_home() == Path.home() / ".cache" / "verl_grto"
