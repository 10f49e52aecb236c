"""The grto trainer's two phases (tool rewards before advantages, tool update after the actor),
run in-process: verl's TransferQueue is replaced by a dict, the worker group by one local worker."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import verl  # noqa: F401

from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.synthetic import generate_split
from verl_grto.reward.answer import ToolPrompt, format_answer
from verl_grto.tool.worker import ToolSettings, ToolWorkerMixin
from verl_grto.trainer import grto_trainer
from verl_grto.trainer.config import GRTOConfig


class LocalWorkerGroup:
    """verl's worker-group calls, answered by one in-process ToolWorkerMixin (world size 1)."""

    world_size = 1

    def __init__(self) -> None:
        self.worker = ToolWorkerMixin()

    def __getattr__(self, name):
        method = getattr(self.worker, name)

        def call(*args):
            # DP_COMPUTE methods get one item per rank; ONE_TO_ALL ones the bare value
            if name in ("tool_predict", "tool_update"):
                self.sent.append((name, args))
                return [method(*(a[0] for a in args))]
            return [method(*args)]

        return call

    @property
    def sent(self) -> list:
        return self.__dict__.setdefault("_sent", [])


class FakeTQ:
    def __init__(self, fields: dict) -> None:
        self.fields = fields

    def kv_batch_get(self, keys, partition_id, select_fields):
        return {k: self.fields[k] for k in select_fields}

    def kv_batch_put(self, keys, partition_id, fields):
        for k in fields.keys():  # noqa: SIM118  (a TensorDict)
            self.fields[k] = fields[k]


@pytest.fixture()
def setup(tiny_assets, tmp_path, monkeypatch):
    rows = generate_split(2, seed=0, domain="plain", split="train")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets.policy))
    answers, extra, reward_model, uids = [], [], [], []
    for r, row in enumerate(rows):
        gt_box = row.ground_truth.boxes[0]
        good = format_answer([ToolPrompt(box=tuple(gt_box))], think="x")
        for text in [good, good, "no answer here", format_answer([ToolPrompt(box=(0, 0, 5, 5))])]:
            answers.append(text)
            extra.append({"sample_id": row.sample_id})
            reward_model.append({"ground_truth": row.ground_truth.to_json()})
            uids.append(f"u{r}")
    tokens = [torch.tensor(tokenizer(a)["input_ids"]) for a in answers]
    nested = torch.nested.as_nested_tensor(tokens, layout=torch.jagged)
    tq = FakeTQ(
        {
            "responses": nested,
            "uid": uids,
            "extra_info": extra,
            "reward_model": reward_model,
            "rm_scores": torch.nested.as_nested_tensor([torch.zeros(len(t)) for t in tokens], layout=torch.jagged),
        }
    )
    monkeypatch.setattr(grto_trainer, "tq", tq)
    files = [str(tmp_path / "train.parquet")]
    write_rows_atomic([row.to_record() for row in rows], files[0])
    trainer = object.__new__(grto_trainer.GRTOTrainer)
    trainer.grto = GRTOConfig(tool=ToolSettings(path=str(tiny_assets.tool), lr=1e-3), iou_after=True)
    trainer.tokenizer = tokenizer
    trainer.timing_raw = {}
    trainer.global_steps = 1
    trainer.actor_rollout_wg = LocalWorkerGroup()
    trainer.actor_rollout_wg.init_tool(trainer.grto.tool, files)  # the worker reads its images itself
    trainer.tool_wg = trainer.actor_rollout_wg  # colocated placement
    trainer.image_store = SampleImageStore(files)
    batch = SimpleNamespace(keys=[str(i) for i in range(len(answers))], partition_id="train")
    return trainer, tq, batch


