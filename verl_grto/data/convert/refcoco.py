"""RefCOCO, RefCOCO+ and RefCOCOg from the REFER release (Licheng Yu's ``refer`` layout).

Layout (``src`` is REFER's ``data`` folder, LISA's ``refer_seg`` folder)::

    refcoco/   refs(unc).p  refs(google).p  instances.json
    refcoco+/  refs(unc).p                  instances.json
    refcocog/  refs(umd).p  refs(google).p  instances.json
    images/mscoco/images/train2014/COCO_train2014_<id>.jpg    (or pass image_dir=)

``refs(<split_by>).p`` is a pickle of a list of refs ``{ref_id, ann_id, image_id, split,
sentences: [{sent_id, sent, raw, tokens}], ...}``; ``instances.json`` holds the COCO images
(file_name, height, width) and annotations (polygon or RLE segmentation, bbox) they point to. The
pickle is loaded with :func:`verl_grto.data.safe_pickle.load_data_pickle` (builtin containers only).

Splits are the refs' own ``split`` values (refcoco/refcoco+ unc: train, val, testA, testB;
refcocog umd: train, val, test; refcocog google: train, val). Rows: one per sentence (the community
evaluates every sentence), text = the ``sent`` field (REFER's normalised text). ``extra_info``
keeps ``ref_id``, ``ann_id``, ``image_id`` and ``object_boxes``: a JSON list of the COCO boxes
(x1, y1, x2, y2) of every annotated object of the image, for the random-object-box baseline.

Size: every row embeds its image's bytes (verl's dataset reads the image from the row), so an image
with several refs and sentences is repeated per sentence; RefCOCO (unc) train, about 120k sentences
over about 17k COCO images, carries about 19 GB of row bytes. Refs are visited image by image, so
an image's rows are consecutive: the converter reads each image once, and on disk parquet's
dictionary encoding keeps about one copy per row group (:mod:`verl_grto.data.parquet`), but
verl's loader (Hugging Face ``datasets``) materialises every row's copy in its cache.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from verl_grto.data.convert.base import (
    AnnotationFileError,
    ConversionReport,
    LoadedImage,
    RowError,
    Sample,
    Task,
    check_mask_size,
    load_image,
    policy_frame,
    run_conversion,
    safe_id,
)
from verl_grto.data.safe_pickle import load_data_pickle

#: dataset -> (default split_by, allowed split_by)
REFER_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "refcoco": ("unc", ("unc", "google")),
    "refcoco+": ("unc", ("unc",)),
    "refcocog": ("umd", ("umd", "google")),
}
IMAGE_DIR = Path("images/mscoco/images/train2014")


def _load_refs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"REFER refs file {path} not found")
    try:
        refs = load_data_pickle(path)
    except Exception as exc:  # unsafe, truncated or not a pickle at all: the whole file is unusable
        raise AnnotationFileError(path, f"cannot load refs pickle: {str(exc).removeprefix(f'{path}: ')}") from exc
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise AnnotationFileError(path, "expected a list of ref dicts")
    return refs


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, list[dict]]]:
    if not path.is_file():
        raise FileNotFoundError(f"REFER instances file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): im for im in data["images"]}
        anns = {int(a["id"]): a for a in data["annotations"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise AnnotationFileError(path, f"malformed COCO instances file: {exc!r}") from exc
    per_image: dict[int, list[dict]] = defaultdict(list)
    for a in anns.values():
        per_image[a.get("image_id")].append(a)
    return images, anns, per_image


def _ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):  # polygons
            polys = [p for p in seg if len(p) >= 6]
            if not polys:
                raise RowError(f"malformed annotation: ann {ann.get('id')} has no polygon with >= 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(seg, dict) and "counts" in seg:
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            check = tuple(int(v) for v in rle["size"])
            if check != (height, width):
                raise RowError(f"mask size {check[0]}x{check[1]} (RLE) differs from image entry {height}x{width}")
        else:
            raise RowError(f"malformed annotation: ann {ann.get('id')} segmentation is neither polygons nor RLE")
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError) as exc:
        raise RowError(f"malformed annotation: ann {ann.get('id')} segmentation: {exc!r}") from exc


def _object_boxes(anns: list[dict]) -> str:
    boxes = []
    for a in anns:
        bbox = a.get("bbox")
        if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox):
            x, y, w, h = (float(v) for v in bbox)
            boxes.append([x, y, x + w, y + h])
    return json.dumps(boxes)


class _ImageCache:
    """Keeps the last decoded image: refs are visited image by image, each image has several refs."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._image: LoadedImage | None = None

    def get(self, path: Path) -> LoadedImage:
        if path != self._path or self._image is None:
            self._path, self._image = path, None
            self._image = load_image(path)  # a RowError leaves the cache empty: the next ref retries
        return self._image


