"""Segmentation metrics as the referring / reasoning segmentation and COD communities report them.

gIoU and cIoU
-------------
* gIoU = mean over samples of the per-sample IoU.
* cIoU = (sum of intersections) / (sum of unions) over the split, so large objects weigh more.

(Neither is the box "generalized IoU".)

**The empty-mask rule** (one rule, everywhere in this project; LISA's, not Seg-Zero's) is defined
where the rewards can share it, :mod:`verl_grto.reward.mask_iou`: a union of 0 scores IoU 1.0, a
missing prediction is an empty one, ignore pixels count in neither sum. If every union of a split
is 0, cIoU is 1.0 by the same rule.

COD suite
---------
Through pysodmetrics (``py_sod_metrics``), as the COD papers report: S-measure (alpha 0.5),
E-measure (adaptive, and mean / max of the curve over 256 thresholds), weighted F-measure (beta 1)
and MAE. Predictions go in as uint8 0-255 (a binary mask becomes 0/255; a soft map keeps its grey
levels); ground truth as uint8 0/255, which pysodmetrics thresholds at 128. A missing prediction is
an all-zero map (rule 2 of the empty-mask rule).

A prediction pixel is foreground for gIoU/cIoU when its value is at least 128
(:func:`~verl_grto.reward.mask_iou.binarize`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

# re-exported: evaluation code and tests read the rule from here too
from verl_grto.reward.mask_iou import FOREGROUND_MIN, binarize, intersection_union, sample_iou

if TYPE_CHECKING:
    from verl_grto.data.schema import GroundTruth
    from verl_grto.reward.answer import ParsedAnswer

__all__ = [
    "FOREGROUND_MIN",
    "CODAccumulator",
    "IoUAccumulator",
    "box_area_ratio",
    "binarize",
    "intersection_union",
    "sample_iou",
    "to_uint8",
]


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """A prediction as the uint8 0-255 map the COD metrics read: bool -> 0/255, uint8 unchanged."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8:
        raise TypeError(f"prediction maps must be bool or uint8 0-255, got {mask.dtype}")
    return mask


class IoUAccumulator:
    """Accumulates gIoU and cIoU over a split."""

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.intersection = 0
        self.union = 0

    def add(self, pred: np.ndarray | None, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        """Score one sample (``pred`` None = missing prediction); returns its IoU."""
        return self.add_counts(*intersection_union(pred, gt, ignore))

    def add_counts(self, inter: int, union: int) -> float:
        """Score one sample from its pixel counts (as the tool's workers send them,
        :func:`~verl_grto.reward.mask_iou.count_overlap`); returns its IoU."""
        self.intersection += inter
        self.union += union
        iou = sample_iou(inter, union)
        self.ious.append(iou)
        return iou

    def results(self) -> dict[str, float]:
        if not self.ious:
            raise ValueError("no sample was scored")
        return {
            "gIoU": float(np.mean(self.ious)),
            "cIoU": sample_iou(self.intersection, self.union),
            "n": len(self.ious),
        }


class CODAccumulator:
    """Accumulates the COD suite (pysodmetrics) over a split."""

    def __init__(self) -> None:
        # imported here: py_sod_metrics pulls in OpenCV, scikit-image and SciPy (27 MiB per process), and
        # this module is imported by every process of a run (the trainer's validation uses gIoU / cIoU only)
        import py_sod_metrics

        self._sm = py_sod_metrics.Smeasure(alpha=0.5)
        self._em = py_sod_metrics.Emeasure()
        self._wfm = py_sod_metrics.WeightedFmeasure(beta=1)
        self._mae = py_sod_metrics.MAE()
        self.n = 0

    def add(self, pred: np.ndarray | None, gt: np.ndarray) -> None:
        """Score one sample: ``pred`` bool or uint8 0-255 (None = missing -> all zero), ``gt`` bool."""
        gt_u8 = to_uint8(np.asarray(gt, dtype=bool))
        pred_u8 = np.zeros_like(gt_u8) if pred is None else to_uint8(pred)
        if pred_u8.shape != gt_u8.shape:
            raise ValueError(f"prediction shape {pred_u8.shape} differs from ground truth {gt_u8.shape}")
        for metric in (self._sm, self._em, self._wfm, self._mae):
            metric.step(pred=pred_u8, gt=gt_u8)
        self.n += 1

    def results(self) -> dict[str, float]:
        if not self.n:
            raise ValueError("no sample was scored")
        em = self._em.get_results()["em"]
        return {
            "S_measure": float(self._sm.get_results()["sm"]),
            "E_measure_adaptive": float(em["adp"]),
            "E_measure_mean": float(np.mean(em["curve"])),
            "E_measure_max": float(np.max(em["curve"])),
            "weighted_F": float(self._wfm.get_results()["wfm"]),
            "MAE": float(self._mae.get_results()["mae"]),
            "n": self.n,
        }


def box_area_ratio(parsed: ParsedAnswer, gt: GroundTruth) -> float | None:
    """Area of the answer's boxes (summed) over the area of the box around the referred objects' boxes;
    None when the answer has no box or the ground truth none. Tells a policy whose boxes grow looser under
    RL (its box IoU falls while the tool's mask IoU holds) from one that loses the object."""
    boxes = [o.box for o in parsed.objects if o.box is not None] if parsed.ok else []
    if not gt.boxes or not boxes:
        return None
    gt_box = [
        min(b[0] for b in gt.boxes),
        min(b[1] for b in gt.boxes),
        max(b[2] for b in gt.boxes),
        max(b[3] for b in gt.boxes),
    ]
    area = sum(max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) for b in boxes)
    return area / ((gt_box[2] - gt_box[0]) * (gt_box[3] - gt_box[1]))
