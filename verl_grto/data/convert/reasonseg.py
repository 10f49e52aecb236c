"""ReasonSeg (LISA, CVPR 2024) from its official release.

Layout (LISA's ``dataset/reason_seg/ReasonSeg/``; ``src`` may be that folder or LISA's
``dataset`` folder above it)::

    train/ val/ test/
        <name>.jpg
        <name>.json   {"text": [query, ...], "is_sentence": bool,
                       "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...]}, ...]}

The mask is rasterised the way LISA's ``get_mask_from_json`` defines the benchmark: "flag" shapes
are dropped; each polygon is filled *and* outlined (1 px) after truncating its vertices to integer
pixels; polygons are painted largest area first so a smaller polygon drawn on a larger one wins;
labels containing "ignore" paint the ignore value, all other labels the target. The ignore region
travels in ``extra_info["ignore_mask"]`` (a JSON RLE, "" when there is none) because LISA's
evaluation leaves those pixels out of both intersection and union, and so does ours.

Rows: one per query. ``all_queries=None`` keeps every query of train and the first of val / test
(LISA's evaluation reads ``text[0]``). ``queries="long"`` / ``"short"`` keep only images whose
``is_sentence`` is true / false (the paper's long / short query test subsets); the split is then
written as ``<split>_long`` / ``<split>_short``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from verl_grto.data.convert.base import (
    ConversionReport,
    Excluded,
    LoadedImage,
    RowError,
    Sample,
    Task,
    find_dir,
    load_image,
    policy_frame,
    run_conversion,
    safe_id,
    select_queries,
)
from verl_grto.data.masks import encode_rle, mask_to_box

NAME = "reasonseg"
SPLITS = ("train", "val", "test")
QUERY_FILTERS = {"all": None, "long": True, "short": False}
TARGET, IGNORE = 1, 255


def _read_json(path: Path) -> Any:
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):  # some LISA files are cp1252, as LISA's own reader allows
        try:
            return json.loads(raw.decode(encoding))
        except UnicodeDecodeError:
            continue
        except json.JSONDecodeError as exc:
            raise RowError(f"malformed annotation: not JSON ({exc})") from exc
    raise RowError("malformed annotation: neither UTF-8 nor cp1252 text")


def _polygon(points: Any, index: int) -> np.ndarray:
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RowError(f"malformed annotation: shape {index} points are not numbers") from exc
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise RowError(f"malformed annotation: shape {index} needs >= 3 finite [x, y] points, got shape {pts.shape}")
    return pts.astype(np.int32)  # truncation, as LISA's np.array(points, dtype=np.int32)


def _raster(pts: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(canvas, [pts], True, 1, 1)
    cv2.fillPoly(canvas, [pts], 1)
    return canvas.astype(bool)


def rasterize_shapes(shapes: Any, height: int, width: int) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """(target mask, ignore mask, one tight box per visible target polygon) of a ReasonSeg JSON's shapes."""
    if not isinstance(shapes, list):
        raise RowError("malformed annotation: 'shapes' is not a list")
    polys: list[tuple[np.ndarray, bool]] = []
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or "points" not in shape:
            raise RowError(f"malformed annotation: shape {i} lacks a string 'label' or 'points'")
        label = shape["label"].lower()
        if label == "flag":
            continue
        polys.append((_raster(_polygon(shape["points"], i), height, width), "ignore" in label))
    order = sorted(range(len(polys)), key=lambda k: -int(polys[k][0].sum()))  # largest first
    painted = np.zeros((height, width), dtype=np.uint8)
    for k in order:
        raster, is_ignore = polys[k]
        painted[raster] = IGNORE if is_ignore else TARGET
    target = painted == TARGET
    boxes = [b for raster, is_ignore in polys if not is_ignore and (b := mask_to_box(raster & target)) is not None]
    return target, painted == IGNORE, boxes


