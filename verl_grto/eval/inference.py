"""Predictors for :func:`verl_grto.eval.evaluate.evaluate`: the trained policy + tool, or the tool on given prompts.

:class:`PolicyToolPredictor` does on a dataset row what a GRTO rollout does, without verl: the
policy answers the row's prompt greedily (built as verl builds it, :mod:`verl_grto.policy.inputs`),
:func:`~verl_grto.reward.frame.parse_in_frame` reads the answer in the frame the policy saw and maps it
to the image's (as training does), and the tool segments every object of it, their masks OR-ed, at the
image's size. An answer that does not parse gives an all-False mask
(the empty-mask rule's "missing prediction") and its reason is recorded.

Why per-sample records (:class:`SampleRecord`, appended to a JSON-lines file as they are made): a
score alone does not say whether the policy answered badly or did not answer at all; the records
give the parse rate, every rejection reason, and where the time goes (policy generation vs tool
decoding). They are appended, not rewritten, so an interrupted evaluation keeps them; a sample
predicted twice (interrupted between its record and its PNG) has two, the last one counts.

:class:`PromptedToolPredictor` bypasses the policy: the tool gets fixed boxes / points (``verl-grto
predict --box/--points``), which isolates the tool from the policy.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verl_grto.data.frame import PolicyFrame, row_answer_frame
from verl_grto.data.images import row_images
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt
from verl_grto.reward.frame import parse_in_frame
from verl_grto.tool.engine import ToolBatch, ToolEngine
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.prompts import PromptLike

#: Token budget of one full answer, ``<think>`` reasoning plus the JSON prompts: the default of evaluation,
#: prediction and BTO's CPU generator, roomy enough for a real model's reasoning (the tiny recipes allow
#: far less: :data:`verl_grto.eval.policy_probe.TINY_RESPONSE_LENGTH`).
REASONING_ANSWER_MAX_NEW_TOKENS = 256
MAX_REASONS = 20


def default_device() -> str:
    """CUDA when there is a GPU, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def row_rgb(row: dict[str, Any]) -> np.ndarray:
    """The row's first image as the HxWx3 uint8 array the tool reads (the frame the mask is drawn in)."""
    images = row_images(row)
    if not images:
        raise ValueError(f"sample {row.get('extra_info', {}).get('sample_id', '?')} has no image")
    return np.array(images[0].convert("RGB"))  # a writable copy: torch refuses read-only buffers


@dataclass
class SampleRecord:
    """What happened to one sample: the answer, why it did not parse (``reason`` "" when it did), timing.

    ``answer`` is None when no policy ran (prompted tool). ``num_objects`` counts the objects that
    reached the tool; ``prompt_issues`` are the tool's repairs / rejections of them. Times are the
    sample's share of its batch (batch time / batch size).
    """

    sample_id: str
    answer: str | None
    reason: str
    num_objects: int
    prompt_issues: list[str] = field(default_factory=list)
    generation_s: float = 0.0
    tool_s: float = 0.0
    batch_size: int = 1


class ToolSegmenter:
    """The segmentation tool loaded once for inference: one bool mask per (image, objects)."""

    def __init__(self, tool_dir: str | Path, *, device: str = "cpu") -> None:
        tool = SegmentationTool.from_pretrained(str(tool_dir))
        tool.model.to(device)
        self.engine = ToolEngine(tool)

    def segment(
        self, images: Sequence[np.ndarray], objects: Sequence[Sequence[PromptLike]]
    ) -> tuple[list[np.ndarray], list[int], list[list[str]]]:
        """Masks (bool HxW, each image's size; the union of its objects), objects used, prompt issues.

        An image without objects gets an empty mask without running the tool.
        """
        if len(images) != len(objects):
            raise ValueError(f"{len(images)} images but {len(objects)} object lists")
        masks = [np.zeros(image.shape[:2], dtype=bool) for image in images]
        used = [0] * len(images)
        issues: list[list[str]] = [[] for _ in images]
        todo = [i for i, objs in enumerate(objects) if objs]
        if todo:
            self.engine.begin_step()  # features of earlier batches are not needed again
            batch = ToolBatch(
                list(range(len(todo))),
                [images[i] for i in todo],
                list(range(len(todo))),
                [list(objects[i]) for i in todo],
            )
            pred = self.engine.predict(batch)
            self.engine.begin_step()
            for j, i in enumerate(todo):
                masks[i] = pred.masks[j].cpu().numpy().astype(bool)
                used[i] = int(pred.num_objects[j])
                issues[i] = list(pred.prompt_issues[j])
        return masks, used, issues


