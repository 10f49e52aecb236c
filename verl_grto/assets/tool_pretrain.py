"""Pre-train the tiny SAM2 on plain synthetic scenes: the stand-in for SAM2's own pre-training.

A real SAM2 checkpoint arrives able to segment; a randomly initialised tiny one does not, and a
tool that cannot segment gives the policy no reward to learn from. So the tiny default tool is
pre-trained here on the *plain* domain (prompted with jittered ground-truth boxes and a point,
BCE + Dice, the whole model with a lower encoder learning rate: ../shared/notes/learnability.md
and benchmarks/learnability.py measure it). The *camouflage* domain is then the shift that GRTO / BTO
adapt the tool to: :func:`adapt_tool` is the same adaptation in isolation (decoder only, exact boxes
jittered), for the learnability study.

Every score is reported beside the box-fill baseline (a mask filling the prompt box) on the same
held-out scenes and seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Sam2Model

from verl_grto.data.synthetic import make_scene
from verl_grto.tool.losses import bce_loss, dice_loss
from verl_grto.tool.preprocess import images_to_pixels, scale_coords

REPORT_NAME = "pretrain_report.json"


@dataclass
class ToolPretrainReport:
    steps: int
    seconds: float
    final_loss: float
    seed: int
    domain: str
    eval_scenes: int
    eval_iou: float
    box_fill_iou: float


def _jitter(box: tuple[float, float, float, float], rng: np.random.Generator, size: int, frac: float) -> list[float]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    d = rng.uniform(-frac, frac, 4) * np.array([w, h, w, h])
    j = np.clip(np.array([x1, y1, x2, y2]) + d, 0, size)
    if j[2] - j[0] < 2 or j[3] - j[1] < 2:
        return [x1, y1, x2, y2]
    return j.tolist()


def _batch(rng: np.random.Generator, domain: str, batch: int, size: int, jitter: float):
    images, boxes, masks = [], [], []
    for _ in range(batch):
        scene = make_scene(rng, domain, size=size, max_objects=4)
        objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:2]]
        while len(objs) < 2:
            objs.append(objs[0])
        images.append(scene.image)
        boxes.append([_jitter(o.box, rng, size, jitter) for o in objs])
        masks.append(np.stack([o.mask for o in objs]))
    return images, torch.tensor(boxes, dtype=torch.float32), torch.from_numpy(np.stack(masks)).float()


def _forward(model: Sam2Model, images: list[np.ndarray], boxes: torch.Tensor) -> torch.Tensor:
    image_size = int(model.config.prompt_encoder_config.image_size)
    pixels = images_to_pixels(images, image_size)
    hw = images[0].shape[:2]
    scaled = scale_coords(boxes.view(len(images), -1, 2, 2), hw, image_size).view(len(images), -1, 4)
    out = model(pixel_values=pixels, input_boxes=scaled, multimask_output=False)
    return out.pred_masks[:, :, 0]  # (B, objects, h, w) low-res logits


def _low_res(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return (F.interpolate(masks, size=hw, mode="area") > 0.5).float()


@torch.no_grad()
def evaluate_tool(model: Sam2Model, domain: str, seed: int, scenes: int = 64, size: int = 112) -> tuple[float, float]:
    """Mean IoU of masks from *exact* ground-truth boxes, and of the box-fill baseline, on held-out scenes."""
    rng = np.random.default_rng([seed, 7919])
    model.eval()
    ious, fills = [], []
    for _ in range(scenes // 8):
        images, boxes, masks = _batch(rng, domain, 8, size, jitter=0.0)
        logits = _forward(model, images, boxes)
        pred = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False) > 0
        gt = masks.bool()
        inter = (pred & gt).flatten(2).sum(-1).float()
        union = (pred | gt).flatten(2).sum(-1).float()
        ious.extend((inter / union.clamp(min=1)).flatten().tolist())
        fill = torch.zeros_like(gt)
        for b in range(len(images)):
            for k in range(boxes.shape[1]):
                x1, y1, x2, y2 = (int(round(v)) for v in boxes[b, k].tolist())
                fill[b, k, y1:y2, x1:x2] = True
        fills.extend(((fill & gt).flatten(2).sum(-1) / (fill | gt).flatten(2).sum(-1).clamp(min=1)).flatten().tolist())
    return float(np.mean(ious)), float(np.mean(fills))


#: ``callback(step, model)`` after optimiser step ``step`` (1-based); the model is put back in train mode after it.
ToolCallback = Callable[[int, Sam2Model], None]


def _train(
    model: Sam2Model,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    domain: str,
    steps: int,
    batch_size: int,
    size: int,
    jitter: float,
    callback: ToolCallback | None,
) -> float:
    """``steps`` steps of BCE + Dice on the low-res logits, prompts = jittered ground-truth boxes; the last loss."""
    params = [p for group in opt.param_groups for p in group["params"]]
    loss_value = float("nan")
    progress = tqdm(range(1, steps + 1), desc=f"tool training ({domain})", unit="step", mininterval=5.0)
    for step in progress:
        model.train()
        images, boxes, masks = _batch(rng, domain, batch_size, size, jitter)
        logits = _forward(model, images, boxes)
        target = _low_res(masks, logits.shape[-2:])
        flat_logits, flat_target = logits.flatten(0, 1), target.flatten(0, 1)
        loss = (bce_loss(flat_logits, flat_target) + dice_loss(flat_logits, flat_target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if callback is not None:
            callback(step, model)
    return loss_value


def pretrain_tool(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    steps: int = 4000,
    batch_size: int = 8,
    encoder_lr: float = 1e-4,
    decoder_lr: float = 1e-3,
    domain: str = "plain",
    size: int = 112,
    jitter: float = 0.1,
    callback: ToolCallback | None = None,
) -> ToolPretrainReport:
    """Train ``base_dir``'s Sam2Model (whole model, the image encoder at ``encoder_lr``) on synthetic
    scenes; save it (HF format) to ``out_dir``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 104729])
    model = Sam2Model.from_pretrained(str(base_dir)).float().train()
    encoder = [p for n, p in model.named_parameters() if n.startswith("vision_encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision_encoder.")]
    opt = torch.optim.AdamW([{"params": encoder, "lr": encoder_lr}, {"params": rest, "lr": decoder_lr}])
    start = time.perf_counter()
    loss_value = _train(model, opt, rng, domain, steps, batch_size, size, jitter, callback)
    seconds = time.perf_counter() - start
    iou, fill = evaluate_tool(model, domain, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    report = ToolPretrainReport(steps, seconds, loss_value, seed, domain, 64, iou, fill)
    (out_dir / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
    return report


def adapt_tool(
    model: Sam2Model,
    domain: str,
    steps: int,
    seed: int = 0,
    lr: float = 1e-3,
    batch_size: int = 8,
    size: int = 112,
    jitter: float = 0.1,
    callback: ToolCallback | None = None,
) -> Sam2Model:
    """Train only ``model``'s mask decoder on ``domain`` (in place), as BTO and GRTO train the tool:
    the image encoder frozen (its embeddings are cached in training), prompts = jittered exact boxes.
    The upper bound of what the tool's adaptation can reach when the policy's boxes are exact."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 15485863])
    decoder = [p for n, p in model.named_parameters() if n.startswith("mask_decoder.")]
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mask_decoder."))
    opt = torch.optim.AdamW(decoder, lr=lr)
    try:
        _train(model, opt, rng, domain, steps, batch_size, size, jitter, callback)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
    return model.eval()


#: Bump when the pre-training recipe changes, so cached tools are rebuilt.
PRETRAIN_VERSION = 2
PRETRAIN_STEPS = 4000


PRETRAINED_TOOL_DIR = "tiny_sam2_pretrained"


def pretrained_tool_stamp(seed: int, steps: int = PRETRAIN_STEPS) -> dict:
    """What a finished default pre-training for ``seed`` is stamped with."""
    return {"builder": PRETRAINED_TOOL_DIR, "version": PRETRAIN_VERSION, "seed": seed, "steps": steps}


def build_pretrained_tool(base_tool: Path, seed: int = 0, steps: int = PRETRAIN_STEPS) -> Path:
    """``<base_tool's folder>/tiny_sam2_pretrained``, pre-trained from ``base_tool``; built once (atomic, locked)."""
    from verl_grto.atomic import build_dir_once

    return build_dir_once(
        Path(base_tool).parent / PRETRAINED_TOOL_DIR,
        pretrained_tool_stamp(seed, steps),
        lambda tmp: pretrain_tool(base_tool, tmp, seed=seed, steps=steps),
    )


def ensure_pretrained_tool(root: Path | None = None, seed: int = 0, steps: int = PRETRAIN_STEPS) -> Path:
    """The pre-trained tiny tool: with ``root`` None, the shipped copy when it is current
    (:mod:`verl_grto.assets.shipped`), else the one next to the base assets
    (``.../seed<seed>/tiny_sam2_pretrained``), built once."""
    from verl_grto.assets.build import ensure_assets
    from verl_grto.assets.shipped import shipped_asset

    if root is None:
        shipped = shipped_asset(PRETRAINED_TOOL_DIR, seed, pretrained_tool_stamp(seed, steps))
        if shipped is not None:
            return shipped
    return build_pretrained_tool(ensure_assets(root, seed=seed).tool, seed=seed, steps=steps)
