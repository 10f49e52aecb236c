"""The segmentation tool as a verl tool call (verl_grto/agent/): arguments, replies, records, bad calls, masks.

Every multi-turn check here runs verl's own agent loop (``ToolAgentLoop``, or ``GRTOToolAgentLoop`` on top
of it) in this process (verl_grto/agent/local.py), with a scripted model whose turns are fixed token
sequences: the tool, verl's tool-call parsing, prompt merging and response masks are real.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoProcessor
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.workers.rollout.replica import TokenOutput

from verl_grto.agent.calls import (
    CALLS_KEY,
    FAILED,
    INVALID,
    MALFORMED_KEY,
    OK,
    CallFrame,
    CallRecord,
    check_arguments,
    final_answer_text,
    final_mask,
    format_call,
)
from verl_grto.agent.data import add_tool_fields, tool_field_problems, tool_fields
from verl_grto.agent.local import agent_config, build_loop, load_tools, run_rows, turns
from verl_grto.agent.loop import parse_tool_calls
from verl_grto.agent.reply import reply_image, resize_mask
from verl_grto.agent.reward import compute_score
from verl_grto.agent.segment_tool import TOOL_SCHEMA, SegmentTool
from verl_grto.agent.templates import QWEN25VL_TOOL_CHAT_TEMPLATE, TINY_TOOL_CHAT_TEMPLATE
from verl_grto.assets.tokenizer import CHAT_TEMPLATE
from verl_grto.batching import RequestBatcher
from verl_grto.data.masks import decode_rle
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.synthetic import generate_split
from verl_grto.eval.overlay import overlay
from verl_grto.reward.answer import ToolPrompt
from verl_grto.tool.engine import ToolBatch, ToolEngine
from verl_grto.tool.model import SegmentationTool

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "verl_grto/assets/shipped/seed0"
POLICY = SHIPPED / "tiny_qwen25vl_warm"
TOOL = SHIPPED / "tiny_sam2_pretrained"
AGENT_DIR = ROOT / "verl_grto/agent"
FRAME = CallFrame("pixels", (112, 112), (112, 112))


# ---- arguments: the answers' rules, plus a bbox ---------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"bbox": [10, 20, 50, 60]}, ""),
        ({"bbox": [10, 20, 50, 60], "points": [[30, 40]], "negative_points": [[1, 1]]}, ""),
        ({"bbox": [10, 20, 500, 60]}, "x2=500 outside [0, 112] (the image is 112x112)"),
        ({"bbox": [-1, 20, 50, 60]}, "x1=-1 outside"),
        ({"bbox": [10, 20, 10, 60]}, "x2=10 <= x1=10 (empty or inverted box)"),
        ({"bbox": [10, 60, 50, 20]}, "y2=20 <= y1=60"),
        ({"bbox": [10, 20, 50]}, "has 3 numbers, expected 4"),
        ({"bbox": [10, 20, float("nan"), 60]}, "not finite"),
        ({"bbox": [10, 20, 50, 60], "color": "red"}, "unknown key 'color'"),
        ({"points": [[30, 40]]}, 'need a "bbox"'),
        ({MALFORMED_KEY: '{"bbox": [1, 2'}, "not valid JSON"),
        ([10, 20, 50, 60], "must be a JSON object"),
    ],
)
def test_call_arguments_follow_the_answer_rules(arguments, error: str) -> None:
    prompt, reason = check_arguments(arguments, FRAME)
    if not error:
        assert prompt is not None and reason == ""
        assert prompt.box == (10.0, 20.0, 50.0, 60.0)
    else:
        assert prompt is None and error in reason, reason


def test_arguments_are_read_on_the_policy_grid_and_recorded_in_the_original_frame() -> None:
    # a Qwen3-VL policy (norm1000) shown a 560x448 resize of a 1250x1000 image
    frame = CallFrame("norm1000", (448, 560), (1000, 1250))
    prompt, _ = check_arguments({"bbox": [100, 200, 300, 400], "points": [[500, 500]]}, frame)
    assert prompt is not None
    assert frame.to_image(prompt).box == pytest.approx((125.0, 200.0, 375.0, 400.0))
    (point,) = frame.to_image(prompt).points
    assert point == pytest.approx((625.0, 500.0))
    assert frame.to_shown(prompt).box == pytest.approx((56.0, 89.6, 168.0, 179.2))
    assert frame.box_on_grid((56.0, 89.6, 168.0, 179.2)) == [100, 200, 300, 400]
    # past the grid is outside the image, whatever the image's pixels
    assert "outside [0, 1000]" in check_arguments({"bbox": [0, 0, 1001, 10]}, frame)[1]
    # pixels: the shown image's pixels, mapped by the resize factor
    frame = CallFrame("pixels", (448, 560), (1000, 1250))
    prompt, _ = check_arguments({"bbox": [56, 44.8, 112, 89.6]}, frame)
    assert frame.to_image(prompt).box == pytest.approx((125.0, 100.0, 250.0, 200.0))


def test_call_format_round_trips_through_the_parser() -> None:
    prompt = ToolPrompt(box=(3, 4, 50, 60))
    text = format_call(prompt)
    assert text == '<tool_call>{"name": "segment", "arguments": {"bbox": [3, 4, 50, 60]}}</tool_call>'
    content, calls = parse_tool_calls("before " + text, ["segment"])
    assert content == "before " and len(calls) == 1 and calls[0].name == "segment"
    assert check_arguments(json.loads(calls[0].arguments), FRAME)[0] == ToolPrompt(box=(3.0, 4.0, 50.0, 60.0))


def test_the_lenient_parser_hands_malformed_calls_to_the_tool() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "segment", "arguments": {"bbox": [1, 2,}</tool_call>', ["x", "y"])
    assert calls[0].name == "segment" and MALFORMED_KEY in json.loads(calls[0].arguments)
    _, calls = parse_tool_calls("<tool_call>no json at all</tool_call>", ["segment"])
    assert calls[0].name == "segment"  # the only tool
    assert parse_tool_calls("<tool_call>cut off", ["segment"])[1] == []  # no closing tag: no call (verl's rule)


def test_the_shipped_yamls_hold_the_schema_and_verl_drops_its_array_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("segment_tool.yaml", "segment_tool_frozen.yaml"):
        doc = yaml.safe_load((AGENT_DIR / name).read_text())
        (tool,) = doc["tools"]
        assert tool["class_name"] == "verl_grto.agent.segment_tool.SegmentTool"
        assert tool["tool_schema"] == TOOL_SCHEMA
    # why the tool checks shapes itself: verl's property schema keeps type / description / enum only
    schema = json.loads(json.dumps(TOOL_SCHEMA))
    schema["function"]["parameters"]["properties"]["bbox"].update(items={"type": "number"}, minItems=4)
    dumped = OpenAIFunctionToolSchema.model_validate(schema).model_dump(exclude_unset=True, exclude_none=True)
    assert "items" not in dumped["function"]["parameters"]["properties"]["bbox"]
    monkeypatch.setenv("VERL_GRTO_SEGMENT_CHECKPOINT", str(TOOL))
    (tool,) = load_tools(AGENT_DIR / "segment_tool_frozen.yaml")  # verl's own loader
    assert isinstance(tool, SegmentTool) and tool.name == "segment" and tool.settings.mode == "frozen"
    with pytest.raises(ValueError, match="checkpoint"):
        SegmentTool({"type": "native", "mode": "frozen"})
    with pytest.raises(ValueError, match="unknown config keys"):
        SegmentTool({"type": "native", "max_call": 2})


# ---- verl's agent loop with a scripted policy ----------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    proc = AutoProcessor.from_pretrained(POLICY)
    proc.chat_template = TINY_TOOL_CHAT_TEMPLATE
    proc.tokenizer.chat_template = TINY_TOOL_CHAT_TEMPLATE
    return proc


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [tool_fields(r.to_record()) for r in generate_split(2, 0, "camouflage", "val", min_objects=1, max_objects=1)]


class ScriptedPolicy:
    """verl's server interface with fixed turns: turn k of every trajectory is ``texts[k]`` (then ``<|im_end|>``)."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts, self.requests = tokenizer, texts, []

    async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, **kwargs) -> TokenOutput:
        turn = sum(1 for r in self.requests if r["id"] == request_id)
        self.requests.append({"id": request_id, "prompt": list(prompt_ids), "images": list(image_data or [])})
        text = self.texts[min(turn, len(self.texts) - 1)] + self.tokenizer.eos_token
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def _box(row: dict) -> list[int]:
    return [int(v) for v in json.loads(row["reward_model"]["ground_truth"])["boxes"][0]]


