"""Camouflaged object detection sets (COD10K, CAMO, NC4K) from their official releases.

Layouts (``src`` is the release folder, or the folder holding it)::

    COD10K-v3/             Train/Image/*.jpg  Train/GT_Object/*.png  Test/Image/*.jpg  Test/GT_Object/*.png
    CAMO-V.1.0-CVIU2019/   Images/Train/*.jpg  Images/Test/*.jpg  GT/*.png   (one GT folder for both splits)
    NC4K/                  Imgs/*.jpg  GT/*.png                              (test only)

Image and mask pair by file stem. A ground-truth pixel is foreground when its grey value is above
128, the threshold pysodmetrics applies to ground truth, so the stored mask is exactly what the COD
metrics compare against. COD10K's release also holds non-camouflaged images
(``COD10K-NonCAM-*``, empty masks); the benchmark (3040 train / 2026 test) uses only the
camouflaged ones, so the others are excluded unless ``include_noncam=True``.

Prompt: "the camouflaged object". With ``prompt_variants`` (default: train split only) each image
gets one of :data:`PROMPTS`, chosen from its file name so that every run writes the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from verl_grto.data.convert.base import (
    ConversionReport,
    Excluded,
    RowError,
    Sample,
    Task,
    check_mask_size,
    load_image,
    load_mask,
    policy_frame,
    run_conversion,
    safe_id,
    stable_choice,
)

PROMPTS = (
    "the camouflaged object",
    "the object that is camouflaged in this scene",
    "the concealed object that blends into its surroundings",
    "the hidden object",
)
GT_THRESHOLD = 128
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class CODRelease:
    """Where one release keeps each split's images and masks, relative to its root folder."""

    folder: str  # the release's own top folder name
    splits: dict[str, tuple[str, str]]  # split -> (image dir, mask dir)


RELEASES: dict[str, CODRelease] = {
    "cod10k": CODRelease(
        "COD10K-v3", {"train": ("Train/Image", "Train/GT_Object"), "test": ("Test/Image", "Test/GT_Object")}
    ),
    "camo": CODRelease("CAMO-V.1.0-CVIU2019", {"train": ("Images/Train", "GT"), "test": ("Images/Test", "GT")}),
    "nc4k": CODRelease("NC4K", {"test": ("Imgs", "GT")}),
}


def _samples(
    name: str, split: str, image_path: Path, mask_dir: Path, include_noncam: bool, variants: bool
) -> Iterator[Sample]:
    stem = image_path.stem
    if name == "cod10k" and "-NonCAM-" in stem and not include_noncam:
        raise Excluded("non-camouflaged image (COD10K-NonCAM)")
    mask_path = mask_dir / f"{stem}.png"
    if not mask_path.is_file():
        raise RowError(f"missing mask {mask_dir.name}/{mask_path.name} for image {image_path.name}")
    image = load_image(image_path)
    mask = load_mask(mask_path, GT_THRESHOLD)
    check_mask_size(mask.shape, image, mask_path.name)
    if not mask.any():
        raise RowError(f"empty mask {mask_path.name}")
    prompt = PROMPTS[stable_choice(stem, len(PROMPTS))] if variants else PROMPTS[0]
    yield Sample(sample_id=safe_id(name, split, stem), image=image, mask=mask, expression=prompt)


def _orphan_mask(mask_path: Path) -> Iterator[Sample]:
    raise RowError(f"mask {mask_path.name} has no image")


def _split_tasks(
    name: str, split: str, release: CODRelease, image_dir: Path, mask_dir: Path, include_noncam: bool, variants: bool
) -> list[Task]:
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    tasks = [Task(p, p.stem, lambda p=p: _samples(name, split, p, mask_dir, include_noncam, variants)) for p in images]
    mask_rel = release.splits[split][1]
    if sum(m == mask_rel for _, m in release.splits.values()) == 1:
        # this split's own mask folder (CAMO shares one between splits): a mask without image is a broken release
        stems = {p.stem for p in images}
        tasks += [
            Task(m, m.stem, lambda m=m: _orphan_mask(m)) for m in sorted(mask_dir.glob("*.png")) if m.stem not in stems
        ]
    return tasks


def _release_root(src: Path, release: CODRelease) -> Path:
    if (src / release.folder).is_dir():
        return src / release.folder
    return src


def convert_cod(
    src: Path,
    out: Path,
    *,
    name: str,
    splits: list[str] | None = None,
    include_noncam: bool = False,
    prompt_variants: bool | None = None,
    coords: str = "pixels",
    factor: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert one COD release (``name``: cod10k / camo / nc4k) to ``<out>/<split>.parquet``.

    ``splits``: subset of the release's splits (default: all present). ``prompt_variants``: vary the
    prompt per image (None: on the train split only, so test prompts match the published protocol).
    ``coords`` / ``factor`` / ``min_pixels`` / ``max_pixels``: the policy's frame the rows record
    (:func:`verl_grto.data.convert.base.policy_frame`; default Qwen2.5-VL's, ``coords=norm1000`` for Qwen3-VL).
    """
    if name not in RELEASES:
        raise ValueError(f"unknown COD release {name!r}; one of {sorted(RELEASES)}")
    release = RELEASES[name]
    root = _release_root(Path(src), release)
    present = {
        s: (root / i, root / m) for s, (i, m) in release.splits.items() if (root / i).is_dir() and (root / m).is_dir()
    }
    wanted = list(splits) if splits else list(present)
    missing = [s for s in wanted if s not in present]
    if not present or missing:
        layout = ", ".join(f"{s}: {i} + {m}" for s, (i, m) in release.splits.items())
        raise FileNotFoundError(
            f"{name}: split(s) {missing or list(release.splits)} not found under {root}; expected {layout}"
        )
    tasks: dict[str, list[Task]] = {}
    for split in wanted:
        tasks[split] = _split_tasks(
            name,
            split,
            release,
            *present[split],
            include_noncam,
            (split == "train") if prompt_variants is None else prompt_variants,
        )
    return run_conversion(
        name, name, tasks, Path(out), progress=progress, frame=policy_frame(coords, factor, min_pixels, max_pixels)
    )
