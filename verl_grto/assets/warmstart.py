"""Supervised warm start: turn the random tiny policy into a reference policy that localises.

Why: a randomly initialised tiny Qwen2.5-VL never emits a parseable ``<answer>``, so every GRPO reward
is 0, every advantage is 0 and RL cannot start; and a policy whose boxes do not depend on the image
prompts the tool with boxes that miss, so nothing downstream can be seen working. A supervised run on
synthetic scenes (plain torch AdamW, in-process, CPU) teaches the format in ~100 steps and, later, to
localise: the default curriculum (:data:`DEFAULT_PHASES`, 2000 plain + 1000 camouflage single-object
steps of batch 16) reached box IoU 0.74-0.76 on held-out camouflage scenes at its end against 0.20-0.23
for a constant box in seeds 0, 1 and 2 (docs/benchmarks.md; the tiny policy's 64 image tokens are what
made it reliable, :mod:`verl_grto.assets.qwen25vl`). The default warm start stops it early, after
:data:`DEFAULT_STOP_AFTER` steps (box IoU about 0.55): a reference policy at its supervised optimum left
GRPO nothing to raise. The result is the reference policy of B-GRTO's bootstrap stage; the main job
uses a shipped copy (:mod:`verl_grto.assets.shipped`).

What is trained is exactly what RL later runs:

* input: the instruction as verl builds the prompt (:mod:`verl_grto.policy.inputs`: image part +
  text, the agent loop's image resize, chat template with the generation prompt, processor-expanded
  image pads) and the model tensors as the ``hf`` rollout builds them;
* target: :func:`answer_target` (an empty think, then the referred object's box) followed by
  ``<|im_end|>``, tokenised on its own and appended, as a rollout response is; loss on those tokens only;
* positions: ``mm_token_type_ids`` go into the forward, so Qwen2.5-VL uses its 3-D mrope positions
  as verl's actor and the ``hf`` rollout do (without them it silently falls back to 1-D positions).

Curriculum: single-object plain scenes first (the object is the only thing to look at; the jump to
localisation comes between steps 750 and 2000, depending on the seed), then the camouflage domain, where it carries over
within a few hundred steps; trained on camouflage alone the same model did not localise in 2000 steps.
Referring among 2-4 objects is an optional extra phase (``referring_steps``; not part of the default). Training scenes come from their own synthetic stream
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from verl_grto.assets.build import build_assets, ensure_assets, policy_stamp
from verl_grto.assets.shipped import shipped_asset
from verl_grto.atomic import build_dir_once, read_stamp
from verl_grto.data.schema import build_short_instruction
from verl_grto.data.synthetic import Referring, Scene, make_sample
from verl_grto.eval.policy_probe import TINY_RESPONSE_LENGTH, ProbeResult, probe_policy
from verl_grto.policy.inputs import build_messages, model_inputs, render_prompt
from verl_grto.reward.answer import ToolPrompt, format_answer

#: Bump when the defaults or the training change, so cached warm policies are rebuilt.
WARMSTART_VERSION = 5
WARM_POLICY_DIR = "tiny_qwen25vl_warm"
REPORT_NAME = "warmstart_report.json"
#: The synthetic stream training scenes are drawn from (disjoint from RL's ``train``/``val`` and the probe's).
TRAIN_SPLIT = "warmstart-train"
#: Object counts of the optional referring phase (the RL data's default range).
REFERRING_OBJECTS = (2, 4)
IMAGE_SIZE = 112
DEFAULT_EVAL_N = 64
_IGNORE = -100
_CLIP_NORM = 1.0
_COPIED_CONFIGS = ("config.json", "generation_config.json")
_WARMUP_STEPS = 20
_MIN_LR_FRACTION = 0.1
_DECAY_FRACTION = 0.2
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
    train_scenes: int  # distinct scenes trained on (a fresh one per example)
    num_threads: int
    train_time_s: float  # wall clock: loading, data generation, training and saving
    train_cpu_s: float  # CPU time of the same (all threads): tells a busy machine (wall >> CPU) from a slow run
    eval_time_s: float
    initial_loss: float  # first step's batch loss
    final_loss: float  # last step's batch loss
    final_loss_mean10: float  # mean of the last 10 steps' losses (less noisy)
    loss_curve: list[tuple[int, float]]  # (step, batch loss) every few steps
    probe: ProbeResult | None  # held-out scenes like phase 1's
    probe_referring: ProbeResult | None = None  # held-out 2-4-object scenes, when evaluated
    base_dir: str = ""
    phases: list[dict] | None = None  # the curriculum, in order
    schedule_steps: int = 0  # steps the learning-rate schedule spans (all phases); > steps when stopped early

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def answer_target(scene: Scene, ref: Referring) -> str:
    """The answer the policy is taught: an empty think, then the referred object's box, nothing else:
    ``<think></think><answer>{"bbox": [x1, y1, x2, y2]}</answer>`` (about 22 tokens).

    Why this short: the same tiny model localised after ~1500 steps with this target and stayed at the
    level of a constant box after 1500 steps with a 38-token target of think text, box and one point
    (../shared/notes/learnability.md, third probe; benchmarks/learnability.py). The format is the one
    the parser accepts everywhere; points stay optional for the policy to add under RL.
    """
    obj = scene.objects[ref.target]
    return format_answer([ToolPrompt(box=obj.box)], think="")


@dataclass(frozen=True)
class _Example:
    input_ids: list[int]  # prompt then target
    n_prompt: int
    image: Image.Image  # as the policy sees it (after the agent loop's resize)


class _TrainingStream:
    """Example ``i`` of a phase's own synthetic stream: a fresh scene for every example, none repeated.

    Prompts are rendered by :func:`verl_grto.policy.inputs.render_prompt`, as verl's agent loop renders
    them. That costs about twice as much as drawing the scene, and when the agent loop's resize keeps the
    image as it is, the prompt ids depend only on the instruction and the image size (which fixes the
    number of image pads): they are then cached by those.
    """

    def __init__(self, processor: Any, seed: int, domain: str, objects: tuple[int, int]) -> None:
        self.processor = processor
        self.seed = seed
        self.domain = domain
        self.min_objects, self.max_objects = objects
        self.split = f"{TRAIN_SPLIT}-m{self.min_objects}to{self.max_objects}"
        self._prompts: dict[tuple[str, tuple[int, int]], list[int]] = {}

    def _prompt(self, instruction: str, image: Image.Image) -> tuple[list[int], Image.Image]:
        key = (instruction, image.size)
        if key in self._prompts:
            return self._prompts[key], image
        messages = build_messages([{"role": "user", "content": instruction}], [image])
        ids, (seen,) = render_prompt(messages, self.processor)
        if seen.size == image.size:  # not resized: these ids hold for every image of this size
            self._prompts[key] = ids
        return ids, seen

    def example(self, i: int) -> _Example:
        scene, ref = make_sample(
            self.seed,
            self.domain,
            self.split,
            i,
            size=IMAGE_SIZE,
            max_objects=self.max_objects,
            min_objects=self.min_objects,
        )
        instruction = build_short_instruction(ref.text)
        prompt_ids, image = self._prompt(instruction, Image.fromarray(scene.image))
        tokenizer = self.processor.tokenizer
        target = tokenizer(answer_target(scene, ref) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return _Example(input_ids=prompt_ids + list(target), n_prompt=len(prompt_ids), image=image)


def _collate(examples: list[_Example], processor: Any, config: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """Model inputs for a batch, and the labels of its last ``logits_to_keep - 1`` next-token predictions.

    The tensors come from :func:`verl_grto.policy.inputs.model_inputs`, as the ``hf`` rollout builds
    them (pixels from the image processor, ``mm_token_type_ids`` for 3-D mrope positions), left-padded:
    every target ends at the last position, so the LM head only runs on the last ``longest target + 1``
    positions (it is a large share of this model's compute). Labels: the target tokens, -100 elsewhere.
    """
    inputs: dict[str, Any] = model_inputs(
        [e.input_ids for e in examples],
        [[e.image] for e in examples],
        processor,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    keep = max(len(e.input_ids) - e.n_prompt for e in examples) + 1
    labels = torch.full((len(examples), keep - 1), _IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        target = e.input_ids[e.n_prompt :]
        labels[row, keep - 1 - len(target) :] = torch.tensor(target)
    inputs["logits_to_keep"] = keep
    return inputs, labels


def _answer_loss(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens."""
    logits = model(**inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=_IGNORE
    )


def supervised_step(model: torch.nn.Module, optimizer: Any, scheduler: Any, loss: torch.Tensor) -> float:
    """One optimiser step on ``loss`` (gradients clipped to :data:`_CLIP_NORM`, the schedule advanced); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), _CLIP_NORM)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then constant until the last :data:`_DECAY_FRACTION` of the steps, then cosine
    decay to :data:`_MIN_LR_FRACTION` of the peak. Constant through the middle: the tiny policy's
    localisation arrives late (a loss plateau, then a drop), and a schedule that has already decayed
    by then slows it (the third probe of ../shared/notes/learnability.md used a constant rate)."""
    if step < _WARMUP_STEPS:
        return (step + 1) / _WARMUP_STEPS
    decay_start = total - int(_DECAY_FRACTION * total)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return _MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_policy(model: torch.nn.Module, processor: Any, base_dir: Path, out_dir: Path) -> None:
    """Write the trained weights, the processor (tokenizer included) and the base's own config files.

    The configs are copied, not re-serialised: loading with an explicit dtype adds ``"dtype"`` entries,
    and the warm policy should differ from the base in its weights only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    for name in _COPIED_CONFIGS:
        shutil.copy2(base_dir / name, out_dir / name)


@dataclass(frozen=True)
class Phase:
    """``steps`` optimiser steps on ``domain`` scenes of ``objects = (min, max)`` objects."""

    domain: str
    objects: tuple[int, int]
    steps: int


#: The default warm start's curriculum, single-object scenes: plain first, where the object is the only
#: thing to look at and the policy learns to read positions (its box IoU jumps from a constant box's
#: ~0.2 to 0.4-0.7 between steps 750 and 2000, depending on the seed), then the RL domain, where it
#: carries over within 1000 steps (benchmarks/learnability.py). Trained on the shifted domain from the start, the same
#: policy had not localised after 2000 steps.
DEFAULT_PHASES = (Phase("plain", (1, 1), 2000), Phase("camouflage", (1, 1), 1000))

#: Where the default warm start stops: after this many optimiser steps of :data:`DEFAULT_PHASES`'
#: 3000-step schedule (100 steps into the camouflage phase, the learning rate still at its peak). Why
#: not the end: the reference policy must leave RL something to raise. Trained to the end (box IoU 0.76)
#: its greedy box IoU only fell under 32 GRPO steps, in every setting tried (lr 5e-5 to 5e-4, AdamW or
#: SGD, sampling temperature 1 or 0.5, 64 or 256 answers per step, the box IoU as the only reward; with
#: lr 0 it stayed: benchmarks/results/policy_box_iou_probes.json). Stopped here (box IoU 0.54-0.58 in
#: seeds 0-2, still above the 0.5 bar) the main job's own 32 steps raise it (0.594 -> 0.61-0.62).
#: docs/benchmarks.md, "A reference policy with headroom".
DEFAULT_STOP_AFTER = 2100

#: ``callback(step, model, processor)`` after optimiser step ``step`` (1-based, counted over all phases).
StepCallback = Callable[[int, torch.nn.Module, Any], None]


def train_policy(
    base_dir: Path,
    seed: int,
    phases: Sequence[Phase],
    batch_size: int,
    lr: float,
    callback: StepCallback | None = None,
    progress_bar: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> tuple[torch.nn.Module, Any, list[float]]:
    """Supervised training of the policy in ``base_dir`` through ``phases``, one learning-rate schedule
    over all of them; returns the model (in eval mode), its processor and the batch losses.

    ``stop_after``: stop after that many optimiser steps; the schedule still spans every phase, so the
    model is the same as the full run's at that step (an early-stopped checkpoint, not a shorter run).

    ``callback`` lets a caller look at the model mid-run (benchmarks/learnability.py probes
    it); the model is put back in train mode after it. ``device``: where the model trains (scenes and
    prompts are always made on the CPU).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor  # slow to import

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(base_dir)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = sum(phase.steps for phase in phases)
    if stop_after is not None and not 0 < stop_after <= total:
        raise ValueError(f"stop_after={stop_after}: expected 1..{total}, the steps of the phases")
    stop = total if stop_after is None else stop_after
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total))
    losses: list[float] = []
    progress = tqdm(total=stop, desc="warm start (policy)", unit="step", mininterval=5.0, disable=not progress_bar)
    for phase in phases:
        if len(losses) >= stop:
            break
        stream = _TrainingStream(processor, seed, phase.domain, phase.objects)
        progress.set_postfix_str(f"{phase.domain}, {phase.objects[0]}-{phase.objects[1]} objects")
        for step in range(min(phase.steps, stop - len(losses))):
            batch = [stream.example(i) for i in range(step * batch_size, (step + 1) * batch_size)]
            inputs, labels = _collate(batch, processor, model.config)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            losses.append(supervised_step(model, optimizer, scheduler, _answer_loss(model, inputs, labels.to(device))))
            progress.update()
            if callback is not None:
                model.eval()
                callback(len(losses), model, processor)
                model.train()
    progress.close()
    return model.eval(), processor, losses


