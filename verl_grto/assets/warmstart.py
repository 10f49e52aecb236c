"""Supervised warm start: turn the random tiny policy into a reference policy that answers in format.

Why: a randomly initialised tiny Qwen2.5-VL never emits a parseable ``<answer>``, so every GRPO reward
is 0, every advantage is 0 and RL cannot start. A short supervised run on synthetic scenes (plain
torch AdamW, in-process, CPU) teaches the answer format and some localisation; the result is also the
reference policy of B-GRTO's bootstrap stage.

What is trained is exactly what RL later runs:

* input: the instruction as verl builds the prompt (:func:`verl_grto.data.chat.encode_prompt`: image
  part + text, chat template with the generation prompt, processor-expanded image pads);
* target: :func:`answer_target` (a short think naming the referred object's colour and shape, then the
  box and one positive point inside the object) followed by ``<|im_end|>``, tokenised on its own and
  appended, as a rollout response is; loss on those tokens only;
* positions: ``mm_token_type_ids`` go into the forward, so Qwen2.5-VL uses its 3-D mrope positions
  as verl's actor and the ``hf`` rollout do (without them it silently falls back to 1-D positions).

Curriculum (learnability probe, ``docs``/notes): single-object scenes first, where the format is learnt
in ~100 steps and localisation follows; an optional second phase on 2-4-object referring scenes (the
probe saw no referring progress from scratch). Training scenes come from their own synthetic stream
(:data:`TRAIN_SPLIT`); the report's evaluation uses held-out scenes of another stream
(:data:`verl_grto.eval.policy_probe.PROBE_SPLIT`) through the rollout's own generation code.

Determinism: data are seeded per sample, model weights come from the seeded base, the optimiser is
deterministic on CPU; two runs with the same seed and thread count give the same losses.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from verl_grto.assets.build import ensure_assets
from verl_grto.atomic import build_dir_once, read_stamp
from verl_grto.data.chat import encode_prompt
from verl_grto.data.schema import build_instruction
from verl_grto.data.synthetic import Referring, Scene, make_sample
from verl_grto.eval.policy_probe import DEFAULT_MAX_NEW_TOKENS, ProbeResult, probe_policy
from verl_grto.reward.answer import ToolPrompt, format_answer

#: Bump when the defaults or the training change, so cached warm policies are rebuilt.
WARMSTART_VERSION = 1
WARM_POLICY_DIR = "tiny_qwen25vl_warm"
REPORT_NAME = "warmstart_report.json"
#: The synthetic stream training scenes are drawn from (disjoint from RL's ``train``/``val`` and the probe's).
TRAIN_SPLIT = "warmstart-train"
#: Object counts of the optional referring phase (the RL data's default range).
REFERRING_OBJECTS = (2, 4)
IMAGE_SIZE = 112
DEFAULT_STEPS = 600
DEFAULT_TRAIN_POOL = 2048
_IGNORE = -100
_WARMUP_STEPS = 20
_MIN_LR_FRACTION = 0.1
_LOSS_LOG_EVERY = 10


@dataclass(frozen=True)
class WarmStartReport:
    """What a warm start did and what it reached; written as ``warmstart_report.json`` beside the weights."""

    seed: int
    steps: int  # optimiser steps over both phases
    single_object_steps: int
    referring_steps: int
    batch_size: int
    lr: float
    domain: str
    max_objects: int
    train_pool: int | None  # distinct training scenes per phase (None: a fresh scene every time)
    num_threads: int
    wall_time_s: float  # training, data generation included
    eval_time_s: float
    initial_loss: float  # first step's batch loss
    final_loss: float  # last step's batch loss
    final_loss_mean10: float  # mean of the last 10 steps' losses (less noisy)
    loss_curve: list[tuple[int, float]]  # (step, batch loss) every few steps
    probe: ProbeResult | None  # held-out scenes like phase 1's
    probe_referring: ProbeResult | None = None  # held-out 2-4-object scenes, when evaluated
    base_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _inner_point(mask: np.ndarray) -> tuple[int, int]:
    """The object's pixel nearest its centroid, as ``(x, y)``: inside the object even for occluded shapes."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return int(xs[k]), int(ys[k])


def answer_target(scene: Scene, ref: Referring) -> str:
    """The answer the policy is taught: think names the referred object, then its box and one inner point.

    Naming the resolved object (not repeating the expression) keeps the think short (the tiny recipe
    allows 48 response tokens) and makes it the reasoning step for relational expressions.
    """
    obj = scene.objects[ref.target]
    prompt = ToolPrompt(box=obj.box, points=(_inner_point(obj.mask),), labels=(1,))
    return format_answer([prompt], think=f"the {obj.color} {obj.shape}")


@dataclass(frozen=True)
class _Example:
    input_ids: list[int]  # prompt then target
    n_prompt: int
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # (1, 3)