def _samples(ref: dict, ctx: _Context) -> Iterator[Sample]:
    try:
        ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
        sentences = [(int(s["sent_id"]), str(s.get("sent") or s.get("raw") or "").strip()) for s in ref["sentences"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise RowError(f"malformed ref: {exc!r}") from exc
    if not sentences or not all(text for _, text in sentences):
        raise RowError("malformed ref: no sentences, or an empty sentence")
    if ann_id not in ctx.anns:
        raise RowError(f"ann_id {ann_id} not in instances.json")
    if image_id not in ctx.images:
        raise RowError(f"image_id {image_id} not in instances.json")
    entry = ctx.images[image_id]
    try:
        file_name, height, width = str(entry["file_name"]), int(entry["height"]), int(entry["width"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RowError(f"malformed image entry {image_id} in instances.json: {exc!r}") from exc
    image = ctx.cache.get(ctx.image_dir / file_name)
    check_mask_size((height, width), image, "instances.json")
    mask = _ann_mask(ctx.anns[ann_id], height, width)
    if not mask.any():
        raise RowError(f"empty mask for ann {ann_id}")
    extra = {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "object_boxes": _object_boxes(ctx.per_image.get(image_id, [])),
    }
    for sent_id, text in sentences:
        yield Sample(
            sample_id=safe_id(ctx.dataset, ctx.split_by, ref.get("split"), f"r{ref_id}", f"s{sent_id}"),
            image=image,
            mask=mask,
            expression=text,
            extra=extra,
        )


class _Context:
    def __init__(self, dataset: str, split_by: str, image_dir: Path, instances: tuple) -> None:
        self.dataset, self.split_by, self.image_dir = dataset, split_by, image_dir
        self.images, self.anns, self.per_image = instances
        self.cache = _ImageCache()


def convert_refer(
    src: Path,
    out: Path,
    *,
    dataset: str,
    split_by: str | None = None,
    splits: list[str] | None = None,
    image_dir: Path | None = None,
    coords: str = "pixels",
    factor: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert one REFER dataset (refcoco / refcoco+ / refcocog) to ``<out>/<split>.parquet``.

    ``split_by``: unc / google / umd (default: unc, unc, umd). ``splits``: subset of the refs'
    split values (default: all). ``image_dir``: COCO train2014 images (default:
    ``src/images/mscoco/images/train2014``).
    ``coords`` / ``factor`` / ``min_pixels`` / ``max_pixels``: the policy's frame the rows record
    (:func:`verl_grto.data.convert.base.policy_frame`; default Qwen2.5-VL's, ``coords=norm1000`` for Qwen3-VL).
    """
    if dataset not in REFER_DATASETS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; one of {sorted(REFER_DATASETS)}")
    default, allowed = REFER_DATASETS[dataset]
    split_by = split_by or default
    if split_by not in allowed:
        raise ValueError(f"{dataset} has split_by {allowed}, not {split_by!r}")
    src = Path(src)
    refs_path = src / dataset / f"refs({split_by}).p"
    refs = _load_refs(refs_path)
    ctx = _Context(
        dataset,
        split_by,
        Path(image_dir) if image_dir else src / IMAGE_DIR,
        _load_instances(src / dataset / "instances.json"),
    )
    if not ctx.image_dir.is_dir():
        raise FileNotFoundError(f"COCO train2014 image folder {ctx.image_dir} not found (pass image_dir=)")
    by_split: dict[str, list[tuple[int, int, int, dict]]] = defaultdict(list)
    for pos, ref in enumerate(refs):
        split = ref.get("split")
        if isinstance(split, str):
            by_split[split].append((_sort_key(ref.get("image_id")), _sort_key(ref.get("ref_id")), pos, ref))
        else:  # reported under the pseudo-split "unknown" so that it is not lost
            by_split["unknown"].append((0, 0, pos, ref))
    wanted = list(splits) if splits else sorted(s for s in by_split if s != "unknown")
    missing = [s for s in wanted if s not in by_split]
    if missing:
        raise ValueError(f"{refs_path} has no refs of split(s) {missing}; it has {sorted(by_split)}")
    tasks: dict[str, list[Task]] = {}
    for split in wanted + (["unknown"] if "unknown" in by_split and not splits else []):
        tasks[split] = [
            Task(
                refs_path,
                f"ref #{pos} (ref_id {ref.get('ref_id')})",
                (lambda r=ref: _samples(r, ctx)) if split != "unknown" else (lambda: _bad_split()),
            )
            for _, _, pos, ref in sorted(by_split[split], key=lambda t: t[:3])
        ]
    return run_conversion(
        f"{dataset}({split_by})",
        dataset,
        tasks,
        Path(out),
        progress=progress,
        frame=policy_frame(coords, factor, min_pixels, max_pixels),
    )


def _sort_key(value: Any) -> int:
    return value if isinstance(value, int) else -1


def _bad_split() -> Iterator[Sample]:
    raise RowError("malformed ref: 'split' is missing or not a string")