def _steps_per_phase(phases: Sequence[Phase], steps: int) -> list[int]:
    """How many of ``steps`` optimiser steps each phase got (phases run in order; a stop cuts the last)."""
    out = []
    for phase in phases:
        out.append(min(phase.steps, steps))
        steps -= out[-1]
    return out


def warm_start_policy(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    domain: str = "plain",
    max_objects: int = 1,
    referring_steps: int = 0,
    num_threads: int | None = None,
    phases: Sequence[Phase] | None = None,
    eval_n: int = DEFAULT_EVAL_N,
    eval_referring: bool = False,
    eval_max_new_tokens: int = TINY_RESPONSE_LENGTH,
    stop_after: int | None = None,
) -> WarmStartReport:
    """Train the policy in ``base_dir`` on synthetic scenes; save it and ``warmstart_report.json`` into ``out_dir``.

    ``phases`` (default :data:`DEFAULT_PHASES`, unless ``steps`` is given): the curriculum. With ``steps``:
    ``steps`` steps on ``domain`` scenes of 1..``max_objects`` objects, then ``referring_steps`` on 2-4-object
    referring scenes. Every example is a fresh scene. The learning rate warms up over 20 steps, stays
    constant, then decays (cosine) to a tenth over the last fifth of the phases' steps. ``stop_after``
    stops after that many steps of that schedule (default: :data:`DEFAULT_STOP_AFTER` with the default
    phases, else none; see :func:`train_policy`). ``num_threads`` sets torch's CPU
    threads for the call (restored afterwards). ``eval_n`` held-out scenes (0: no evaluation) of the
    last phase's domain are answered greedily through the rollout's own code path
    (:func:`verl_grto.eval.policy_probe.probe_policy`) with ``eval_max_new_tokens``; ``eval_referring``
    adds as many 2-4-object scenes.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if phases is None:
        if steps is None:
            phases = DEFAULT_PHASES
            stop_after = DEFAULT_STOP_AFTER if stop_after is None else stop_after
        else:
            phases = [Phase(domain, (1, max_objects), steps), Phase(domain, REFERRING_OBJECTS, referring_steps)]
    phases = [p for p in phases if p.steps > 0]
    if not phases:
        raise ValueError("a warm start needs at least one step")
    single = [p for p in phases if p.objects[0] == 1]
    domain = (single or phases)[-1].domain
    max_objects = max((p.objects[1] for p in single), default=1)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        model, processor, losses = train_policy(base_dir, seed, phases, batch_size, lr, stop_after=stop_after)
        save_policy(model, processor, base_dir, out_dir)
        train_time, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start

        trained = _steps_per_phase(phases, len(losses))
        start = time.perf_counter()
        probe = probe_referring = None
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
        if eval_n > 0 and eval_referring:
            lo, hi = REFERRING_OBJECTS
            probe_referring = probe_policy(
                out_dir, seed, eval_n, domain, max_objects=hi, min_objects=lo, max_new_tokens=eval_max_new_tokens
            )
        report = WarmStartReport(
            seed=seed,
            steps=len(losses),
            single_object_steps=sum(n for p, n in zip(phases, trained, strict=True) if p.objects[0] == 1),
            referring_steps=sum(n for p, n in zip(phases, trained, strict=True) if p.objects[0] > 1),
            batch_size=batch_size,
            lr=lr,
            domain=domain,
            max_objects=max_objects,
            train_scenes=len(losses) * batch_size,
            num_threads=torch.get_num_threads(),
            train_time_s=round(train_time, 2),
            train_cpu_s=round(train_cpu, 2),
            eval_time_s=round(time.perf_counter() - start, 2),
            initial_loss=losses[0],
            final_loss=losses[-1],
            final_loss_mean10=float(np.mean(losses[-10:])),
            loss_curve=[(s, losses[s]) for s in sorted({*range(0, len(losses), _LOSS_LOG_EVERY), len(losses) - 1})],
            probe=probe,
            probe_referring=probe_referring,
            base_dir=str(base_dir),
            phases=[asdict(p) for p in phases],
            schedule_steps=sum(p.steps for p in phases),
        )
        (out_dir / REPORT_NAME).write_text(report.to_json())
        return report
    finally:
        torch.set_num_threads(previous_threads)


def warm_policy_stamp(seed: int) -> dict:
    """What a finished default warm start for ``seed`` is stamped with (version, seed, its base's stamp)."""
    return {"builder": WARM_POLICY_DIR, "version": WARMSTART_VERSION, "seed": seed, "base": policy_stamp(seed)}


def build_warm_policy(out: Path, seed: int = 0) -> Path:
    """``out/tiny_qwen25vl_warm``: the default warm start of ``out/tiny_qwen25vl`` (built first if missing).

    Built once under a lock and published whole (:func:`verl_grto.atomic.build_dir_once`); the stamp holds
    :data:`WARMSTART_VERSION`, the seed and the base's own stamp, so a rebuilt base or a version bump
    rebuilds it. ``out`` is a directory as :func:`verl_grto.assets.build.build_assets` takes it.
    """
    base = build_assets(Path(out), seed=seed).policy
    stamp = warm_policy_stamp(seed)
    if read_stamp(base) != stamp["base"]:
        raise RuntimeError(f"{base} is stamped {read_stamp(base)}, expected {stamp['base']}")
    return build_dir_once(base.parent / WARM_POLICY_DIR, stamp, lambda tmp: warm_start_policy(base, tmp, seed=seed))


def ensure_warm_policy(root: Path | None = None, seed: int = 0) -> Path:
    """The warm policy for ``seed``: with ``root`` None, the shipped copy when it is current
    (:mod:`verl_grto.assets.shipped`), else the one beside the base of
    :func:`verl_grto.assets.build.ensure_assets` (default ``<default_home>/assets/seed<seed>/tiny_qwen25vl_warm``),
    built if missing."""
    if root is None:
        shipped = shipped_asset(WARM_POLICY_DIR, seed, warm_policy_stamp(seed))
        if shipped is not None:
            return shipped
    return build_warm_policy(ensure_assets(root, seed=seed).policy.parent, seed=seed)
