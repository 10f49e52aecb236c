"""Score a split's predictions (and the trivial baselines) without needing a policy.

Predictions are ``<predictions_dir>/<sample_id>.png``: one grey PNG per parquet row, the size of the
row's image, 0/255 (a soft 0-255 map is allowed: the COD suite reads its grey levels, gIoU/cIoU
threshold it at 128). A row without its PNG, or with a PNG of the wrong size or unreadable, is
scored as an empty prediction (see :mod:`verl_grto.eval.metrics`) and counted in the report, never
silently dropped: dropping failures would flatter the score.

:func:`evaluate` is the seam for inference: give it a ``predictor(row) -> mask`` and it predicts
only the rows whose PNG is not there yet (so an interrupted run resumes), writes each PNG
atomically, then scores. A predictor that cannot parse the policy's answer should return an
all-zero mask (that is rule 2 of the empty-mask rule, made explicit). A predictor that also has
``predict_batch(rows) -> masks`` gets the pending rows ``batch_size`` at a time (batched policy
generation); ``limit`` evaluates the first rows of a split only (a smoke test of a checkpoint).
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from verl_grto.atomic import atomic_file
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.eval import baselines
from verl_grto.eval.metrics import CODAccumulator, IoUAccumulator, to_uint8

Suite = Literal["seg", "cod"]
#: A row as read from the parquet (prompt, images [{bytes, path}], reward_model, extra_info) -> HxW mask.
Predictor = Callable[[dict[str, Any]], np.ndarray]

PREDICTION = "prediction"
MAX_LISTED = 50


def prediction_path(predictions_dir: Path, sample_id: str) -> Path:
    """Where a sample's prediction lives; refuses ids that are not plain file names."""
    if not sample_id or "/" in sample_id or "\\" in sample_id or sample_id in (".", ".."):
        raise ValueError(f"sample id {sample_id!r} cannot be a file name")
    return Path(predictions_dir) / f"{sample_id}.png"