def test_mask_rewards_replace_scores_at_last_token(setup):
    trainer, tq, batch = setup
    metrics: dict = {}
    trainer._tool_rewards(batch, metrics)
    scores = [row for row in tq.fields["rm_scores"].unbind()]
    assert all(torch.all(s[:-1] == 0) for s in scores)
    last = np.array([float(s[-1]) for s in scores])
    assert last[2] == 0.0 and last[6] == 0.0  # unparseable answers score 0
    assert metrics["grto/unparseable_fraction"] == pytest.approx(0.25)
    assert metrics["grto/reward/score"] == pytest.approx(last.mean())
    # the two identical good answers of one image get the same mask, hence the same score
    assert last[0] == last[1]
    assert trainer.actor_rollout_wg.worker.tool_engine.cache.images_encoded == 2  # 2 images, 8 rollouts
    # what travelled to the tool: prompts and RLE ground truths, no image and no decoded mask; back: counts
    ((name, (batches, mask_rows, fill)),) = trainer.actor_rollout_wg.sent
    assert name == "tool_predict" and batches[0].images == [None, None] and mask_rows == [[]]
    assert all(isinstance(t.mask, dict) for t in batches[0].targets)


def test_tool_update_weights_skip_unparseable_and_train(setup):
    trainer, tq, batch = setup
    metrics: dict = {}
    phase = trainer._tool_rewards(batch, metrics)
    tq.fields["advantages"] = tq.fields["rm_scores"]
    before = [p.detach().clone() for p in trainer.actor_rollout_wg.worker.tool_engine.params]
    trainer._tool_update(phase, batch, metrics)
    assert metrics["grto/tool/skipped"] == 0.0
    assert metrics["grto/tool/weight_mean"] == pytest.approx(0.75)  # 2 of 8 rollouts weigh 0
    assert 0.0 <= metrics["grto/tool/iou_before"] <= 1.0 and 0.0 <= metrics["grto/tool/iou_after"] <= 1.0
    after = trainer.actor_rollout_wg.worker.tool_engine.params
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_phase_one_returns_the_state_phase_two_trains_on(setup):
    """Phase 1 hands one ToolPhase to phase 2: every rollout in exactly one tool batch, an image's
    rollouts together; verl's actor update with the tool on refuses to run without it."""
    trainer, tq, batch = setup
    phase = trainer._tool_rewards(batch, {})
    assert sorted(i for rows in phase.shard_rows for i in rows) == list(range(8))
    assert [len(b.image_keys) for b in phase.batches] == [2]  # 2 images, one rank
    assert len(phase.iou_before) == len(phase.parse_ok) == 8
    assert phase.parse_ok == [True, True, False, True] * 2 and phase.prompts[2] == []
    trainer._tool_phase = None
    with pytest.raises(RuntimeError, match="phase 1"):
        trainer._update_actor(batch, {})


def test_tool_loss_coef_reaches_the_engine_as_loss_scale_not_in_the_weights(setup):
    """lambda multiplies the weighted mean (ToolEngine.objective); folded into the weights it cancelled."""
    trainer, tq, batch = setup
    trainer.grto = GRTOConfig(tool=trainer.grto.tool, tool_loss_coef=2.5)
    phase = trainer._tool_rewards(batch, {})
    tq.fields["advantages"] = tq.fields["rm_scores"]
    assert trainer._tool_weights(phase, batch).tolist() == [1.0, 1.0, 0.0, 1.0] * 2  # relative weights only
    engine = trainer.actor_rollout_wg.worker.tool_engine
    seen = []
    update = engine.update
    engine.update = lambda b, w, loss_scale=1.0: seen.append(loss_scale) or update(b, w, loss_scale)
    metrics: dict = {}
    trainer._tool_update(phase, batch, metrics)
    assert seen == [2.5] and metrics["grto/tool/skipped"] == 0.0
    assert metrics["grto/tool/scaled_loss"] == pytest.approx(2.5 * metrics["grto/tool/loss"])
    assert metrics["grto/tool/weight_mean"] == pytest.approx(0.75)


def test_min_box_iou_leaves_prompts_that_miss_out_of_the_tool_loss_only(setup):
    trainer, tq, batch = setup
    rewards = {}
    for min_box_iou in (0.0, 0.5):
        trainer.grto = GRTOConfig(tool=ToolSettings(path=trainer.grto.tool.path, lr=1e-3), min_box_iou=min_box_iou)
        phase = trainer._tool_rewards(batch, {})
        rewards[min_box_iou] = [float(s[-1]) for s in tq.fields["rm_scores"].unbind()]
        tq.fields["advantages"] = tq.fields["rm_scores"]
        weights = trainer._tool_weights(phase, batch)
        # per image: two GT-box answers, one unparseable, one 5x5 box in the corner that misses
        expected = [1.0, 1.0, 0.0, 1.0 if min_box_iou == 0 else 0.0] * 2
        assert weights.tolist() == expected
    assert rewards[0.0] == rewards[0.5]  # the policy's rewards do not depend on the filter


