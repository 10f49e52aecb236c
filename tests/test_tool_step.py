"""The tool step shared by GRTO and BTO (verl_grto/algorithm/tool_step.py): grouping by image into
ToolBatches, the weights with the box filter, and the IoU of the tool's masks; and that BTO's weights
are the same function's as GRTO's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from verl_grto.algorithm.bto.buffer import BufferRecord, prompts_to_json
from verl_grto.algorithm.bto.train import rollout_weights
from verl_grto.algorithm.tool_step import (
    ImageGroup,
    group_by_image,
    in_rollout_order,
    mean_overlap_iou,
    overlap_ious,
    rollout_rows,
    shard_by_image,
    tool_batch,
    tool_step_weights,
    tool_target,
)
from verl_grto.data.masks import encode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.reward.answer import ToolPrompt
from verl_grto.reward.mask_iou import count_overlap
from verl_grto.tool.engine import ToolTarget

# rollouts of three images, interleaved as a batch of verl's may hold them
SIDS = ["b", "a", "b", "c", "a", "b"]


def test_rollouts_are_grouped_by_image_in_order_of_first_appearance():
    assert group_by_image(SIDS) == [ImageGroup("b", (0, 2, 5)), ImageGroup("a", (1, 4)), ImageGroup("c", (3,))]
    # left-out rollouts are not in any group; an image with none kept has no group at all
    keep = [True, False, False, False, True, True]
    assert group_by_image(SIDS, keep) == [ImageGroup("b", (0, 5)), ImageGroup("a", (4,))]


def test_images_go_round_robin_to_ranks_and_equal_shards_cut_the_remainder():
    groups = group_by_image(SIDS)
    shards = shard_by_image(groups, 2)
    assert [[g.image_key for g in shard] for shard in shards] == [["b", "c"], ["a"]]
    assert sorted(i for shard in shards for i in rollout_rows(shard)) == list(range(len(SIDS)))  # each once
    # BTO: every rank the same number of images (so the same number of updates)
    assert [[g.image_key for g in shard] for shard in shard_by_image(groups, 2, equal=True)] == [["b"], ["a"]]
    assert shard_by_image(groups[:1], 3) == [[groups[0]], [], []]  # GRTO: a rank may get no image
    with pytest.raises(ValueError, match="world"):
        shard_by_image(groups, 0)


def test_tool_batch_lays_out_each_images_rollouts_with_its_image_and_ground_truth():
    groups = group_by_image(SIDS)
    prompts = [[ToolPrompt(box=(float(i), 0.0, float(i) + 4, 4.0))] for i in range(len(SIDS))]
    # two dataset rows show image "b" (RefCOCO: two sentences); rollouts 0 and 5 answer row "b1", 2 row "b2"
    row_of = ["b1", "a", "b2", "c", "a", "b1"]
    targets = {r: ToolTarget(np.full((2, 2), r == "a")) for r in set(row_of)}
    images = [f"img-{g.image_key}" for g in groups]
    batch = tool_batch(groups, prompts.__getitem__, lambda i: (row_of[i], targets[row_of[i]]), images)
    rows = rollout_rows(groups)
    assert rows == [0, 2, 5, 1, 4, 3]
    assert batch.image_keys == ["b", "a", "c"] and batch.images == images
    assert [batch.image_keys[j] for j in batch.image_index] == [SIDS[i] for i in rows]
    assert batch.prompts == [prompts[i] for i in rows]
    # one target per dataset row, sent once, shared by that row's rollouts
    assert len(batch.targets) == 4
    assert all(batch.target(k) is targets[row_of[i]] for k, i in enumerate(rows))
    prediction_only = tool_batch(groups, prompts.__getitem__)
    assert prediction_only.targets is None and prediction_only.images == [None] * 3  # the engine reads them
    with pytest.raises(ValueError, match="images"):
        tool_batch(groups, prompts.__getitem__, images=images[:2])


def test_tool_target_carries_the_ground_truths_rle_and_ignore_region_undecoded():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    gt = GroundTruth(encode_rle(mask), [[1, 1, 3, 3]], (4, 4), ignore_rle=encode_rle(~mask))
    target = tool_target(gt)
    assert target.mask == gt.mask_rle and target.ignore == gt.ignore_rle  # RLE dicts: never decoded on the driver


def test_batch_outputs_come_back_in_rollout_order():
    shards = shard_by_image(group_by_image(SIDS), 2)
    rows = [rollout_rows(s) for s in shards]
    outputs = [[f"out{i}" for i in r] for r in rows]  # what each rank returns, in its batch's order
    assert in_rollout_order(len(SIDS), rows, outputs) == [f"out{i}" for i in range(len(SIDS))]
    assert in_rollout_order(3, [[2]], [["x"]]) == [None, None, "x"]


GT = (10.0, 10.0, 50.0, 50.0)
HIT, MISS = ToolPrompt(box=GT), ToolPrompt(box=(80.0, 80.0, 90.0, 90.0))


def test_weights_zero_unparseable_rollouts_and_with_min_box_iou_the_boxes_that_miss():
    prompts = [[HIT], [MISS], [], [ToolPrompt(points=((20.0, 20.0),), labels=(1,))], [MISS, HIT]]
    parse_ok = [True, True, False, True, True]
    gt_boxes = [[GT]] * 5
    assert tool_step_weights("uniform", prompts, gt_boxes, parse_ok).tolist() == [1, 1, 0, 1, 1]
    # the filter: a box that misses, or no box at all, carries no tool loss; the best box counts
    assert tool_step_weights("uniform", prompts, gt_boxes, parse_ok, min_box_iou=0.5).tolist() == [1, 0, 0, 0, 1]
    adv = np.array([2.0, -1.0, 0.0, 1.0, -2.0])
    w = tool_step_weights(
        "advantage", prompts, gt_boxes, parse_ok, min_box_iou=0.5, advantages=adv, group_ids=["g"] * 5
    )
    assert w.tolist() == pytest.approx([5 * 2 / 3, 0, 0, 0, 0])  # n_g max(A,0) / sum max(A,0), then filtered
    with pytest.raises(ValueError, match="needs advantages"):
        tool_step_weights("advantage", prompts, gt_boxes, parse_ok)


def test_bto_weights_are_the_shared_step_weights():
    """BTO's rollout_weights and GRTO's trainer both go through tool_step_weights: the same answers give
    the same weights, the box filter included."""
    gt = GroundTruth(
        image_size=(64, 64),
        mask_rle=encode_rle(np.zeros((64, 64), dtype=bool)),
        boxes=[list(GT)],
    )

    def record(k: int, objects: list[ToolPrompt], ok: bool) -> BufferRecord:
        return BufferRecord("s", "s", k, "", prompts_to_json(objects), ok, "" if ok else "no", [], [], gt.to_json())

    answers = [([HIT], True), ([MISS], True), ([], False)]
    records = [record(k, o, ok) for k, (o, ok) in enumerate(answers)]
    for tau in (0.0, 0.5):
        shared = tool_step_weights(
            "uniform", [o for o, _ in answers], [[GT]] * 3, [ok for _, ok in answers], min_box_iou=tau
        )
        assert rollout_weights(records, min_box_iou=tau).tolist() == shared.tolist()
    assert rollout_weights(records, min_box_iou=0.5).tolist() == [1, 0, 0]


def test_overlap_iou_follows_the_empty_mask_rule():
    gt = np.zeros((4, 4), dtype=bool)
    gt[:2, :2] = True
    half = np.zeros_like(gt)
    half[:2, :1] = True
    empty = np.zeros_like(gt)
    inter, union = (
        np.array(v)
        for v in zip(
            *(count_overlap(p, g) for p, g in [(gt, gt), (half, gt), (empty, gt), (empty, empty)]), strict=True
        )
    )
    # a rollout sent with no prompt was scored as the empty mask: the missing-prediction rule
    assert overlap_ious(inter, union).tolist() == [1.0, 0.5, 0.0, 1.0]
    # GRTO counts the parseable rollouts only
    assert mean_overlap_iou(inter[:3], union[:3], include=[True, True, False]) == pytest.approx(0.75)
    assert mean_overlap_iou(inter[:3], union[:3]) == pytest.approx(0.5)
    assert math.isnan(mean_overlap_iou(inter[:1], union[:1], include=[False]))
    with pytest.raises(ValueError, match="include"):
        mean_overlap_iou(inter[:1], union[:1], include=[True, True])