class _Recorder:
    """Keeps the records in memory and appends each to ``records_path`` (JSON lines) as it is made."""

    def __init__(self, records_path: str | Path | None) -> None:
        self.records: list[SampleRecord] = []
        self.records_path = Path(records_path) if records_path is not None else None
        if self.records_path is not None:
            self.records_path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, records: Iterable[SampleRecord]) -> None:
        records = list(records)
        self.records.extend(records)
        if self.records_path is not None:
            with self.records_path.open("a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(asdict(r)) + "\n")


class PolicyToolPredictor:
    """Policy answers -> parsed objects -> tool masks. ``predictor(row)`` or ``predictor.predict_batch(rows)``."""

    def __init__(
        self,
        policy_dir: str | Path,
        tool_dir: str | Path,
        *,
        max_new_tokens: int = REASONING_ANSWER_MAX_NEW_TOKENS,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        records_path: str | Path | None = None,
        adapter_dir: str | Path | None = None,
    ) -> None:
        """``dtype`` of the policy: default float32 on CPU, bfloat16 on CUDA (as GPU rollouts run it);
        ``adapter_dir``: a LoRA run's adapter (PEFT folder) on top of ``policy_dir``."""
        from verl_grto.policy.generate import GreedyPolicy  # transformers generation: imported when needed

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        device = device or default_device()
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.policy = GreedyPolicy(policy_dir, device=device, dtype=dtype, adapter=adapter_dir)
        self.segmenter = ToolSegmenter(tool_dir, device=device)
        self.max_new_tokens = max_new_tokens
        self._recorder = _Recorder(records_path)

    @property
    def records(self) -> list[SampleRecord]:
        return self._recorder.records

    def __call__(self, row: dict[str, Any]) -> np.ndarray:
        return self.predict_batch([row])[0]

    def parse(self, row: dict[str, Any], text: str, image_hw: Sequence[int]) -> ParsedAnswer:
        """The policy's answer to ``row`` read in the frame it saw, returned in the image's frame (``image_hw``)."""
        frame = row_answer_frame(row, image_hw, PolicyFrame.from_processor(self.policy.processor))
        return parse_in_frame(text, frame, image_hw)

    def predict_batch(self, rows: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """One bool mask per row, at its image's size; one record per row."""
        images = [row_rgb(row) for row in rows]
        start = time.perf_counter()
        answers = self.policy.answer(rows, self.max_new_tokens)
        generation_s = time.perf_counter() - start
        parsed = [
            self.parse(row, text, image.shape[:2]) for row, text, image in zip(rows, answers, images, strict=True)
        ]
        start = time.perf_counter()
        masks, used, issues = self.segmenter.segment(images, [p.objects for p in parsed])
        tool_s = time.perf_counter() - start
        n = len(rows)
        self._recorder.add(
            SampleRecord(
                str(row["extra_info"]["sample_id"]), text, p.reason, used[i], issues[i], generation_s / n, tool_s / n, n
            )
            for i, (row, text, p) in enumerate(zip(rows, answers, parsed, strict=True))
        )
        return masks


class PromptedToolPredictor:
    """The tool on fixed object prompts (boxes / points in image pixels), no policy: ``verl-grto predict --box``."""

    def __init__(
        self,
        segmenter: ToolSegmenter,
        objects: Sequence[ToolPrompt],
        *,
        records_path: str | Path | None = None,
    ) -> None:
        if not objects:
            raise ValueError("give at least one object prompt (a box or points)")
        self.segmenter = segmenter
        self.objects = list(objects)
        self._recorder = _Recorder(records_path)

    @property
    def records(self) -> list[SampleRecord]:
        return self._recorder.records

    def __call__(self, row: dict[str, Any]) -> np.ndarray:
        image = row_rgb(row)
        start = time.perf_counter()
        masks, used, issues = self.segmenter.segment([image], [self.objects])
        tool_s = time.perf_counter() - start
        self._recorder.add(
            [SampleRecord(str(row["extra_info"]["sample_id"]), None, "", used[0], issues[0], 0.0, tool_s)]
        )
        return masks[0]


def read_records(records_path: str | Path) -> dict[str, SampleRecord]:
    """The last record of each sample in a records file (an empty dict when there is no file)."""
    path = Path(records_path)
    out: dict[str, SampleRecord] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = SampleRecord(**json.loads(line))
                out[record.sample_id] = record
    return out


def summarize_records(records: dict[str, SampleRecord], sample_ids: Sequence[str]) -> dict[str, Any]:
    """Parse rate, rejection reasons and mean timing over the split's samples that have a record (None: no data).

    ``without_record`` counts samples whose prediction came from elsewhere (an earlier run whose
    records were removed, PNGs copied in): they are not in the rate.
    """
    mine = [records[s] for s in sample_ids if s in records]
    answered = [r for r in mine if r.answer is not None]
    parsed = sum(1 for r in answered if not r.reason)
    reasons = Counter(r.reason for r in answered if r.reason)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "n": len(mine),
        "without_record": len(sample_ids) - len(mine),
        "answered": len(answered),
        "parsed": parsed,
        "parse_rate": parsed / len(answered) if answered else None,
        "reasons": dict(reasons.most_common(MAX_REASONS)),
        "empty_prompt": sum(1 for r in mine if r.num_objects == 0),
        "generation_s_per_sample": mean([r.generation_s for r in mine]),
        "tool_s_per_sample": mean([r.tool_s for r in mine]),
    }