def test_non_finite_tool_loss_skips_the_tool_step(setup, caplog):
    trainer, tq, batch = setup
    metrics: dict = {}
    phase = trainer._tool_rewards(batch, metrics)
    tq.fields["advantages"] = tq.fields["rm_scores"]
    engine = trainer.actor_rollout_wg.worker.tool_engine
    with torch.no_grad():
        engine.params[0].fill_(float("nan"))
    snapshot = [p.detach().clone() for p in engine.params]
    with caplog.at_level(logging.WARNING, logger=grto_trainer.logger.name):
        trainer._tool_update(phase, batch, metrics)
    assert metrics["grto/tool/skipped"] == 1.0
    assert "tool step skipped" in caplog.text
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(engine.params, snapshot, strict=True))


def test_tool_settings_are_the_engine_config_plus_where_the_tool_comes_from():
    """One config per concept: the recipe's grto.tool section adds path and trainable to the engine's
    settings, whose fields and defaults live in ToolEngineConfig alone; the worker hands it on as is."""
    from dataclasses import fields

    from verl_grto.tool.engine import ToolEngineConfig
    from verl_grto.tool.losses import LossConfig

    extra = {f.name for f in fields(ToolSettings)} - {f.name for f in fields(ToolEngineConfig)}
    assert extra == {
        "path",
        "trainable",
        "freeze_high_res_convs",
        "stability_fallback",
        "min_box_size",
        "encoder_dtype",
    }
    tool = GRTOConfig.from_config({"tool": {"path": "p", "lr": 1e-3, "loss": {"dice_weight": 2.0}}}).tool
    assert isinstance(tool, ToolEngineConfig) and tool.path == "p" and tool.lr == 1e-3
    assert tool.loss == LossConfig(dice_weight=2.0) and tool.eps == ToolEngineConfig().eps


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("min_box_iou", 1.5),
        ("min_box_iou", -0.1),
        ("placement", "elsewhere"),
        ("weighting", "random"),
        ("tool_loss_coef", -1.0),
        ("tool_loss_coef", float("nan")),
        ("data_check", "sometimes"),
    ],
)
def test_bad_grto_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"grto\\.{key}"):
        GRTOConfig(tool=ToolSettings(path="unused"), **{key: value})


def test_importance_weighting_is_refused_by_the_trainer_as_library_only():
    """The trainer supplies advantages, not target log-probs: importance weights (BTO's) would fail at
    the first tool update, so the config refuses them, saying where they can be used."""
    with pytest.raises(ValueError, match="grto.weighting: 'importance' needs target_logprobs") as info:
        GRTOConfig(tool=ToolSettings(path="unused"), weighting="importance")
    assert "library-only" in str(info.value) and "train_tool_on_buffer" in str(info.value)
    assert "'uniform', 'advantage'" in str(info.value)
    for name in ("uniform", "advantage"):
        GRTOConfig(tool=ToolSettings(path="unused"), weighting=name)


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_run_start_checks_the_data_before_verl_builds_datasets(tmp_path, monkeypatch, mode):
    """``GRTOTrainer._init_dataloader`` checks first: a bad row stops the run, or verl's datasets read a copy without it."""
    from omegaconf import OmegaConf

    from verl_grto.data.parquet import write_rows_atomic
    from verl_grto.trainer.data_preflight import BadDataError

    records = [r.to_record() for r in generate_split(3, seed=0, domain="plain", split="train")]
    records[1]["images"] = [{"bytes": b"not an image", "path": None}]
    train = tmp_path / "train.parquet"
    write_rows_atomic(records, train)
    trainer = object.__new__(grto_trainer.GRTOTrainer)
    trainer.config = OmegaConf.create(
        {"data": {"train_files": str(train), "val_files": []}, "trainer": {"default_local_dir": str(tmp_path / "run")}}
    )
    OmegaConf.set_struct(trainer.config, True)  # as verl's trainer holds it
    trainer.processor = None  # verl's _init_tokenizer sets it; a text-only policy has none
    trainer.grto = GRTOConfig(tool=ToolSettings(path="unused"), data_check=mode)
    built_from = []  # what verl's own _init_dataloader would build its datasets from
    monkeypatch.setattr(
        grto_trainer.PPOTrainerSync, "_init_dataloader", lambda self: built_from.append(self._data_files("train_files"))
    )
    if mode == "fail":
        with pytest.raises(BadDataError, match=f"{train}:1: image 0 does not decode"):
            trainer._init_dataloader()
        assert built_from == []
        return
    trainer._init_dataloader()
    ((filtered,),) = built_from
    assert filtered.startswith(str(tmp_path / "run" / "data_check")) and len(pq.read_table(filtered)) == 2