def read_prediction(path: Path, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """(uint8 HxW map, None), or (None, why it is unusable) for a missing / corrupt / wrong-size PNG."""
    if not path.is_file():
        return None, "missing"
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return None, f"unreadable: {exc}"
    if arr.shape != tuple(size):
        return None, f"size {arr.shape[0]}x{arr.shape[1]} differs from image {size[0]}x{size[1]} (HxW)"
    return arr, None


def write_prediction(path: Path, mask: np.ndarray) -> None:
    """Write a bool or uint8 mask as a grey PNG, atomically (a crash never leaves half a PNG to resume from)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(np.asarray(mask))).save(buf, format="PNG")
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _iter_rows(
    split_parquet: Path, columns: list[str] | None = None, batch_size: int = 16, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The split's rows in order; only the first ``limit`` when given."""
    pf = pq.ParquetFile(split_parquet)
    rows = (row for batch in pf.iter_batches(batch_size=batch_size, columns=columns) for row in batch.to_pylist())
    return itertools.islice(rows, limit)


def _num_rows(split_parquet: Path, limit: int | None = None) -> int:
    n = pq.ParquetFile(split_parquet).metadata.num_rows
    return n if limit is None else min(n, limit)


def sample_ids(split_parquet: Path, limit: int | None = None) -> list[str]:
    """The split's sample ids in row order (the first ``limit`` when given)."""
    return [
        r["extra_info"]["sample_id"]
        for r in _iter_rows(Path(split_parquet), columns=["extra_info"], batch_size=1024, limit=limit)
    ]


def suite_for(split_parquet: Path) -> Suite:
    """The suite a split is reported with: "cod" when every row comes from a COD release, else "seg"."""
    from verl_grto.data.convert.cod import RELEASES

    sources = set(pq.read_table(split_parquet, columns=["data_source"]).column("data_source").to_pylist())
    return "cod" if sources and sources <= set(RELEASES) else "seg"


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")


def run_predictions(
    split_parquet: Path,
    predictor: Predictor,
    predictions_dir: Path,
    progress: bool = True,
    *,
    batch_size: int = 1,
    limit: int | None = None,
) -> int:
    """Run ``predictor`` on every row whose PNG is not in ``predictions_dir`` yet; returns how many ran.

    Rows go ``batch_size`` at a time to ``predictor.predict_batch`` when it has one. A predictor's
    mask must have the row's image size (H, W); anything else is a bug in the predictor and raises
    ValueError (the PNGs written so far stay, so a rerun resumes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_limit(limit)
    predict_batch = getattr(predictor, "predict_batch", None)
    if predict_batch is None or batch_size == 1:

        def predict_batch(rows: list[dict[str, Any]]) -> list[np.ndarray]:
            return [predictor(row) for row in rows]

    predictions_dir = Path(predictions_dir)
    predictions_dir.mkdir(parents=True, exist_ok=True)
    done = {p.stem for p in predictions_dir.glob("*.png")}
    rows = _iter_rows(split_parquet, limit=limit)
    ran = 0
    with tqdm(total=_num_rows(split_parquet, limit), desc="predict", unit="row", disable=not progress) as bar:
        while chunk := list(itertools.islice(rows, batch_size)):
            pending = [row for row in chunk if row["extra_info"]["sample_id"] not in done]
            masks = predict_batch(pending) if pending else []
            if len(masks) != len(pending):
                raise ValueError(f"predictor returned {len(masks)} masks for {len(pending)} rows")
            for row, mask in zip(pending, masks, strict=True):
                sample_id = row["extra_info"]["sample_id"]
                gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
                mask = np.asarray(mask)
                if mask.shape != gt.image_size:
                    raise ValueError(f"predictor returned shape {mask.shape} for {sample_id}, expected {gt.image_size}")
                write_prediction(prediction_path(predictions_dir, sample_id), mask)
                ran += 1
            bar.update(len(chunk))
    return ran


class _Scorer:
    """One method's accumulators (seg always, COD when asked)."""

    def __init__(self, suite: Suite) -> None:
        self.iou = IoUAccumulator()
        self.cod = CODAccumulator() if suite == "cod" else None

    def add(self, pred: np.ndarray | None, gt: np.ndarray, ignore: np.ndarray | None) -> None:
        self.iou.add(pred, gt, ignore)
        if self.cod is not None:
            self.cod.add(pred, gt)

    def results(self) -> dict[str, float]:
        return {**self.iou.results(), **(self.cod.results() if self.cod is not None else {})}


def evaluate_predictions(
    split_parquet: Path,
    predictions_dir: Path,
    suite: Suite,
    report_path: Path,
    *,
    limit: int | None = None,
    sections: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``<predictions_dir>/<sample_id>.png`` against the split and its baselines; write the JSON report.

    Returns the report: ``{"split", "predictions_dir", "suite", "n", "limit", "missing", "invalid",
    "scores": {method: {gIoU, cIoU, n, [COD metrics]}}}`` where method is "prediction", "box_fill"
    and, where the rows carry the image's objects, "random_object_box"; ``sections`` (e.g. the policy's
    parse rate) are added to it as top-level entries. ``limit`` scores the first rows only.
    """
    if suite not in ("seg", "cod"):
        raise ValueError(f"suite must be 'seg' or 'cod', got {suite!r}")
    _check_limit(limit)
    split_parquet, predictions_dir = Path(split_parquet), Path(predictions_dir)
    rows = list(_iter_rows(split_parquet, columns=["reward_model", "extra_info"], batch_size=1024, limit=limit))
    if not rows:
        raise ValueError(f"{split_parquet} has no rows")
    with_objects = all(baselines.object_boxes(r["extra_info"]) is not None for r in rows)
    several = with_objects and any(len(baselines.object_boxes(r["extra_info"]) or []) > 1 for r in rows)
    methods: dict[str, Callable[[GroundTruth, dict[str, Any]], np.ndarray]] = {baselines.BOX_FILL: baselines.box_fill}
    if several:
        methods[baselines.RANDOM_OBJECT_BOX] = baselines.random_object_box
    scorers = {name: _Scorer(suite) for name in [PREDICTION, *methods]}
    missing: list[str] = []
    invalid: dict[str, str] = {}
    for row in tqdm(rows, desc="score", unit="row", disable=len(rows) < 100):
        extra = row["extra_info"]
        sample_id = extra["sample_id"]
        gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
        gt_mask = decode_rle(gt.mask_rle)
        ignore_rle = extra.get("ignore_mask")
        ignore = decode_rle(json.loads(ignore_rle)) if ignore_rle else None
        pred, problem = read_prediction(prediction_path(predictions_dir, sample_id), gt.image_size)
        if problem == "missing":
            missing.append(sample_id)
        elif problem is not None:
            invalid[sample_id] = problem
        scorers[PREDICTION].add(pred, gt_mask, ignore)
        for name, baseline in methods.items():
            scorers[name].add(baseline(gt, extra), gt_mask, ignore)
    report = {
        "split": str(split_parquet),
        "predictions_dir": str(predictions_dir),
        "suite": suite,
        "n": len(rows),
        "limit": limit,
        "empty_mask_rule": "union 0 -> IoU 1; missing/invalid prediction = empty prediction; ignore pixels excluded",
        "missing": len(missing),
        "missing_ids": missing[:MAX_LISTED],
        "invalid": len(invalid),
        "invalid_ids": dict(list(invalid.items())[:MAX_LISTED]),
        "scores": {name: s.results() for name, s in scorers.items()},
        **(sections or {}),
    }
    with atomic_file(Path(report_path)) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report


def evaluate(
    split_parquet: Path,
    predictor: Predictor | None,
    predictions_dir: Path,
    *,
    suite: Suite,
    report_path: Path,
    progress: bool = True,
    batch_size: int = 1,
    limit: int | None = None,
) -> dict[str, Any]:
    """Predict the rows not yet in ``predictions_dir`` (when a predictor is given), then score them."""
    if predictor is not None:
        run_predictions(
            split_parquet, predictor, predictions_dir, progress=progress, batch_size=batch_size, limit=limit
        )
    return evaluate_predictions(split_parquet, predictions_dir, suite, report_path, limit=limit)


_COLUMNS = {
    "seg": [("gIoU", "gIoU"), ("cIoU", "cIoU")],
    "cod": [
        ("gIoU", "gIoU"),
        ("cIoU", "cIoU"),
        ("S_measure", "S_a"),
        ("E_measure_adaptive", "E_adp"),
        ("E_measure_mean", "E_mean"),
        ("E_measure_max", "E_max"),
        ("weighted_F", "wF"),
        ("MAE", "MAE"),
    ],
}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one line per method (prediction first, then the baselines)."""
    cols = _COLUMNS[report["suite"]]
    header = f"{'method':<20}" + "".join(f"{label:>9}" for _, label in cols) + f"{'n':>8}"
    lines = [f"{report['split']} ({report['suite']}, {report['n']} rows)", header, "-" * len(header)]
    for name, scores in report["scores"].items():
        lines.append(f"{name:<20}" + "".join(f"{scores[key]:>9.4f}" for key, _ in cols) + f"{scores['n']:>8}")
    if report["missing"] or report["invalid"]:
        lines.append(f"scored as empty: {report['missing']} missing, {report['invalid']} invalid prediction(s)")
    return "\n".join(lines)
