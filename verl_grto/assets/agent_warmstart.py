"""The tiny multi-turn policy: the warm-started policy taught the segmentation tool's call format.

Why a warm start of its own: the single-turn reference policy (:mod:`verl_grto.assets.warmstart`) answers
at once and has never seen a tool schema, a ``<tool_call>`` or a tool reply, so in verl's multi-turn loop
it would never call the tool and RL would have no call to reinforce. A short supervised run from it
teaches the protocol on transcripts the loop itself produces:

* turn 1: ``<tool_call>{"name": "segment", "arguments": {"bbox": [...]}}</tool_call>`` with the object's box;
* the tool's reply: the mask the *pre-trained tool* (the one GRTO starts from) makes of that box, drawn on
  the image, and its text (:mod:`verl_grto.agent.reply`), exactly as the tool replies;
* turn 2: ``<think></think><answer>{"bbox": [...]}</answer>`` (the last call's box) -- or, in a fraction
  :data:`REFINE_FRACTION` of the transcripts, first a call with a perturbed box, then a call with the
  object's box, then the answer: "call, see the mask, then answer or call again".

The tokens are built as verl's loop builds them (verl's ``QwenVLContinuousTokenBuilder``: the prompt with
the tool schema rendered by :data:`~verl_grto.agent.templates.TINY_TOOL_CHAT_TEMPLATE`, each policy turn
appended as generated, each tool reply as the template's difference), and the loss is on the policy's
tokens only, where verl's ``response_mask`` is 1. The policy is saved with that template, so verl renders
tools and tool replies for it with no ``custom_chat_template``. Its report (``agent_warmstart_report.json``)
holds a probe through verl's own agent loop (:mod:`verl_grto.agent.local`) on held-out camouflage scenes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from verl_grto.agent.calls import CallFrame, format_call
from verl_grto.agent.reply import reply_image, reply_text
from verl_grto.agent.segment_tool import TOOL_SCHEMA
from verl_grto.agent.templates import TINY_TOOL_CHAT_TEMPLATE
from verl_grto.assets.build import ensure_assets
from verl_grto.assets.shipped import shipped_asset
from verl_grto.assets.tool_pretrain import ensure_pretrained_tool, pretrained_tool_stamp
from verl_grto.assets.warmstart import (
    _COPIED_CONFIGS,
    _IGNORE,
    _lr_factor,
    ensure_warm_policy,
    supervised_step,
    warm_policy_stamp,
)
from verl_grto.atomic import build_dir_once, read_stamp
from verl_grto.data.frame import PIXELS
from verl_grto.data.schema import build_short_instruction
from verl_grto.data.synthetic import make_sample
from verl_grto.policy.inputs import build_messages, model_inputs
from verl_grto.reward.answer import ToolPrompt, format_answer
from verl_grto.reward.geometry import box_iou

#: Bump when the transcripts or the training change, so cached agent policies are rebuilt.
AGENT_WARMSTART_VERSION = 1
AGENT_POLICY_DIR = "tiny_qwen25vl_agent"
REPORT_NAME = "agent_warmstart_report.json"
#: The synthetic stream the transcripts' scenes come from (disjoint from RL's and the probes').
AGENT_TRAIN_SPLIT = "agent-warmstart-train"
AGENT_PROBE_SPLIT = "agent-probe-val"
#: Fraction of transcripts that call twice (a perturbed box, then the object's box).
REFINE_FRACTION = 0.35
DEFAULT_STEPS = 300
DEFAULT_BATCH = 16
DEFAULT_LR = 5e-4
DOMAIN = "camouflage"
IMAGE_SIZE = 112
#: The probe's rollout lengths (the tiny multi-turn recipe's).
PROBE_PROMPT_LENGTH, PROBE_RESPONSE_LENGTH = 160, 448


def perturbed_box(box: tuple[float, ...], rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[int, ...]:
    """A box that misses the object by a visible margin: shifted by 15-35 % of its size on each axis and
    scaled by 0.7-1.4, kept inside the image and at least 3 pixels wide."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) * w
    cy = (y1 + y2) / 2 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) * h
    w, h = w * rng.uniform(0.7, 1.4), h * rng.uniform(0.7, 1.4)
    nx1, ny1 = max(0, math.floor(cx - w / 2)), max(0, math.floor(cy - h / 2))
    nx2, ny2 = min(size, math.ceil(cx + w / 2)), min(size, math.ceil(cy + h / 2))
    return (min(nx1, size - 3), min(ny1, size - 3), max(nx2, min(nx1, size - 3) + 3), max(ny2, min(ny1, size - 3) + 3))