# ---- ignore regions, and validation scored where the masks are made ---------------------------


def _ignore_everything_but(gt: np.ndarray, margin: int = 6) -> np.ndarray:
    """An ignore region over the whole image but a band around the object (ReasonSeg-like)."""
    ys, xs = np.nonzero(gt)
    keep = np.zeros_like(gt)
    keep[max(0, ys.min() - margin) : ys.max() + margin, max(0, xs.min() - margin) : xs.max() + margin] = True
    return ~keep


def _with_ignore(tq, view_rows) -> list[np.ndarray]:
    """Give every row an ignore region through extra_info["ignore_mask"] (the ReasonSeg converter's field)."""
    import json

    from verl_grto.data.masks import decode_rle, encode_rle
    from verl_grto.data.schema import GroundTruth

    ignores = []
    for k, (extra, rm) in enumerate(zip(tq.fields["extra_info"], tq.fields["reward_model"], strict=True)):
        gt = decode_rle(GroundTruth.from_json(rm["ground_truth"]).mask_rle)
        ignore = _ignore_everything_but(gt)
        tq.fields["extra_info"][k] = {**extra, "ignore_mask": json.dumps(encode_rle(ignore))}
        ignores.append(ignore)
    return ignores


def test_ignore_regions_leave_the_mask_reward_and_the_tool_loss(setup):
    """ReasonSeg's ignore pixels count in neither the reward's IoU nor the tool's loss: the rewards equal
    score_mask_answer (evaluate's rule) on the same masks and differ from those without the region, and
    the region travels to the tool's update with every target."""
    from verl_grto.data.masks import decode_rle
    from verl_grto.reward.frame import parse_policy_answer
    from verl_grto.reward.mask_reward import score_mask_answer

    trainer, tq, batch = setup
    trainer._tool_rewards(batch, {})
    plain_rewards = [float(s[-1]) for s in tq.fields["rm_scores"].unbind()]
    ignores = _with_ignore(tq, None)
    phase = trainer._tool_rewards(batch, {})
    rewards = [float(s[-1]) for s in tq.fields["rm_scores"].unbind()]
    masks = trainer.actor_rollout_wg.worker.tool_engine.predict(phase.batches[0]).masks  # the batch's order
    for k, i in enumerate(phase.shard_rows[0]):
        gt = phase.view.ground_truths[i]
        assert np.array_equal(decode_rle(gt.ignore_rle), ignores[i])  # GroundTruth.from_row read extra_info
        parsed = parse_policy_answer(phase.view.texts[i], gt)
        expected = score_mask_answer(parsed, masks[k].numpy(), gt, decode_rle(gt.mask_rle), trainer.grto.reward)
        assert rewards[i] == pytest.approx(expected.score)
    assert rewards != plain_rewards  # the region changed what counts
    # the update's targets carry it (tests/test_tool_losses.py: the loss leaves those pixels out)
    batch0 = phase.batches[0]
    assert all(batch0.target(r).ignore is not None for r in range(batch0.num_rollouts))