def _run(processor, rows, texts, tools, loop_cls=None, parser="grto_hermes", n_rows=1, response_length=640):
    policy = ScriptedPolicy(processor.tokenizer, texts)
    kwargs = {"loop_cls": loop_cls} if loop_cls is not None else {}
    config = agent_config(160, response_length, 8, parser)
    loop = build_loop(policy, processor.tokenizer, processor, tools, config, **kwargs)
    return run_rows(loop, rows[:n_rows], {"temperature": 1.0}), policy


def test_the_frozen_tool_is_a_plain_verl_tool(processor, rows, monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's own ToolAgentLoop and hermes parser, the tool from the frozen YAML by verl's loader: call, see
    the mask, answer. The reply is the checkpoint's mask drawn on the image the policy was shown."""
    monkeypatch.setenv("VERL_GRTO_SEGMENT_CHECKPOINT", str(TOOL))
    tools = load_tools(AGENT_DIR / "segment_tool_frozen.yaml")
    row, box = rows[0], _box(rows[0])
    texts = [format_call(ToolPrompt(box=tuple(box))), f'<think></think><answer>{{"bbox": {box}}}</answer>']
    (out,), policy = _run(processor, rows, texts, tools, loop_cls=ToolAgentLoop, parser="hermes")

    # two policy turns; the second request carried the tool's image
    assert [len(r["images"]) for r in policy.requests] == [1, 2]
    shown = policy.requests[0]["images"][0]
    runs = turns(out)
    assert [m for m, _ in runs] == [1, 0, 1]
    tok = processor.tokenizer
    assert tok.decode(runs[0][1]).startswith("<tool_call>") and "<answer>" in tok.decode(runs[2][1])
    reply = tok.decode(runs[1][1])
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert runs[1][1].count(image_pad) == 64 and "mask: area" in reply  # the reply image's tokens: masked
    assert all(m == 0 for t, m in zip(out.response_ids, out.response_mask, strict=True) if t == image_pad)

    # the record: the prompt in the original frame, the mask the frozen checkpoint makes of it
    (record,) = [CallRecord.from_dict(c) for c in out.extra_fields[CALLS_KEY]]
    assert record.kind == OK and record.box == [float(v) for v in box]
    engine = ToolEngine(SegmentationTool.from_pretrained(str(TOOL)))
    batch = ToolBatch(["x"], [np.asarray(shown)], [0], [[ToolPrompt(box=tuple(box))]])
    expected = engine.predict(batch).masks[0].numpy()
    assert np.array_equal(decode_rle(record.mask_rle), expected)
    assert record.area_fraction == pytest.approx(expected.mean())
    drawn = out.multi_modal_data["images"][1]
    assert np.array_equal(
        np.asarray(drawn), np.asarray(overlay(np.asarray(shown), expected, [ToolPrompt(box=tuple(box))]))
    )
    assert f"area {expected.mean():.3f}" in reply

    # verl's reward workers hand the record over in extra_info: the plain-pipeline reward reads it
    solution = tok.decode(out.response_ids, skip_special_tokens=True)
    score = compute_score("", solution, row["reward_model"]["ground_truth"], {**row["extra_info"], **out.extra_fields})
    gt = decode_rle(json.loads(row["reward_model"]["ground_truth"])["mask"])
    iou = (expected & gt).sum() / (expected | gt).sum()
    assert score["mask_iou"] == pytest.approx(iou) and score["score"] == pytest.approx(iou + 0.1)


def test_bad_calls_get_a_text_error_and_the_penalty_never_an_exception(processor, rows) -> None:
    tool = SegmentTool({"mode": "frozen", "checkpoint": str(TOOL), "max_calls": 4, "invalid_call_penalty": 0.05})
    box = _box(rows[0])
    good = format_call(ToolPrompt(box=tuple(box)))
    texts = [
        '<tool_call>{"name": "segment", "arguments": {"bbox": [1, 2,}</tool_call>',  # malformed JSON
        '<tool_call>{"name": "segment", "arguments": {"bbox": [10, 20, 500, 60]}}</tool_call>',  # out of frame
        '<tool_call>{"name": "segment", "arguments": {"bbox": [10, 20, 10, 60]}}</tool_call>',  # empty box
        good,
        good,  # the fifth call: too many
        f'<think></think><answer>{{"bbox": {box}}}</answer>',
    ]
    (out,), _ = _run(processor, rows, texts, [tool], response_length=1024)  # the whole answer fits after 5 replies
    records = [CallRecord.from_dict(c) for c in out.extra_fields[CALLS_KEY]]
    assert [r.kind for r in records] == [INVALID, INVALID, INVALID, OK, INVALID]
    assert out.extra_fields["tool_rewards"] == [-0.05, -0.05, -0.05, 0.0, -0.05]
    replies = [processor.tokenizer.decode(ids) for m, ids in turns(out) if m == 0]
    assert "not valid JSON" in replies[0] and "outside [0, 112]" in replies[1] and "empty or inverted" in replies[2]
    assert "mask: area" in replies[3] and "too many calls: at most 4" in replies[4]
    row = rows[0]
    solution = processor.tokenizer.decode(out.response_ids, skip_special_tokens=True)
    score = compute_score("", solution, row["reward_model"]["ground_truth"], {**row["extra_info"], **out.extra_fields})
    assert score["penalty"] == pytest.approx(0.2) and score["valid_calls"] == 1
    assert score["score"] == pytest.approx(score["mask_iou"] + 0.1 - 0.2)


def test_a_tool_failure_is_recorded_not_raised_and_costs_the_policy_nothing(processor, rows) -> None:
    tool = SegmentTool({"mode": "trained"})  # no router in this process: every call fails
    texts = [format_call(ToolPrompt(box=tuple(_box(rows[0])))), "<think></think><answer>{}</answer>"]
    (out,), _ = _run(processor, rows, texts, [tool])
    (record,) = [CallRecord.from_dict(c) for c in out.extra_fields[CALLS_KEY]]
    assert record.kind == FAILED and "no tool router" in record.error and record.penalty == 0
    assert out.extra_fields["tool_rewards"] == [0.0]


def test_every_trajectory_has_the_calls_key(processor, rows) -> None:
    """A trajectory that never calls gets an empty list: verl's DataProto.concat needs equal keys."""
    tool = SegmentTool({"mode": "frozen", "checkpoint": str(TOOL)})
    box = _box(rows[0])
    (out,), _ = _run(processor, rows, [f'<think></think><answer>{{"bbox": {box}}}</answer>'], [tool])
    assert out.extra_fields[CALLS_KEY] == [] and [m for m, _ in turns(out)] == [1]


def test_tool_tokens_carry_no_policy_gradient(processor, rows) -> None:
    """verl masks the tool's reply out of the loss: its vanilla PPO loss, given a real multi-turn response
    mask, has zero gradient on every tool token and a non-zero one on every policy token."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    tool = SegmentTool({"mode": "frozen", "checkpoint": str(TOOL)})
    box = _box(rows[0])
    texts = [format_call(ToolPrompt(box=tuple(box))), f'<think></think><answer>{{"bbox": {box}}}</answer>']
    (out,), _ = _run(processor, rows, texts, [tool])
    mask = torch.tensor([out.response_mask], dtype=torch.float32)
    assert 0 < mask.sum() < mask.numel()
    log_prob = torch.full(mask.shape, -1.0, requires_grad=True)
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    loss, _ = compute_policy_loss_vanilla(
        log_prob.detach() - 0.1, log_prob, torch.ones_like(mask), mask.bool(), "token-mean", config
    )
    loss.backward()
    grad = log_prob.grad[0]
    assert torch.all(grad[mask[0] == 0] == 0) and torch.all(grad[mask[0] == 1] != 0)


# ---- batching, replies, final masks ---------------------------------------------------------------
def test_concurrent_calls_are_batched() -> None:
    seen: list[list[int]] = []

    async def run_batch(requests: list[int]) -> list[int]:
        seen.append(list(requests))
        await asyncio.sleep(0.01)
        return [2 * r for r in requests]

    async def main() -> list[int]:
        batcher = RequestBatcher(run_batch, max_batch=4)
        return list(await asyncio.gather(*[batcher.submit(i) for i in range(10)]))

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # calls made together share a model call

    async def failing(requests: list[int]) -> list[int]:
        raise RuntimeError("worker died")

    async def fail() -> list:
        batcher = RequestBatcher(failing)
        return await asyncio.gather(*[batcher.submit(i) for i in range(3)], return_exceptions=True)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(fail()))


def test_the_reply_is_scaled_to_its_pixel_limit() -> None:
    image = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    mask = np.zeros((300, 400), bool)
    mask[100:200, 100:300] = True
    picture = reply_image(image, mask, ToolPrompt(box=(100.0, 100.0, 300.0, 200.0)), max_pixels=30_000)
    assert picture.size[0] * picture.size[1] <= 30_000 and abs(picture.size[0] / picture.size[1] - 4 / 3) < 0.02
    assert reply_image(image, mask, ToolPrompt(box=(100.0, 100.0, 300.0, 200.0)), None).size == (400, 300)
    assert resize_mask(mask, (150, 200)).sum() == mask.sum() // 4


def test_final_mask_modes() -> None:
    def call(index: int, box: tuple, kind: str = OK) -> CallRecord:
        return CallRecord(index, kind, box=list(box) if kind == OK else None)

    calls = [call(0, (0, 0, 10, 10)), call(1, (0, 0, 20, 20)), call(2, (0, 0, 5, 5), INVALID)]
    answer = '<think></think><answer>{"bbox": [1, 1, 30, 30]}</answer>'
    last = final_mask(calls, answer, (112, 112), (224, 224), "last_call")
    assert last.source == "call" and last.call_index == 1 and last.prompts[0].box == (0.0, 0.0, 20.0, 20.0)
    assert last.well_formed
    by_answer = final_mask(calls, answer, (112, 112), (224, 224), "answer")
    assert by_answer.source == "answer" and by_answer.prompts[0].box == (2.0, 2.0, 60.0, 60.0)  # to the original frame
    assert final_mask(calls, "no answer", (112, 112), (224, 224), "answer").source == "call"
    assert final_mask([], answer, (112, 112), (224, 224), "last_call").source == "answer"
    nothing = final_mask([calls[2]], "no answer", (112, 112), (224, 224), "last_call")
    assert nothing.source == "none" and nothing.prompts == () and not nothing.well_formed
    with pytest.raises(ValueError, match="final_mask"):
        final_mask(calls, answer, (112, 112), (224, 224), "first_call")
    whole = "<tool_call>x</tool_call>tool\nmask: area 0.1 of the image<think>a</think><answer>{}</answer>"
    assert final_answer_text(whole) == "<think>a</think><answer>{}</answer>"


# ---- templates ------------------------------------------------------------------------------------
def _render(processor, template, messages, **kwargs) -> str:
    processor.chat_template = template
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


def test_the_tiny_tool_template_renders_a_single_turn_prompt_as_before(processor) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate the red ring."}]}]
    before = _render(processor, CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert _render(processor, TINY_TOOL_CHAT_TEMPLATE, messages, add_generation_prompt=True) == before
    with_tools = _render(processor, TINY_TOOL_CHAT_TEMPLATE, messages, add_generation_prompt=True, tools=[TOOL_SCHEMA])
    assert "Tools: segment(bbox, points, negative_points)." in with_tools
    processor.chat_template = TINY_TOOL_CHAT_TEMPLATE


@pytest.mark.parametrize("template", [TINY_TOOL_CHAT_TEMPLATE, QWEN25VL_TOOL_CHAT_TEMPLATE])
def test_tool_templates_render_calls_and_images_inside_tool_replies(processor, template) -> None:
    call = {"type": "function", "function": {"name": "segment", "arguments": {"bbox": [1, 2, 3, 4]}}}
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate it."}]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "mask: empty"}]},
    ]
    text = _render(processor, template, messages, add_generation_prompt=True, tools=[TOOL_SCHEMA])
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    reply = text[text.index('{"bbox": [1, 2, 3, 4]}') :]
    assert "<|image_pad|>" in reply and "mask: empty" in reply and text.endswith("<|im_start|>assistant\n")
    prefix = _render(processor, template, messages[:2], tools=[TOOL_SCHEMA])
    assert text.startswith(prefix)  # what verl's token merging needs
    if template is QWEN25VL_TOOL_CHAT_TEMPLATE:
        listed = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[
            0
        ]  # the signatures (the preamble names the tags too)
        assert "<tool_response>\n<|vision_start|>" in reply and '"name": "segment"' in listed
    processor.chat_template = TINY_TOOL_CHAT_TEMPLATE


# ---- dataset fields -------------------------------------------------------------------------------
def test_rows_get_the_fields_that_route_them_to_the_tool(tmp_path: Path) -> None:
    records = [r.to_record() for r in generate_split(3, 0, "camouflage", "val", min_objects=1, max_objects=1)]
    src = write_rows_atomic(records, tmp_path / "val.parquet")
    assert tool_field_problems(src) and "add-tool" in tool_field_problems(src)[0]
    assert add_tool_fields(src, tmp_path / "agent.parquet") == 3
    assert tool_field_problems(tmp_path / "agent.parquet") == []
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "agent.parquet").to_pylist()
    for row, record in zip(rows, records, strict=True):
        assert row["agent_name"] == "grto_tool_agent"
        create = row["extra_info"]["tools_kwargs"]["segment"]["create_kwargs"]
        assert create == {
            "sample_id": record["extra_info"]["sample_id"],
            "image_size": [112, 112],
            "answer_coords": "pixels",
        }
        assert row["images"] == record["images"] and row["prompt"] == record["prompt"]


def test_call_weights_share_the_trajectory_weight() -> None:
    from verl_grto.algorithm.tool_step import tool_call_weights

    box = ToolPrompt(box=(0.0, 0.0, 10.0, 10.0))
    far = ToolPrompt(box=(50.0, 50.0, 60.0, 60.0))
    # trajectory 0: two calls; 1: one call; 2: no mask (an empty row); 3: one call
    rows, prompts = [0, 0, 1, 2, 3], [[box], [far], [box], [], [box]]
    gt = [[(0.0, 0.0, 10.0, 10.0)]] * 4
    split = tool_call_weights("uniform", rows, prompts, gt)
    assert split.tolist() == [0.5, 0.5, 1.0, 0.0, 1.0]
    assert tool_call_weights("uniform", rows, prompts, gt, call_weighting="each").tolist() == [1, 1, 1, 0, 1]
    assert tool_call_weights("uniform", rows, prompts, gt, min_box_iou=0.5).tolist() == [0.5, 0.0, 1.0, 0.0, 1.0]
    # advantage weighting at the trajectory level: group (0, 1) and group (2, 3)
    adv = tool_call_weights(
        "advantage", rows, prompts, gt, advantages=np.array([1.0, -1.0, 0.0, 2.0]), group_ids=["a", "a", "b", "b"]
    )
    assert adv.tolist() == [1.0, 1.0, 0.0, 0.0, 2.0]  # a: 2 x (1 / 1) split over two calls; b: all on 3
    with pytest.raises(ValueError, match="call_weighting"):
        tool_call_weights("uniform", rows, prompts, gt, call_weighting="first")
    assert math.isclose(float(split.sum()), 3.0)
