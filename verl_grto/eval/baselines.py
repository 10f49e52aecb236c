"""Trivial predictors that every reported score stands beside.

* **box fill**: the ground-truth box(es) filled, i.e. a tool that answered the prompt box with the
  box itself. It tells how much of a score the mask adds over a perfect box.
* **random object box**: the box of an object drawn at random (uniformly, the referred one included)
  among the annotated objects of the image, filled. It is chance-level grounding with perfect boxes;
  only defined where rows carry the image's objects (``extra_info["object_boxes"]``, RefCOCO*),
  skipped elsewhere. The draw is seeded by the sample id, so reruns give the same number.

Both take the row's ground truth and ``extra_info``, so they run without images or a policy.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np

from verl_grto.data.masks import fill_boxes
from verl_grto.data.schema import GroundTruth

BOX_FILL = "box_fill"
RANDOM_OBJECT_BOX = "random_object_box"


def box_fill(gt: GroundTruth, extra: dict[str, Any]) -> np.ndarray:
    """The ground-truth boxes, filled."""
    return fill_boxes(gt.boxes, *gt.image_size)


def object_boxes(extra: dict[str, Any]) -> list[list[float]] | None:
    """The image's object boxes from ``extra_info``, or None where the dataset has none."""
    raw = extra.get("object_boxes")
    if raw is None or (isinstance(raw, str) and not raw):
        return None
    return json.loads(raw) if isinstance(raw, str) else [list(b) for b in raw]


def random_object_box(gt: GroundTruth, extra: dict[str, Any], seed: int = 0) -> np.ndarray:
    """One of the image's object boxes, drawn with a generator seeded by (sample id, seed), filled.

    An image without objects gives an empty mask.
    """
    boxes = object_boxes(extra)
    if boxes is None:
        raise ValueError(f"sample {extra.get('sample_id')} has no object_boxes")
    if not boxes:
        return np.zeros(gt.image_size, dtype=bool)
    rng = np.random.default_rng([zlib.crc32(str(extra["sample_id"]).encode("utf-8")), seed])
    return fill_boxes([boxes[int(rng.integers(len(boxes)))]], *gt.image_size)