def test_validation_scores_on_the_tool_workers_as_evaluate_does(setup, monkeypatch):
    """val-grto/gIoU and cIoU equal IoUAccumulator.add(mask, gt, ignore) (evaluate's scoring) on the same
    masks; unparseable answers are missing predictions; the cache lives across validation batches."""
    from verl_grto.data.masks import decode_rle
    from verl_grto.eval.metrics import IoUAccumulator

    trainer, tq, batch = setup
    ignores = _with_ignore(tq, None)
    tq.kv_clear = lambda keys, partition_id: None
    # two validation batches showing the same two images (as RefCOCO's rows may): one prompt each
    trainer.val_dataloader = [{"raw_prompt": [0] * 4}, {"raw_prompt": [0] * 4}]
    halves = [list(range(0, 4)), list(range(4, 8))]
    full = {k: tq.fields[k] for k in ("responses", "uid", "extra_info", "reward_model")}
    calls = iter(halves)

    def generate_batch(batch_dict, validate):
        rows = next(calls)
        for key, value in full.items():
            tq.fields[key] = (
                torch.nested.as_nested_tensor([value.unbind()[r] for r in rows], layout=torch.jagged)
                if key == "responses"
                else [value[r] for r in rows]
            )
        return SimpleNamespace(keys=[str(r) for r in rows], partition_id="val")

    trainer.generate_batch = generate_batch
    trainer.val_history, trainer.stage_seconds, trainer.global_steps = [], {}, 0
    trainer._tool_ready = True
    engine = trainer.actor_rollout_wg.worker.tool_engine
    encoded = engine.cache.images_encoded
    metrics = trainer._validate()
    assert engine.cache.images_encoded - encoded == 2  # 8 rows over 2 batches, 2 distinct images

    for key, value in full.items():
        tq.fields[key] = value
    view = grto_trainer.RolloutView(tq.fields, trainer.tokenizer)
    parsed, prompts = grto_trainer._parse_view(view)
    batches, rows = trainer._shards(view, prompts)
    masks = grto_trainer.in_rollout_order(8, rows, [engine.predict(b).masks for b in batches])
    acc = IoUAccumulator()
    for p, m, gt, ig in zip(parsed, masks, view.ground_truths, ignores, strict=True):
        acc.add(m.numpy() if p.ok else None, decode_rle(gt.mask_rle), ig)
    assert metrics["val-grto/gIoU"] == pytest.approx(acc.results()["gIoU"])
    assert metrics["val-grto/cIoU"] == pytest.approx(acc.results()["cIoU"])
    assert metrics["val-grto/parse_rate"] == pytest.approx(0.75)


def test_overlay_masks_are_the_only_masks_that_come_back(setup, monkeypatch):
    trainer, tq, batch = setup
    logged = []
    monkeypatch.setattr(
        grto_trainer, "log_overlays", lambda step, images, preds, gts, *a: logged.append((images, preds, gts))
    )
    trainer.config = SimpleNamespace(trainer=SimpleNamespace(project_name="p", experiment_name="e", logger=[]))
    trainer.grto = GRTOConfig(tool=trainer.grto.tool, log_images_every=1, num_logged_images=2)
    trainer._tool_rewards(batch, {})
    ((images, preds, gts),) = logged
    assert len(images) == len(preds) == len(gts) == 2
    assert all(p is not None and p.shape == g.shape for p, g in zip(preds, gts, strict=True))
    ((_, (_, mask_rows, _)),) = [c for c in trainer.actor_rollout_wg.sent if c[0] == "tool_predict"]
    assert mask_rows == [[0, 4]]  # the first rollout of each of the two rows, in the rank's batch order


def test_reward_parts_are_logged_only_when_weighted(setup):
    """An unweighted part is not computed: logging it as a constant 0 would read as a measurement."""
    from verl_grto.reward.mask_reward import MaskRewardConfig

    trainer, tq, batch = setup
    metrics: dict = {}
    trainer._tool_rewards(batch, metrics)
    parts = {k.removeprefix("grto/reward/") for k in metrics if k.startswith("grto/reward/")}
    assert parts == {"mask_iou", "format_reward", "score"}
    trainer.grto = GRTOConfig(tool=trainer.grto.tool, reward=MaskRewardConfig(box_iou_weight=0.5, points_weight=0.1))
    metrics = {}
    trainer._tool_rewards(batch, metrics)
    parts = {k.removeprefix("grto/reward/") for k in metrics if k.startswith("grto/reward/")}
    assert parts == {"mask_iou", "format_reward", "box_iou", "points_in_mask", "score"}
    assert metrics["grto/reward/box_iou"] > 0  # two of the four answers per image are the ground-truth box
