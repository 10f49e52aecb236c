"""EarthReason (SegEarth-R1, geospatial pixel reasoning) from its official release.

Layout (the Hugging Face release ``earth-insights/EarthReason``; SegEarth-R1 reads it from
``rs_reason_seg/RSReasonSeg/``; unpacked archives sometimes nest ``val/val/``)::

    train/ val/ test/
        images/<name>.jpg|.png
        labels/<name>.png        mask, foreground = any non-zero value (as SegEarth-R1 reads it)
        QAs/<name>.json          {"questions": [question, ...], "answer": [explanation, ...]}

Image, mask and QA pair by file stem. An empty ``answer`` list marks a question whose target is not
in the image: its mask is empty. Such negatives are part of the val / test benchmark (a correct
answer is an empty mask; see :mod:`verl_grto.eval.metrics` for how an empty ground truth scores)
and are kept there; SegEarth-R1 trains without them, so by default they are excluded from train
(``keep_empty=True`` keeps them). Rows: one per question (``all_queries``; the official evaluation
reads ``questions[0]``, as does the default outside train).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from verl_grto.data.convert.base import (
    ConversionReport,
    Excluded,
    RowError,
    Sample,
    Task,
    check_mask_size,
    find_dir,
    load_image,
    load_mask,
    policy_frame,
    run_conversion,
    safe_id,
    select_queries,
)

NAME = "earthreason"
SPLITS = ("train", "val", "test")
SUBFOLDERS = ("images", "labels", "QAs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _split_roots(src: Path, split: str) -> dict[str, Path] | None:
    """Each of images / labels / QAs from the first candidate root that has it (releases differ in nesting)."""
    roots = [f"{split}/{split}", split, f"rs_reason_seg/RSReasonSeg/{split}", f"RSReasonSeg/{split}"]
    found = {sub: find_dir(src, [f"{r}/{sub}" for r in roots]) for sub in SUBFOLDERS}
    return None if any(v is None for v in found.values()) else found  # type: ignore[return-value]


def _questions(qa_path: Path) -> list[str]:
    try:
        qa = json.loads(qa_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RowError(f"malformed annotation {qa_path.name}: {exc}") from exc
    questions = qa.get("questions") if isinstance(qa, dict) else None
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise RowError(f"malformed annotation {qa_path.name}: 'questions' must be a non-empty list of strings")
    if not isinstance(qa.get("answer", []), list):
        raise RowError(f"malformed annotation {qa_path.name}: 'answer' must be a list")
    return questions


def _samples(
    image_path: Path, dirs: dict[str, Path], split: str, keep_empty: bool, all_queries: bool | None
) -> Iterator[Sample]:
    stem = image_path.stem
    qa_path = dirs["QAs"] / f"{stem}.json"
    if not qa_path.is_file():
        raise RowError(f"missing annotation QAs/{qa_path.name}")
    questions = _questions(qa_path)
    mask = load_mask(dirs["labels"] / f"{stem}.png", 0)
    if not mask.any() and not keep_empty:
        raise Excluded("no target in the image (empty mask)")
    image = load_image(image_path)
    check_mask_size(mask.shape, image, f"labels/{stem}.png")
    for q, text in select_queries(questions, split, all_queries):
        yield Sample(
            sample_id=safe_id(NAME, split, stem, f"q{q}"),
            image=image,
            mask=mask,
            expression=text,
            extra={"has_target": bool(mask.any())},
        )


def convert_earthreason(
    src: Path,
    out: Path,
    *,
    splits: list[str] | None = None,
    keep_empty: bool | None = None,
    all_queries: bool | None = None,
    coords: str = "pixels",
    factor: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert EarthReason's train / val / test under ``src`` to ``<out>/<split>.parquet``.

    ``keep_empty``: keep no-target questions (None: everywhere but train). ``all_queries``: see
    :func:`verl_grto.data.convert.base.select_queries`.
    ``coords`` / ``factor`` / ``min_pixels`` / ``max_pixels``: the policy's frame the rows record
    (:func:`verl_grto.data.convert.base.policy_frame`; default Qwen2.5-VL's, ``coords=norm1000`` for Qwen3-VL).
    """
    src = Path(src)
    present = {s: d for s in SPLITS if (d := _split_roots(src, s)) is not None}
    wanted = list(splits) if splits else list(present)
    missing = [s for s in wanted if s not in present]
    if not present or missing:
        raise FileNotFoundError(
            f"EarthReason split(s) {missing or list(SPLITS)} not found under {src}; expected <split>/images, "
            "<split>/labels and <split>/QAs"
        )
    tasks: dict[str, list[Task]] = {}
    for split in wanted:
        dirs = present[split]
        keep = (split != "train") if keep_empty is None else keep_empty
        images = sorted(p for p in dirs["images"].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        stems = {p.stem for p in images}
        tasks[split] = [
            Task(p, p.stem, lambda p=p, d=dirs, s=split, k=keep: _samples(p, d, s, k, all_queries)) for p in images
        ] + [
            Task(qa, qa.stem, lambda qa=qa: _no_image(qa))
            for qa in sorted(dirs["QAs"].glob("*.json"))
            if qa.stem not in stems
        ]
    return run_conversion(
        NAME, NAME, tasks, Path(out), progress=progress, frame=policy_frame(coords, factor, min_pixels, max_pixels)
    )


def _no_image(qa_path: Path) -> Iterator[Sample]:
    raise RowError(f"annotation {qa_path.name} has no image")
