"""Pre-train the tiny SAM2 on plain synthetic scenes: the stand-in for SAM2's own pre-training.

A real SAM2 checkpoint arrives able to segment; a randomly initialised tiny one does not, and a
tool that cannot segment gives the policy no reward to learn from. So the tiny default tool is
pre-trained here on the *plain* domain (prompted with jittered ground-truth boxes and a point,
BCE + Dice, the whole model with a lower encoder learning rate: ../shared/notes/learnability.md
measured IoU 0.88 after 2000 such steps against 0.74 when only the decoder trains). The
*camouflage* domain is then the shift that GRTO / BTO adapt the tool to.

Every score is reported beside the box-fill baseline (a mask filling the prompt box) on the same
held-out scenes and seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


def pretrain_tool(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 8,
    encoder_lr: float = 1e-4,
    decoder_lr: float = 1e-3,
    domain: str = "plain",
    size: int = 112,
    jitter: float = 0.1,
) -> ToolPretrainReport:
    """Train ``base_dir``'s Sam2Model on synthetic scenes; save it (HF format) to ``out_dir``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 104729])
    model = Sam2Model.from_pretrained(str(base_dir)).float().train()
    encoder = [p for n, p in model.named_parameters() if n.startswith("vision_encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision_encoder.")]
    opt = torch.optim.AdamW([{"params": encoder, "lr": encoder_lr}, {"params": rest, "lr": decoder_lr}])
    start = time.perf_counter()
    loss_value = float("nan")
    for _ in range(steps):
        images, boxes, masks = _batch(rng, domain, batch_size, size, jitter)
        logits = _forward(model, images, boxes)
        target = _low_res(masks, logits.shape[-2:])
        flat_logits, flat_target = logits.flatten(0, 1), target.flatten(0, 1)
        loss = (bce_loss(flat_logits, flat_target) + dice_loss(flat_logits, flat_target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
    seconds = time.perf_counter() - start
    iou, fill = evaluate_tool(model, domain, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    report = ToolPretrainReport(steps, seconds, loss_value, seed, domain, 64, iou, fill)
    (out_dir / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
    return report


#: Bump when the pre-training recipe changes, so cached tools are rebuilt.
PRETRAIN_VERSION = 1
PRETRAIN_STEPS = 1500


def build_pretrained_tool(base_tool: Path, seed: int = 0, steps: int = PRETRAIN_STEPS) -> Path:
    """``<base_tool's folder>/tiny_sam2_pretrained``, pre-trained from ``base_tool``; built once (atomic, locked)."""
    from verl_grto.atomic import build_dir_once

    stamp = {"builder": "tiny_sam2_pretrained", "version": PRETRAIN_VERSION, "seed": seed, "steps": steps}
    return build_dir_once(
        Path(base_tool).parent / "tiny_sam2_pretrained",
        stamp,
        lambda tmp: pretrain_tool(base_tool, tmp, seed=seed, steps=steps),
    )


def ensure_pretrained_tool(root: Path | None = None, seed: int = 0, steps: int = PRETRAIN_STEPS) -> Path:
    """The pre-trained tiny tool next to the base assets (``.../seed<seed>/tiny_sam2_pretrained``), built once."""
    from verl_grto.assets.build import ensure_assets

    return build_pretrained_tool(ensure_assets(root, seed=seed).tool, seed=seed, steps=steps)