class _Examples:
    """Training example ``i`` of one phase, encoded on first use and cached (a pool is cycled, not regenerated)."""

    def __init__(self, processor: Any, seed: int, domain: str, objects: tuple[int, int]) -> None:
        self.processor = processor
        self.seed = seed
        self.domain = domain
        self.min_objects, self.max_objects = objects
        self.split = f"{TRAIN_SPLIT}-m{self.min_objects}to{self.max_objects}"
        self.eos = processor.tokenizer.eos_token
        self._cache: dict[int, _Example] = {}

    def __getitem__(self, i: int) -> _Example:
        if i not in self._cache:
            self._cache[i] = self._encode(i)
        return self._cache[i]

    def _encode(self, i: int) -> _Example:
        scene, ref = make_sample(
            self.seed,
            self.domain,
            self.split,
            i,
            size=IMAGE_SIZE,
            max_objects=self.max_objects,
            min_objects=self.min_objects,
        )
        instruction = build_instruction(ref.text, width=scene.size, height=scene.size)
        prompt = encode_prompt(self.processor, instruction, [Image.fromarray(scene.image)])
        target = self.processor.tokenizer(answer_target(scene, ref) + self.eos, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt["input_ids"][0].tolist()
        return _Example(
            input_ids=prompt_ids + list(target),
            n_prompt=len(prompt_ids),
            mm_token_type_ids=prompt["mm_token_type_ids"][0].tolist() + [0] * len(target),
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
        )


def _collate(examples: list[_Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the target tokens only (the model shifts them itself)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, _IGNORE)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids, dtype=torch.int)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, e.n_prompt : n] = ids[row, e.n_prompt : n]
        mask[row, :n] = 1
        types[row, :n] = torch.tensor(e.mm_token_type_ids, dtype=torch.int)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": types,
        "pixel_values": torch.cat([e.pixel_values for e in examples]),
        "image_grid_thw": torch.cat([e.image_grid_thw for e in examples]),
        "labels": labels,
    }


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to :data:`_MIN_LR_FRACTION` of the peak."""
    if step < _WARMUP_STEPS:
        return (step + 1) / _WARMUP_STEPS
    progress = (step - _WARMUP_STEPS) / max(1, total - _WARMUP_STEPS)
    return _MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save(model: torch.nn.Module, processor: Any, base_dir: Path, out_dir: Path) -> None:
    """Write the trained weights with the base's config, tokenizer, processor and generation config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")


def warm_start_policy(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    lr: float = 1e-3,
    domain: str = "plain",
    max_objects: int = 1,
    referring_steps: int = 0,
    train_pool: int | None = DEFAULT_TRAIN_POOL,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
    eval_n: int = 100,
    eval_referring: bool = False,
    eval_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> WarmStartReport:
    """Train the policy in ``base_dir`` on synthetic scenes and save it (and the report) into ``out_dir``.

    Phase 1 runs ``steps`` steps on scenes with 1..``max_objects`` objects; phase 2 (``referring_steps``
    > 0) continues on 2-4-object referring scenes. ``train_pool`` distinct scenes per phase are cycled
    (generating and encoding a scene costs about as much as a training step on it); None draws a fresh
    scene for every example. ``num_threads`` sets torch's CPU threads for the run (restored afterwards).
    ``eval_n`` held-out scenes (0: no evaluation) are answered greedily through the rollout's code path
    (:func:`verl_grto.eval.policy_probe.probe_policy`); ``eval_referring`` adds 2-4-object scenes.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor  # slow to import

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)
        processor = AutoProcessor.from_pretrained(base_dir)
        model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        total = steps + referring_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total))
        pad_id = processor.tokenizer.pad_token_id
        phases = [((1, max_objects), steps), (REFERRING_OBJECTS, referring_steps)]
        losses: list[float] = []
        for phase, (objects, n_steps) in enumerate(phases):
            examples = _Examples(processor, seed, domain, objects)
            rng = np.random.default_rng([seed, phase])
            for step in range(n_steps):
                if train_pool is None:
                    indices = range(step * batch_size, (step + 1) * batch_size)
                else:
                    indices = rng.integers(train_pool, size=batch_size).tolist()
                loss = model(**_collate([examples[i] for i in indices], pad_id)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
        model.eval()
        _save(model, processor, base_dir, out_dir)
        wall = time.perf_counter() - start

        start = time.perf_counter()
        probe = probe_ref = None
        if eval_n > 0:
            probe = probe_policy(
                out_dir,
                seed,
                eval_n,
                domain,
                max_objects=max_objects,
                min_objects=1,
                max_new_tokens=eval_max_new_tokens,
            )
            if eval_referring:
                lo, hi = REFERRING_OBJECTS
                probe_ref = probe_policy(
                    out_dir, seed, eval_n, domain, max_objects=hi, min_objects=lo, max_new_tokens=eval_max_new_tokens
                )
        eval_time = time.perf_counter() - start
        report = WarmStartReport(
            seed=seed,
            steps=total,
            single_object_steps=steps,
            referring_steps=referring_steps,
            batch_size=batch_size,
            lr=lr,
            domain=domain,
            max_objects=max_objects,
            train_pool=train_pool,
            num_threads=torch.get_num_threads(),
            wall_time_s=round(wall, 2),
            eval_time_s=round(eval_time, 2),
            initial_loss=losses[0] if losses else float("nan"),
            final_loss=losses[-1] if losses else float("nan"),
            final_loss_mean10=float(np.mean(losses[-10:])) if losses else float("nan"),
            loss_curve=[(s, losses[s]) for s in range(0, len(losses), _LOSS_LOG_EVERY)],
            probe=probe,
            probe_referring=probe_ref,
            base_dir=str(base_dir),
        )
        (out_dir / REPORT_NAME).write_text(report.to_json())
        return report
    finally:
        torch.set_num_threads(previous_threads)


def ensure_warm_policy(root: Path | None = None, seed: int = 0) -> Path:
    """The warm-started tiny policy for ``seed`` (default settings), built once beside the base policy.

    Lives in ``<assets root>/seed<seed>/tiny_qwen25vl_warm`` (see :func:`verl_grto.assets.build.ensure_assets`);
    the stamp holds :data:`WARMSTART_VERSION` and the base's own stamp, so a rebuilt base or changed
    defaults rebuild it.
    """
    base = ensure_assets(root, seed=seed).policy
    stamp = {"builder": WARM_POLICY_DIR, "version": WARMSTART_VERSION, "seed": seed, "base": read_stamp(base)}
    return build_dir_once(
        base.parent / WARM_POLICY_DIR,
        stamp,
        lambda tmp: warm_start_policy(base, tmp, seed=seed),
    )