@dataclass(frozen=True)
class Transcript:
    """A scene (its image as the policy sees it, its instruction) and the calls then the answer taught."""

    image: Image.Image
    instruction: str
    calls: tuple[ToolPrompt, ...]
    answer: ToolPrompt


def transcript(
    seed: int, index: int, refine_fraction: float = REFINE_FRACTION, split: str = AGENT_TRAIN_SPLIT
) -> Transcript:
    """Example ``index`` of the warm start's stream: a fresh single-object camouflage scene and its transcript."""
    scene, ref = make_sample(seed, DOMAIN, split, index, size=IMAGE_SIZE, max_objects=1, min_objects=1)
    rng = np.random.default_rng([seed, index, 7919])
    exact = tuple(int(round(v)) for v in scene.objects[ref.target].box)
    calls = [ToolPrompt(box=exact)]  # type: ignore[arg-type]
    if rng.uniform() < refine_fraction:
        calls.insert(0, ToolPrompt(box=perturbed_box(exact, rng)))  # type: ignore[arg-type]
    image = Image.fromarray(scene.image)
    return Transcript(image, build_short_instruction(ref.text), tuple(calls), ToolPrompt(box=exact))  # type: ignore[arg-type]


class TranscriptTokens:
    """Token ids, loss mask and images of transcripts, built as verl's multi-turn loop builds a trajectory."""

    def __init__(self, processor: Any, tool: Any) -> None:
        from verl.tools.schemas import OpenAIFunctionToolSchema
        from verl.utils.tokenizer.continuous_token import QwenVLContinuousTokenBuilder

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.builder = QwenVLContinuousTokenBuilder(self.tokenizer, processor)
        self.tools = [
            OpenAIFunctionToolSchema.model_validate(TOOL_SCHEMA).model_dump(exclude_unset=True, exclude_none=True)
        ]
        self.tool = tool  # a ToolEngine (the pre-trained tool): its masks are the replies
        self.patch_size = processor.image_processor.patch_size

    def _assistant(self, ids: list[int], mask: list[int], text: str) -> list[int]:
        new = self.tokenizer(text + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        merged = self.builder.merge_assistant_tokens(ids, new)
        mask += [0] * len(merged.inserted_token_ids) + [1] * merged.appended_token_count
        return merged.token_ids

    def build(self, transcripts: list[Transcript]) -> list[tuple[list[int], list[int], list[Image.Image]]]:
        """``(input ids, loss mask (1 on the policy's tokens), images)`` per transcript; the tool's replies
        of the whole batch are predicted in one call."""
        from qwen_vl_utils import process_vision_info

        from verl_grto.tool.engine import ToolBatch

        shown, messages = [], []
        for t in transcripts:
            msgs = build_messages([{"role": "user", "content": t.instruction}], [t.image])
            shown.append(process_vision_info(msgs, image_patch_size=self.patch_size)[0][0])
            messages.append(msgs)
        pairs = [(k, c) for k, t in enumerate(transcripts) for c in t.calls]
        batch = ToolBatch(
            image_keys=list(range(len(transcripts))),
            images=[np.asarray(s.convert("RGB")) for s in shown],
            image_index=[k for k, _ in pairs],
            prompts=[[c] for _, c in pairs],
        )
        self.tool.begin_step()
        masks = iter(m.numpy().astype(bool) for m in self.tool.predict(batch, return_masks=True).masks)  # type: ignore[union-attr]
        out = []
        for t, image, msgs in zip(transcripts, shown, messages, strict=True):
            frame = CallFrame(PIXELS, (image.size[1], image.size[0]), (image.size[1], image.size[0]))
            ids = self.builder.build_initial_tokens(msgs, tools=self.tools, images=[image])
            mask = [0] * len(ids)
            images = [image]
            history = list(msgs)
            for call in t.calls:
                ids = self._assistant(ids, mask, format_call(call))
                args = {"bbox": list(call.box)}  # type: ignore[arg-type]
                tool_call = {"type": "function", "function": {"name": "segment", "arguments": args}}
                history.append({"role": "assistant", "content": "", "tool_calls": [tool_call]})
                mask_shown = next(masks)
                picture = reply_image(image, mask_shown, call, None)
                reply = {
                    "role": "tool",
                    "content": [
                        {"type": "image", "image": picture},
                        {"type": "text", "text": reply_text(mask_shown, frame)},
                    ],
                }
                merged = self.builder.merge_context_tokens(history, [*history, reply], ids, tools=self.tools)
                mask += [0] * (len(merged.token_ids) - len(ids))
                ids = merged.token_ids
                history.append(reply)
                images.append(picture)
            ids = self._assistant(ids, mask, format_answer([t.answer], think=""))
            out.append((ids, mask, images))
        return out


def collate(
    examples: list[tuple[list[int], list[int], list[Image.Image]]], processor: Any, config: Any
) -> tuple[dict, torch.Tensor]:
    """Model inputs (left-padded, as the ``hf`` rollout builds them) and next-token labels: the token at
    each position where the loss mask is 1, -100 elsewhere."""
    inputs = model_inputs(
        [ids for ids, _, _ in examples],
        [images for _, _, images in examples],
        processor,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    width = inputs["input_ids"].shape[1]
    labels = torch.full((len(examples), width), _IGNORE, dtype=torch.long)
    for row, (ids, mask, _) in enumerate(examples):
        offset = width - len(ids)
        for k, (token, m) in enumerate(zip(ids, mask, strict=True)):
            if m:
                labels[row, offset + k] = token
    return inputs, labels[:, 1:]


def _loss(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=_IGNORE
    )


@dataclass(frozen=True)
class AgentWarmStartReport:
    """What the call-format warm start did and what its policy does in verl's agent loop (``probe``)."""

    seed: int
    steps: int
    batch_size: int
    lr: float
    refine_fraction: float
    num_threads: int
    train_time_s: float
    initial_loss: float
    final_loss_mean10: float
    loss_curve: list[tuple[int, float]]
    probe: dict[str, Any] | None
    base_dir: str
    tool_dir: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def train_agent_policy(
    base_dir: Path, tool_dir: Path, seed: int, steps: int, batch_size: int, lr: float, refine_fraction: float
) -> tuple[torch.nn.Module, Any, list[float]]:
    """Supervised training on :func:`transcript` examples (a fresh scene each) from the policy in ``base_dir``;
    replies drawn by the tool in ``tool_dir``. Returns the model (eval mode), its processor (with the tool
    template) and the batch losses."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from verl_grto.tool.engine import ToolEngine, ToolEngineConfig
    from verl_grto.tool.model import SegmentationTool

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(base_dir)
    processor.chat_template = TINY_TOOL_CHAT_TEMPLATE
    processor.tokenizer.chat_template = TINY_TOOL_CHAT_TEMPLATE
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    tool = ToolEngine(SegmentationTool.from_pretrained(str(tool_dir), trainable="mask_decoder"), ToolEngineConfig())
    tokens = TranscriptTokens(processor, tool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    losses: list[float] = []
    for step in range(steps):
        examples = tokens.build(
            [transcript(seed, i, refine_fraction) for i in range(step * batch_size, (step + 1) * batch_size)]
        )
        inputs, labels = collate(examples, processor, model.config)
        losses.append(supervised_step(model, optimizer, scheduler, _loss(model, inputs, labels)))
    return model.eval(), processor, losses


def probe_agent(policy_dir: Path, tool_dir: Path, seed: int = 0, n: int = 32) -> dict[str, Any]:
    """Greedy trajectories of ``policy_dir`` through verl's agent loop (``grto_tool_agent``, the ``hf`` server
    in this process, the tool of ``tool_dir`` frozen) on ``n`` held-out single-object camouflage scenes.

    Reports how the protocol is followed (trajectories that call, that take two or more policy turns,
    calls and invalid calls per trajectory, answers that parse) and what it reaches: the first call's box
    IoU (the policy's localisation, comparable to the single-turn warm start's box IoU), and the final
    mask's IoU (:func:`verl_grto.agent.reward.compute_score`: the last valid call's mask), beside the
    trivial baseline of filling the object's exact box."""
    from verl_grto.agent.data import tool_fields
    from verl_grto.agent.local import agent_config, build_loop, run_rows, turns
    from verl_grto.agent.reward import compute_score
    from verl_grto.agent.segment_tool import SegmentTool
    from verl_grto.data.masks import decode_rle, fill_boxes
    from verl_grto.data.synthetic import generate_split
    from verl_grto.reward.mask_iou import intersection_union, sample_iou
    from verl_grto.rollout.hf_server import HFRolloutServer

    rows = [
        tool_fields(r.to_record())
        for r in generate_split(n, seed, DOMAIN, AGENT_PROBE_SPLIT, min_objects=1, max_objects=1)
    ]
    threads = torch.get_num_threads()
    server = HFRolloutServer(
        str(policy_dir), {"response_length": PROBE_RESPONSE_LENGTH, "prompt_length": PROBE_PROMPT_LENGTH}, seed=seed
    )
    torch.set_num_threads(threads)
    tool = SegmentTool({"mode": "frozen", "checkpoint": str(tool_dir)})
    loop = build_loop(
        server, server.tokenizer, server.processor, [tool], agent_config(PROBE_PROMPT_LENGTH, PROBE_RESPONSE_LENGTH, 6)
    )
    outputs = run_rows(loop, rows, {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": False})
    first_box, final_iou, fill_iou, calls, invalid, multi, parsed = [], [], [], [], [], [], []
    examples = []
    for row, out in zip(rows, outputs, strict=True):
        gt = json.loads(row["reward_model"]["ground_truth"])
        records = out.extra_fields.get("grto_tool_calls", [])
        valid = [c for c in records if c["kind"] == "ok"]
        first_box.append(box_iou(valid[0]["box"], gt["boxes"][0]) if valid else 0.0)
        text = server.tokenizer.decode(out.response_ids, skip_special_tokens=True)
        score = compute_score("", text, row["reward_model"]["ground_truth"], {**row["extra_info"], **out.extra_fields})
        final_iou.append(score["mask_iou"])
        calls.append(len(records))
        invalid.append(len(records) - len(valid))
        multi.append(sum(1 for m, _ in turns(out) if m == 1) >= 2)
        parsed.append(score["format_reward"] > 0)
        h, w = gt["image_size"]
        inter, union = intersection_union(fill_boxes(gt["boxes"], h, w), decode_rle(gt["mask"]))
        fill_iou.append(sample_iou(inter, union))
        if len(examples) < 3:
            examples.append(text[:400])
    return {
        "n": n,
        "domain": DOMAIN,
        "split": AGENT_PROBE_SPLIT,
        "call_rate": float(np.mean([c > 0 for c in calls])),
        "multi_turn_fraction": float(np.mean(multi)),
        "calls_per_trajectory": float(np.mean(calls)),
        "invalid_calls_per_trajectory": float(np.mean(invalid)),
        "answer_parse_rate": float(np.mean(parsed)),
        "first_call_box_iou": float(np.mean(first_box)),
        "final_mask_iou": float(np.mean(final_iou)),
        "exact_box_fill_iou": float(np.mean(fill_iou)),
        "examples": examples,
    }


def warm_start_agent_policy(
    base_dir: Path,
    tool_dir: Path,
    out_dir: Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    refine_fraction: float = REFINE_FRACTION,
    probe_n: int = 32,
) -> AgentWarmStartReport:
    """Train (:func:`train_agent_policy`), save the policy with its tool template into ``out_dir`` (the base's
    own config files copied, as :func:`verl_grto.assets.warmstart.save_policy` does) and probe it."""
    import shutil

    base_dir, tool_dir, out_dir = Path(base_dir), Path(tool_dir), Path(out_dir)
    start = time.perf_counter()
    model, processor, losses = train_agent_policy(base_dir, tool_dir, seed, steps, batch_size, lr, refine_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    for name in _COPIED_CONFIGS:
        shutil.copy2(base_dir / name, out_dir / name)
    train_time = time.perf_counter() - start
    probe = probe_agent(out_dir, tool_dir, seed, probe_n) if probe_n > 0 else None
    report = AgentWarmStartReport(
        seed=seed,
        steps=len(losses),
        batch_size=batch_size,
        lr=lr,
        refine_fraction=refine_fraction,
        num_threads=torch.get_num_threads(),
        train_time_s=round(train_time, 2),
        initial_loss=losses[0],
        final_loss_mean10=float(np.mean(losses[-10:])),
        loss_curve=[(s, losses[s]) for s in sorted({*range(0, len(losses), 10), len(losses) - 1})],
        probe=probe,
        base_dir=str(base_dir),
        tool_dir=str(tool_dir),
    )
    (out_dir / REPORT_NAME).write_text(report.to_json())
    return report


def agent_policy_stamp(seed: int) -> dict:
    """What a finished default call-format warm start for ``seed`` is stamped with (its policy's and tool's stamps)."""
    return {
        "builder": AGENT_POLICY_DIR,
        "version": AGENT_WARMSTART_VERSION,
        "seed": seed,
        "base": warm_policy_stamp(seed),
        "tool": pretrained_tool_stamp(seed),
    }


def build_agent_policy(folder: Path, seed: int = 0, base: Path | None = None, tool: Path | None = None) -> Path:
    """``folder/tiny_qwen25vl_agent``: the default call-format warm start of the warm policy ``base``, its
    replies drawn by the pre-trained tool ``tool`` (None: the shipped copies when current, else built, as
    :func:`ensure_warm_policy` / :func:`ensure_pretrained_tool` give them); built once under a lock,
    published whole. Their stamps must be the ones :func:`agent_policy_stamp` records."""
    base = Path(base) if base is not None else ensure_warm_policy(None, seed=seed)
    tool = Path(tool) if tool is not None else ensure_pretrained_tool(None, seed=seed)
    stamp = agent_policy_stamp(seed)
    for path, want in ((base, stamp["base"]), (tool, stamp["tool"])):
        if read_stamp(path) != want:
            raise RuntimeError(f"{path} is stamped {read_stamp(path)}, expected {want}")
    return build_dir_once(
        Path(folder) / AGENT_POLICY_DIR, stamp, lambda tmp: warm_start_agent_policy(base, tool, tmp, seed)
    )


def ensure_agent_policy(root: Path | None = None, seed: int = 0) -> Path:
    """The tiny multi-turn policy for ``seed``: the shipped copy when current (``root`` None), else built."""
    if root is None:
        shipped = shipped_asset(AGENT_POLICY_DIR, seed, agent_policy_stamp(seed))
        if shipped is not None:
            return shipped
        return build_agent_policy(ensure_assets(None, seed=seed).policy.parent, seed)
    folder = ensure_assets(root, seed=seed).policy.parent
    return build_agent_policy(
        folder, seed, ensure_warm_policy(root, seed=seed), ensure_pretrained_tool(root, seed=seed)
    )