def _samples(
    json_path: Path, split: str, out_split: str, want_sentence: bool | None, all_queries: bool | None
) -> Iterator[Sample]:
    anno = _read_json(json_path)
    if not isinstance(anno, dict):
        raise RowError("malformed annotation: top level is not an object")
    texts = anno.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise RowError("malformed annotation: 'text' must be a non-empty list of non-empty strings")
    is_sentence = anno.get("is_sentence")
    if not isinstance(is_sentence, bool):
        raise RowError(f"malformed annotation: 'is_sentence' must be true or false, got {is_sentence!r}")
    if want_sentence is not None and is_sentence != want_sentence:
        raise Excluded("long query" if is_sentence else "short query")
    image: LoadedImage = load_image(json_path.with_suffix(".jpg"))
    target, ignore, boxes = rasterize_shapes(anno.get("shapes"), image.height, image.width)
    if not target.any():
        raise RowError("empty target mask (no 'target' polygon with visible pixels)")
    ignore_rle = json.dumps(encode_rle(ignore)) if ignore.any() else ""
    for q, text in select_queries(texts, split, all_queries):
        yield Sample(
            sample_id=safe_id(NAME, out_split, json_path.stem, f"q{q}"),
            image=image,
            mask=target,
            expression=text,
            boxes=boxes,
            extra={"is_sentence": is_sentence, "ignore_mask": ignore_rle},
        )


def _tasks(
    split_dir: Path, split: str, out_split: str, want_sentence: bool | None, all_queries: bool | None
) -> list[Task]:
    tasks = []
    for json_path in sorted(split_dir.glob("*.json")):
        tasks.append(
            Task(
                json_path, json_path.stem, lambda p=json_path: _samples(p, split, out_split, want_sentence, all_queries)
            )
        )
    for jpg in sorted(split_dir.glob("*.jpg")):
        if not jpg.with_suffix(".json").exists():
            tasks.append(Task(jpg, jpg.stem, lambda p=jpg: _no_annotation(p)))
    return tasks


def _no_annotation(jpg: Path) -> Iterator[Sample]:
    raise RowError(f"missing annotation {jpg.with_suffix('.json').name} for image {jpg.name}")


def convert_reasonseg(
    src: Path,
    out: Path,
    *,
    splits: list[str] | None = None,
    queries: str = "all",
    all_queries: bool | None = None,
    coords: str = "pixels",
    factor: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert ReasonSeg's ``train/ val/ test/`` folders under ``src`` to ``<out>/<split>.parquet``.

    ``splits``: which of train/val/test (default: those present). ``queries``: "all" | "long" |
    "short". ``all_queries``: one row per query (True), first query only (False), or the official
    protocol (None).
    ``coords`` / ``factor`` / ``min_pixels`` / ``max_pixels``: the policy's frame the rows record
    (:func:`verl_grto.data.convert.base.policy_frame`; default Qwen2.5-VL's, ``coords=norm1000`` for Qwen3-VL).
    """
    if queries not in QUERY_FILTERS:
        raise ValueError(f"queries must be one of {sorted(QUERY_FILTERS)}, got {queries!r}")
    src = Path(src)
    root = find_dir(src, ["reason_seg/ReasonSeg", "ReasonSeg", "."])
    present = [s for s in SPLITS if root is not None and (root / s).is_dir()]
    wanted = list(splits) if splits else present
    missing = [s for s in wanted if s not in present]
    if not present or missing:
        raise FileNotFoundError(
            f"ReasonSeg split folder(s) {missing or list(SPLITS)} not found under {src}; expected "
            "train/ val/ test/ of <name>.jpg + <name>.json (LISA's reason_seg/ReasonSeg)"
        )
    suffix = "" if queries == "all" else f"_{queries}"
    assert root is not None
    tasks = {f"{s}{suffix}": _tasks(root / s, s, f"{s}{suffix}", QUERY_FILTERS[queries], all_queries) for s in wanted}
    return run_conversion(
        NAME, NAME, tasks, Path(out), progress=progress, frame=policy_frame(coords, factor, min_pixels, max_pixels)
    )
