"""Greedy box answers of a policy checkpoint on held-out synthetic scenes, beside trivial baselines.

Why: a quick, honest number for "does this policy emit parseable answers and localise?" (the warm
start's report, sanity checks of RL checkpoints) that measures what RL will actually see. So the
checkpoint is loaded and run by the ``hf`` rollout server itself (:class:`HFRolloutServer`, its
loader, input building with 3-D mrope positions and ``model.generate`` with the checkpoint's
generation config), prompts are built like verl's agent loop (:mod:`verl_grto.policy.inputs`), responses
are decoded like verl's reward manager (``skip_special_tokens=True``) and scored by the RL reward
(:func:`verl_grto.reward.box_reward.score_box_answer`).

Every score stands beside baselines on the same scenes: the whole-image box; a random object's box
(:func:`verl_grto.eval.baselines.random_object_box`: with one object per scene it *is* the answer, so
it only means something for multi-object scenes); and the mean ground-truth box of the scenes (the
best-ish constant answer; computed on the evaluated scenes themselves, so slightly optimistic).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from verl_grto.data.synthetic import generate_split
from verl_grto.eval.baselines import fill_boxes, random_object_box
from verl_grto.policy.inputs import render_row
from verl_grto.reward.box_reward import score_box_answer
from verl_grto.reward.geometry import box_iou

#: The synthetic stream held out for probes: no training split or RL split draws from it.
PROBE_SPLIT = "probe-val"
#: The tiny recipes' ``data.max_response_length`` (recipes/tiny_policy_base.yaml), the probes' default
#: budget: a tiny policy's answer must fit in it to be rewarded at all in training.
TINY_RESPONSE_LENGTH = 32
_VARIABLE_RE = re.compile(r"'[^']*'|\"[^\"]*\"|-?\d+(\.\d+)?")


@dataclass(frozen=True)
class ProbeResult:
    """Scores of one policy on ``n`` scenes; IoUs are box IoUs with the referred object's box."""

    n: int
    parse_rate: float
    mean_iou: float  # unparseable answers count as 0
    acc_at_0_5: float
    whole_image_iou: float
    random_object_iou: float
    mean_box_iou: float
    seed: int
    domain: str
    split: str
    max_objects: int
    min_objects: int
    max_new_tokens: int
    mean_response_tokens: float
    truncated_rate: float  # hit max_new_tokens without an end-of-sequence token
    distinct_responses: int  # 1 means the policy answers the same whatever the scene
    failure_reasons: dict[str, int] = field(default_factory=dict)  # the most common parse failures
    examples: list[str] = field(default_factory=list)  # the first few responses, to eyeball


def _reason_kind(reason: str) -> str:
    """A parse failure without its numbers and quoted text, so failures of one kind count together."""
    return _VARIABLE_RE.sub("#", reason)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


async def _generate_all(
    server: Any, prompts: list[tuple[list[int], list[Image.Image]]], max_new_tokens: int
) -> list[Any]:
    params = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": max_new_tokens, "logprobs": False}
    return await asyncio.gather(  # sent at once, as verl's agent loop does: the server batches them
        *[
            server.generate(prompt_ids=ids, sampling_params=dict(params), request_id=str(k), image_data=images)
            for k, (ids, images) in enumerate(prompts)
        ]
    )


def probe_policy(
    policy_dir: Path,
    seed: int = 0,
    n: int = 100,
    domain: str = "plain",
    max_objects: int = 1,
    min_objects: int = 1,
    split: str = PROBE_SPLIT,
    max_new_tokens: int = TINY_RESPONSE_LENGTH,
    n_examples: int = 3,
) -> ProbeResult:
    """Greedy-decode one answer per scene of ``generate_split(n, seed, domain, split, ...)`` and score it."""
    from verl_grto.rollout.hf_server import HFRolloutServer  # imports ray and verl: only when probing

    rows = generate_split(n, seed, domain, split, max_objects=max_objects, min_objects=min_objects)
    threads = torch.get_num_threads()  # the server may set its own (VERL_GRTO_ROLLOUT_THREADS): not ours to keep
    server = HFRolloutServer(str(policy_dir), {"response_length": max_new_tokens, "prompt_length": 4096}, seed=seed)
    torch.set_num_threads(threads)
    prompts = []
    for row in rows:
        record = row.to_record()  # the parquet row verl reads
        prompts.append(render_row(record, server.processor))
    outputs = asyncio.run(_generate_all(server, prompts, max_new_tokens))

    ious, parsed, lengths, truncated, failures, texts = [], [], [], [], Counter(), []
    whole, rand_obj, gt_boxes = [], [], []
    for row, out in zip(rows, outputs, strict=True):
        text = server.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        score = score_box_answer(text, row.ground_truth)
        ious.append(score.box_iou)
        parsed.append(score.parse_ok)
        if not score.parse_ok:
            failures[_reason_kind(score.reason)] += 1
        lengths.append(len(out.token_ids))
        truncated.append(out.stop_reason == "length")
        texts.append(text)
        gt = row.ground_truth
        h, w = gt.image_size
        gt_boxes.append(gt.boxes[0])
        whole.append(box_iou((0, 0, w, h), gt.boxes[0]))
        extra = {"sample_id": row.sample_id, **row.extra}
        rand_obj.append(_mask_iou(random_object_box(gt, extra, seed=seed), fill_boxes(gt.boxes, h, w)))
    mean_box = np.mean(np.asarray(gt_boxes, dtype=np.float64), axis=0)
    return ProbeResult(
        n=len(rows),
        parse_rate=float(np.mean(parsed)),
        mean_iou=float(np.mean(ious)),
        acc_at_0_5=float(np.mean(np.asarray(ious) >= 0.5)),
        whole_image_iou=float(np.mean(whole)),
        random_object_iou=float(np.mean(rand_obj)),
        mean_box_iou=float(np.mean([box_iou(mean_box, b) for b in gt_boxes])),
        seed=seed,
        domain=domain,
        split=split,
        max_objects=max_objects,
        min_objects=min_objects,
        max_new_tokens=max_new_tokens,
        mean_response_tokens=float(np.mean(lengths)),
        truncated_rate=float(np.mean(truncated)),
        distinct_responses=len(set(texts)),
        failure_reasons=dict(failures.most_common(5)),
        examples=texts[:n_examples],
    )
