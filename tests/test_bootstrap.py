"""BTO: the rollout buffer (build, save, reload, resume) and off-policy tool training on it.

The answers come from a fake ``generate_fn``: the referred object's ground-truth box, jittered, for
all but the last rollout of each group, which does not parse. It is a function of the row only, as
a per-sample-seeded sampler is, so resumed and uninterrupted builds can be compared exactly.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from verl_grto.algorithm.bto.buffer import BufferRecord, RolloutBuffer
from verl_grto.algorithm.bto.build import build_buffer, hf_generate_fn
from verl_grto.algorithm.bto.train import (
    BTORequest,
    epoch_order,
    latest_checkpoint,
    rollout_weights,
    train_tool_on_buffer,
)
from verl_grto.algorithm.tool_weights import importance_weights
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth
from verl_grto.data.synthetic import generate_split
from verl_grto.reward.answer import ToolPrompt, format_answer, parse_answer
from verl_grto.tool.cache import EmbeddingCache
from verl_grto.tool.engine import ToolEngine, ToolEngineConfig
from verl_grto.tool.model import SegmentationTool
from verl_grto.tool.worker import ToolWorkerMixin

torch.set_num_threads(1)

G = 3
JUNK = "<answer>the red one</answer>"


def _rows(split: str, n: int) -> list[dict[str, Any]]:
    return [r.to_record() for r in generate_split(n, 0, "plain", split, size=112, max_objects=2, min_objects=1)]


def _sid(row: dict[str, Any]) -> str:
    return row["extra_info"]["sample_id"]


def fake_generate(rows: list[dict[str, Any]], n: int) -> list[list[tuple]]:
    """G-1 jittered ground-truth boxes and one unparseable answer per row, with made-up log-probs and tokens."""
    out = []
    for row in rows:
        gt = GroundTruth.from_json(row["reward_model"]["ground_truth"])
        h, w = gt.image_size
        box = np.array(gt.boxes[0])
        answers = []
        for k in range(n):
            rng = np.random.default_rng([zlib.crc32(_sid(row).encode()), k])
            length = 4 + k
            if k == n - 1:
                answers.append((JUNK, [-1.0] * length, list(range(length))))
                continue
            size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            jittered = np.clip(np.round(box + rng.uniform(-0.1, 0.1, 4) * size), 0, [w, h, w, h])
            if jittered[2] <= jittered[0] or jittered[3] <= jittered[1]:
                jittered = box
            text = format_answer([ToolPrompt(box=tuple(float(v) for v in jittered))])
            answers.append((text, rng.uniform(-2.0, 0.0, length).tolist(), list(range(length))))
        out.append(answers)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bto_data")
    train, val = _rows("train", 6), _rows("val", 6)
    write_rows_atomic(train, root / "train.parquet")
    write_rows_atomic(val, root / "val.parquet")
    return {
        "root": root,
        "train": train,
        "val": val,
        "store": SampleImageStore([root / "train.parquet"]),
        "val_store": SampleImageStore([root / "val.parquet"]),
        "buffer": build_buffer(train, fake_generate, G, root / "buffer", reference_policy="fake", progress=False),
        "heldout": build_buffer(val, fake_generate, G, root / "heldout", reference_policy="fake", progress=False),
    }


@pytest.fixture(scope="module")
def base_tool(tiny_assets) -> SegmentationTool:
    return SegmentationTool.from_pretrained(str(tiny_assets.tool))


def fresh_engine(base_tool: SegmentationTool, lr: float = 3e-3) -> ToolEngine:
    """A copy of the tiny test tool, with a learning rate that shows learning in a few dozen steps."""
    return ToolEngine(copy.deepcopy(base_tool), ToolEngineConfig(lr=lr, weight_decay=0.0, max_grad_norm=0.0))


# ---- the buffer ---------------------------------------------------------------------------------


def test_build_saves_and_reloads_exactly(data, tmp_path):
    rows = data["train"][:5]
    buffer = build_buffer(
        rows,
        fake_generate,
        G,
        tmp_path,
        reference_policy="/p/ref",
        seed=7,
        sampling={"temperature": 1.0},
        chunk_size=2,
        save_every=2,
        progress=False,
    )
    assert len(buffer) == 5 * G and buffer.done_sample_ids() == {_sid(r) for r in rows}
    assert not list((tmp_path / "parts").glob("*.parquet"))  # consolidated into rollouts.parquet

    loaded = RolloutBuffer.load(tmp_path)
    assert loaded.records == buffer.records and loaded.meta == buffer.meta
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["reference_policy"], meta["group_size"], meta["seed"]) == ("/p/ref", G, 7)
    assert meta["created_at"] and meta["sampling"] == {"temperature": 1.0}

    frame = pd.read_parquet(tmp_path / "rollouts.parquet")
    assert len(frame) == 5 * G and list(frame.columns)[:4] == ["sample_id", "uid", "rollout_index", "answer"]
    assert list(frame["logprobs"].iloc[0]) == buffer.records[0].logprobs

    first, junk = buffer.records[0], buffer.records[G - 1]
    image_size = GroundTruth.from_json(first.ground_truth).image_size
    assert first.parse_ok and first.objects() == list(parse_answer(first.answer, image_size).objects)
    assert json.loads(first.prompts)[0]["box"] == list(first.objects()[0].box)
    assert not junk.parse_ok and junk.parse_reason.startswith("answer JSON") and junk.objects() == []


def test_build_resumes_after_a_crash(data, tmp_path):
    rows = data["train"]
    complete = build_buffer(rows, fake_generate, G, tmp_path / "whole", reference_policy="fake", progress=False)

    calls: list[str] = []

    def crashing(chunk: list[dict[str, Any]], n: int) -> list[list[tuple]]:
        if len(calls) >= 3:
            raise RuntimeError("rollout server died")
        calls.extend(_sid(r) for r in chunk)
        return fake_generate(chunk, n)

    with pytest.raises(RuntimeError, match="server died"):
        build_buffer(
            rows,
            crashing,
            G,
            tmp_path / "resumed",
            reference_policy="fake",
            chunk_size=1,
            save_every=100,
            progress=False,
        )
    kept = RolloutBuffer.load(tmp_path / "resumed")  # parts written on the way out
    assert kept.done_sample_ids() == {_sid(r) for r in rows[:3]} and len(kept) == 3 * G

    def recording(chunk: list[dict[str, Any]], n: int) -> list[list[tuple]]:
        calls.extend(_sid(r) for r in chunk)
        return fake_generate(chunk, n)

    calls.clear()
    resumed = build_buffer(
        rows, recording, G, tmp_path / "resumed", reference_policy="fake", chunk_size=2, progress=False
    )
    assert calls == [_sid(r) for r in rows[3:]]
    assert resumed.records == complete.records
    assert RolloutBuffer.load(tmp_path / "resumed").records == complete.records

    with pytest.raises(ValueError, match="another source"):
        build_buffer(rows, fake_generate, G + 1, tmp_path / "resumed", reference_policy="fake", progress=False)


def test_duplicate_rollouts_are_refused(data):
    buffer = RolloutBuffer(data["buffer"].meta, data["buffer"].records[:2])
    with pytest.raises(ValueError, match="already in the buffer"):
        buffer.append(data["buffer"].records[:1])


# ---- weights ------------------------------------------------------------------------------------


def test_importance_weights_are_used_when_asked(data, base_tool):
    buffer: RolloutBuffer = data["buffer"]
    doubled = buffer.records[1]  # a parseable rollout
    bonus = math.log(2.0) / len(doubled.logprobs)  # its sequence probability doubles under the target

    def target(records: list[BufferRecord]) -> list[list[float]]:
        assert all(r.parse_ok for r in records)  # unparseable answers need no target log-probs
        return [[v + bonus for v in r.logprobs] if r.key == doubled.key else r.logprobs for r in records]

    expected = [
        0.0
        if not r.parse_ok
        else float(importance_weights([np.asarray(target([r])[0])], [np.asarray(r.logprobs)], 4.0)[0])
        for r in buffer.records
    ]
    weights = rollout_weights(buffer.records, "importance", target, importance_clip=4.0)
    np.testing.assert_allclose(weights, expected)
    assert weights[1] == pytest.approx(2.0 ** (1.0 / len(doubled.logprobs)))
    assert sorted(set(np.round(weights, 12))) == [0.0, 1.0, round(weights[1], 12)]

    # ... and they are what train_tool_on_buffer hands to the engine, batch by batch
    engine = fresh_engine(base_tool)
    seen: list[tuple[list[str], list[float]]] = []
    update = engine.update

    def spy(batch, batch_weights=None):
        seen.append((list(batch.image_keys), list(batch_weights)))
        return update(batch, batch_weights)

    engine.update = spy
    train_tool_on_buffer(
        engine,
        buffer,
        data["store"],
        epochs=1,
        batch_size=2,
        weighting="importance",
        target_logprob_fn=target,
        importance_clip=4.0,
        progress=False,
    )
    usable = {
        data["store"].key(sid): [i for i, r in enumerate(buffer.records) if r.sample_id == sid and r.parse_ok]
        for sid in buffer.done_sample_ids()
    }
    for image_keys, batch_weights in seen:
        assert batch_weights == [weights[i] for key in image_keys for i in usable[key]]
    assert sum(len(w) for _, w in seen) == sum(r.parse_ok for r in buffer.records)

    with pytest.raises(ValueError, match="needs target_logprob_fn"):
        rollout_weights(buffer.records, "importance")
    with pytest.raises(ValueError, match="importance weighting only"):
        rollout_weights(buffer.records, "uniform", target)
    with pytest.raises(ValueError, match=r"BTO weighting must be one of \['uniform', 'importance'\], got 'advantage'"):
        rollout_weights(buffer.records, "advantage")
    with pytest.raises(ValueError, match="unknown tool-loss weighting 'greedy'; known: uniform"):
        rollout_weights(buffer.records, "greedy")


# ---- training -----------------------------------------------------------------------------------


EPOCHS_TO_LEARN = 24


def test_tool_learns_from_the_buffer_with_each_image_encoded_once(data, base_tool):
    """72 updates (24 epochs x 3 batches of 2 images x 2 usable rollouts) from the random tiny tool.

    Measured on the non-convex shapes: epoch loss 1.59 -> 1.02 (flat for the first 4 epochs), held-out
    (validation images, the same kind of prompts) gIoU 0.03 -> 0.12, ~1.1 s.
    """
    torch.manual_seed(0)
    engine = fresh_engine(base_tool)
    report = train_tool_on_buffer(
        engine,
        data["buffer"],
        data["store"],
        epochs=EPOCHS_TO_LEARN,
        batch_size=2,
        heldout=data["heldout"].records,
        heldout_store=data["val_store"],
        progress=False,
    )
    losses = report.epoch_losses
    print(
        f"losses {[round(v, 3) for v in losses]}, IoU {report.iou_before:.3f} -> {report.iou_after:.3f}, {report.wall_s:.1f} s"
    )
    assert len(losses) == EPOCHS_TO_LEARN and losses[-1] < 0.7 * losses[0]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert report.iou_after > report.iou_before + 0.05
    assert (report.rollouts, report.usable_rollouts, report.batches, report.skipped_batches) == (
        6 * G,
        6 * (G - 1),
        3 * EPOCHS_TO_LEARN,
        0,
    )
    # the encoder ran once per image for the whole stage, not once per epoch: one call per first-epoch batch
    assert report.distinct_images == 6 and report.images_encoded == 6 and report.encoder_calls == 3
    assert report.cache_evictions == 0 and report.heldout_rollouts == 6 * G


def _assert_states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pid, slot in a["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][key])), (pid, key)
    assert a["step"] == b["step"]


def test_resume_inside_the_stage_is_bit_exact(data, base_tool, tmp_path):
    """3 epochs x 3 batches, checkpoints every 2 batches and at epoch ends; a crash at the 6th update
    (epoch 1, batch 2) resumes from batch 4 and ends with the same weights, optimiser state and losses."""
    settings = {"epochs": 3, "batch_size": 2, "checkpoint_every": 2, "progress": False}
    torch.manual_seed(0)
    whole_engine = fresh_engine(base_tool)
    whole = train_tool_on_buffer(
        whole_engine, data["buffer"], data["store"], checkpoint_dir=tmp_path / "whole", **settings
    )
    assert whole.tool_dir is not None and Path(whole.tool_dir).parent == latest_checkpoint(tmp_path / "whole")

    torch.manual_seed(0)
    crashing = fresh_engine(base_tool)
    update, count = crashing.update, [0]

    def dies_at_sixth(batch, weights=None):
        count[0] += 1
        if count[0] == 6:
            raise KeyboardInterrupt
        return update(batch, weights)

    crashing.update = dies_at_sixth
    with pytest.raises(KeyboardInterrupt):
        train_tool_on_buffer(crashing, data["buffer"], data["store"], checkpoint_dir=tmp_path / "resumed", **settings)
    assert latest_checkpoint(tmp_path / "resumed").name == "bto-00000004"

    torch.manual_seed(123)  # a new process: other RNG state, a fresh tool; the checkpoint restores both
    restarted = fresh_engine(base_tool)
    resumed = train_tool_on_buffer(
        restarted, data["buffer"], data["store"], checkpoint_dir=tmp_path / "resumed", **settings
    )
    assert resumed.resumed_from_batch == 4 and resumed.batches == whole.batches == 9
    assert resumed.epoch_losses == whole.epoch_losses
    _assert_states_equal(restarted.state_dict(), whole_engine.state_dict())
    assert len(list((tmp_path / "resumed").glob("bto-*"))) == 1  # older checkpoints pruned

    with pytest.raises(ValueError, match="other settings"):
        train_tool_on_buffer(
            fresh_engine(base_tool),
            data["buffer"],
            data["store"],
            checkpoint_dir=tmp_path / "resumed",
            **{**settings, "batch_size": 3},
        )


# ---- the HF generator ---------------------------------------------------------------------------


def test_hf_generate_fn_samples_g_answers_with_logprobs(data, tiny_assets, tmp_path):
    generate = hf_generate_fn(tiny_assets.policy, max_new_tokens=8, seed=0)
    rows = data["train"][:2]
    out = generate(rows, 2)
    assert len(out) == 2 and all(len(answers) == 2 for answers in out)
    for answers in out:
        for rollout in answers:
            assert isinstance(rollout.text, str) and 1 <= len(rollout.token_ids) <= 8
            assert len(rollout.logprobs) == len(rollout.token_ids)
            assert all(math.isfinite(v) and v <= 0 for v in rollout.logprobs)
    assert generate(rows[1:], 2) == out[1:]  # seeded per row: a row's answers do not depend on the rows before

    buffer = build_buffer(rows, generate, 2, tmp_path, reference_policy=str(tiny_assets.policy), progress=False)
    assert len(buffer) == 4 and all(r.parse_ok or r.parse_reason for r in buffer.records)
    assert [r.response_ids for r in buffer.records[2:]] == [list(r.token_ids) for r in out[1]]


def test_ranks_train_on_disjoint_equal_shares_of_the_images(data, base_tool):
    """Two data-parallel ranks: disjoint image sets of equal size (6 images -> 3 each), so every rank
    runs the same number of updates (the engine's all-reduce needs them in step)."""
    reports = [
        train_tool_on_buffer(
            fresh_engine(base_tool),
            data["buffer"],
            data["store"],
            epochs=1,
            batch_size=2,
            shard=(rank, 2),
            progress=False,
        )
        for rank in range(2)
    ]
    assert [r.distinct_images for r in reports] == [3, 3]
    assert [r.batches for r in reports] == [2, 2]
    with pytest.raises(ValueError, match="rank"):
        train_tool_on_buffer(fresh_engine(base_tool), data["buffer"], data["store"], 1, 2, shard=(2, 2))


def test_min_box_iou_trains_only_on_prompts_that_point_at_the_object(data):
    from verl_grto.reward.geometry import box_iou

    records = data["buffer"].records

    def best(r: BufferRecord) -> float:
        gt = GroundTruth.from_json(r.ground_truth).boxes
        return max(box_iou(o.box, g) for o in r.objects() for g in gt)

    threshold = float(np.median([best(r) for r in records if r.parse_ok]))
    weights = rollout_weights(records, min_box_iou=threshold)
    assert weights.tolist() == [1.0 if r.parse_ok and best(r) >= threshold else 0.0 for r in records]
    assert 0 < (weights > 0).sum() < sum(r.parse_ok for r in records)  # the threshold splits the buffer
    assert rollout_weights(records).tolist() == [float(r.parse_ok) for r in records]  # off by default


def test_bto_request_runs_in_the_tool_worker_as_a_direct_call_does(data, base_tool, tmp_path):
    """The tool's worker runs the BTO job it is sent (``tool_run``; the loop lives in the algorithm
    layer, above the worker): same losses and weights as :func:`train_tool_on_buffer` called directly,
    checkpoints under ``rank<rank>``, and the job survives pickling (it travels through Ray)."""
    settings = {"epochs": 2, "batch_size": 2, "checkpoint_every": 2, "seed": 3}
    torch.manual_seed(0)
    direct_engine = fresh_engine(base_tool)
    direct = train_tool_on_buffer(
        direct_engine, data["buffer"], data["store"], checkpoint_dir=tmp_path / "direct", progress=False, **settings
    )

    request = BTORequest(
        buffer_dir=str(data["root"] / "buffer"),
        image_files=[str(data["root"] / "train.parquet")],
        checkpoint_dir=str(tmp_path / "job"),
        progress=False,
        **settings,
    )
    assert pickle.loads(pickle.dumps(request)) == request
    worker = ToolWorkerMixin()
    torch.manual_seed(0)
    worker.tool_engine = fresh_engine(base_tool)
    report = worker.tool_run(request)

    assert report["epoch_losses"] == direct.epoch_losses and report["batches"] == direct.batches
    assert Path(report["tool_dir"]).parent == latest_checkpoint(tmp_path / "job" / "rank0")
    _assert_states_equal(worker.tool_engine.state_dict(), direct_engine.state_dict())


# ---- a buffer larger than the cache -------------------------------------------------------------


def test_epoch_order_starts_with_what_the_cache_still_holds():
    n, window = 10, 4
    orders = [epoch_order(n, 3, e, window) for e in range(4)]
    assert all(sorted(o.tolist()) == list(range(n)) for o in orders)  # every image once per epoch
    for previous, current in zip(orders, orders[1:], strict=False):
        assert set(current[:window].tolist()) == set(previous[-window:].tolist())  # the cached ones first
    assert orders[2].tolist() == epoch_order(n, 3, 2, window).tolist()  # a pure function: resumable
    # when the cache holds everything, each epoch is its own fresh permutation (the order before this rule)
    assert epoch_order(n, 3, 2, None).tolist() == np.random.default_rng([3, 2]).permutation(n).tolist()
    assert epoch_order(n, 3, 2, n).tolist() == epoch_order(n, 3, 2, None).tolist()


def test_a_buffer_larger_than_the_cache_encodes_each_image_at_most_once_per_epoch(data, base_tool, tmp_path):
    """6 images, a cache of 2 images' features, 4 epochs: epoch 1 encodes all 6, every later epoch the 4
    the cache could not keep (the epoch starts with the 2 it holds), never one image twice in an epoch;
    a stage resumed mid-way orders its epochs the same."""
    probe = EmbeddingCache(base_tool)
    probe.get(["x"], [data["store"].image(data["train"][0]["extra_info"]["sample_id"])])
    two_images = 2 * probe.bytes_per_image
    engine = fresh_engine(base_tool)
    counts: list[int] = []
    encode = engine.tool.encode

    def counting(images):
        counts.append(len(images))
        return encode(images)

    engine.tool.encode = counting
    report = train_tool_on_buffer(
        engine, data["buffer"], data["store"], epochs=4, batch_size=2, max_cache_bytes=two_images, progress=False
    )
    assert report.distinct_images == 6 and report.cache_window == 2
    assert report.images_encoded == 6 + 3 * 4  # 18 encodes for 24 image visits
    assert report.images_encoded / (report.distinct_images * report.epochs) == pytest.approx(0.75)

    settings = {"epochs": 4, "batch_size": 2, "max_cache_bytes": two_images, "progress": False, "checkpoint_every": 5}
    whole = train_tool_on_buffer(
        fresh_engine(base_tool), data["buffer"], data["store"], checkpoint_dir=tmp_path / "a", **settings
    )
    first = train_tool_on_buffer(
        fresh_engine(base_tool),
        data["buffer"],
        data["store"],
        checkpoint_dir=tmp_path / "b",
        **{**settings, "epochs": 2},
    )
    resumed = train_tool_on_buffer(
        fresh_engine(base_tool), data["buffer"], data["store"], checkpoint_dir=tmp_path / "b", **settings
    )
    assert first.cache_window == resumed.cache_window == 2 and resumed.resumed_from_batch == 6
    assert resumed.epoch_losses == whole.epoch_losses  # the same batches in the same order
