"""verl V1 trainer mode ``grto``: GRPO for the policy, the tool trained on the same rollouts.

Per step (verl's sync trainer, plus two phases):
  rollout (verl's servers) -> old / ref log-probs ->
  **tool masks for every rollout and mask rewards** (replacing the agent loop's box reward in
  ``rm_scores``) -> advantages (GRPO) -> actor update -> **tool update from the same batch** ->
  weight sync; checkpoints hold the policy *and* the tool (``global_step_N/tool``).
The tool lives in the actor's worker processes (:class:`ActorRolloutRefToolWorker`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import open_dict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.debug import marked_timer

from verl_grto.algorithm.tool_step import (
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
from verl_grto.data.frame import PolicyFrame
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.metrics import IoUAccumulator, box_area_ratio
from verl_grto.faults import dump_after_resume
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt
from verl_grto.reward.box_reward import score_box_answer
from verl_grto.reward.frame import parse_policy_answer
from verl_grto.reward.mask_reward import score_tool_overlap
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.pool import (
    TOOL_ROLE,
    create_tool_worker_group,
    register_tool_pool,
    tool_update_async,
    worker_nodes,
)
from verl_grto.tool.worker import ActorRolloutRefToolWorker, ToolScores, fingerprint_metrics
from verl_grto.trainer.config import GRTOConfig
from verl_grto.trainer.data_preflight import preflight_data
from verl_grto.trainer.overlays import default_tb_dir, log_overlays
from verl_grto.trainer.resume_probe import save_resumed_state

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

_ACTOR_ROLES = {Role.Actor, Role.ActorRollout, Role.ActorRolloutRef}
#: What the tool phases read of a batch from TransferQueue.
VIEW_FIELDS = ["responses", "uid", "extra_info", "reward_model"]
SUMMARY_NAME = "grto_summary.json"


def as_list(value: Any) -> list[Any]:
    """A TransferQueue field (numpy object array, tensor or list) as a Python list."""
    return list(value.tolist() if hasattr(value, "tolist") else value)


def _parse_view(view: RolloutView) -> tuple[list[ParsedAnswer], list[list[ToolPrompt]]]:
    """Parsed answers (in the image frame) and tool prompts (empty when unparseable: the tool's workers
    then score the empty mask, the missing-prediction rule)."""
    parsed = [parse_policy_answer(t, gt) for t, gt in zip(view.texts, view.ground_truths, strict=True)]
    return parsed, [list(p.objects) if p.ok else [] for p in parsed]


@dataclass
class StepScores:
    """The tool's scores of a step's ``n`` rollouts in rollout order, gathered from every rank's
    :class:`ToolScores`: overlap counts ``(n,)`` (``fill_*`` when asked), predicted IoU, and the few
    masks asked for (COCO RLE, by rollout index)."""

    intersection: np.ndarray
    union: np.ndarray
    fill_intersection: np.ndarray | None
    fill_union: np.ndarray | None
    masks: dict[int, dict[str, Any]]

    @property
    def ious(self) -> np.ndarray:
        return overlap_ious(self.intersection, self.union)

    @classmethod
    def gather(cls, n: int, shard_rows: list[list[int]], per_rank: list[ToolScores]) -> StepScores:
        def column(name: str) -> np.ndarray | None:
            values = [getattr(s, name) for s in per_rank]
            if any(v is None for v, rows in zip(values, shard_rows, strict=True) if rows):
                return None
            ordered = in_rollout_order(n, shard_rows, [list(v) if v is not None else [] for v in values])
            return np.array([0 if v is None else v for v in ordered], dtype=np.int64)

        masks = {rows[k]: rle for rows, s in zip(shard_rows, per_rank, strict=True) for k, rle in s.masks.items()}
        inter, union = column("intersection"), column("union")
        if inter is None or union is None:
            raise RuntimeError("the tool's workers returned no overlap counts (the batches carried no ground truth)")
        return cls(inter, union, column("fill_intersection"), column("fill_union"), masks)


class RolloutView:
    """What the tool phases need of a batch, read once from TransferQueue."""

    def __init__(self, data: Any, tokenizer: Any) -> None:
        responses = data["responses"]
        self.response_tokens = [t.tolist() for t in responses.unbind()]
        self.texts = tokenizer.batch_decode(self.response_tokens, skip_special_tokens=True)
        self.uids = [str(u) for u in as_list(data["uid"])]
        extra = as_list(data["extra_info"])
        self.sample_ids = [str(e["sample_id"]) for e in extra]
        self.ground_truths = [
            GroundTruth.from_row(rm["ground_truth"], e)
            for rm, e in zip(as_list(data["reward_model"]), extra, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ToolPhase:
    """What phase 1 (the tool's masks and the mask rewards, before verl's advantage) hands to phase 2
    (the tool's update, after or beside the actor's): the step's rollouts as the tool saw them.

    Why one object: phase 2 must train on exactly the batches phase 1 scored; one value returned by
    phase 1 and passed along (kept between verl's two calls in ``GRTOTrainer._tool_phase``) cannot be
    half updated. Per rollout (n of them, TransferQueue order): ``prompts`` (empty when unparseable),
    ``parse_ok``, ``iou_before`` (the IoU of the tool's mask before its update, ``(n,)``);
    ``batches[r]`` is tool rank r's :class:`ToolBatch` (prompts and ground truths as RLE, no image, no
    mask), holding the rollouts ``shard_rows[r]``.
    """

    view: RolloutView
    prompts: list[list[ToolPrompt]]
    parse_ok: list[bool]
    batches: list[ToolBatch]
    shard_rows: list[list[int]]
    iou_before: np.ndarray


@register_trainer("grto")
class GRTOTrainer(PPOTrainerSync):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.grto = GRTOConfig.from_config(config.get("grto"))
        self._tool_ready = False
        self._tool_phase: ToolPhase | None = None  # phase 1's result, until phase 2 has used it
        self.val_history: list[dict[str, float]] = []  # every validation, with its step
        self.step_seconds: list[float] = []
        self.stage_seconds: dict[str, float] = {}

    def _build_replay_buffer(self) -> Any:
        # verl consults ``self.trainer_mode`` for sync-versus-async behaviour (replay-buffer class,
        # one-prompt dataloader fetches, in-flight prompt checkpointing); the grto modes extend
        # PPOTrainerSync and are synchronous. verl's registry has already picked this class by the
        # configured name; from here on the trainer behaves as verl's ``sync`` mode.
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    # ---- set-up: the data is checked first, the actor workers host the tool ----------------
    def _init_dataloader(self) -> None:
        self._check_data()
        super()._init_dataloader()

    def _check_data(self) -> None:
        """Check every training and validation row before verl builds its datasets (``grto.data_check``).

        Why here: this runs in verl's task runner before any worker exists, so a bad row stops the run
        with file, row index and reason instead of a worker's stack trace mid-step. In ``skip`` mode
        ``data.train_files`` / ``data.val_files`` are pointed at the filtered copies, which every later
        reader (verl's datasets, the tool's image store, BTO) then uses.
        """
        result = preflight_data(
            self._data_files("train_files"),
            self._data_files("val_files"),
            self.grto.data_check,
            self.config.trainer.default_local_dir,
            PolicyFrame.from_recipe(self.config.data, self.processor),
        )
        if result.skipped:
            with open_dict(self.config):
                self.config.data.train_files = result.train_files
                self.config.data.val_files = result.val_files

    @property
    def separate_tool(self) -> bool:
        return self.grto.placement == "separate"

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        if self.separate_tool:  # the tool's own pool, created with the others (one GPU check for all)
            register_tool_pool(self.resource_pool_manager, self.grto.tool_workers_per_node, self.config.trainer.nnodes)
            return
        for role in list(self.role_worker_mapping):
            if role in _ACTOR_ROLES:
                self.role_worker_mapping[role] = ray.remote(ActorRolloutRefToolWorker)

    def _init_tool(self) -> None:
        if self._tool_ready:
            return
        if self.separate_tool:
            self.tool_wg = create_tool_worker_group(
                resource_pool=self.resource_pool_manager.get_resource_pool(TOOL_ROLE)
            )
        else:
            self.tool_wg = self.actor_rollout_wg
        files = self._data_files("train_files") + self._data_files("val_files")
        self.image_store = SampleImageStore(files)
        sizes = self.tool_wg.init_tool(self.grto.tool, files)  # the workers read their images themselves
        self._tool_ready = True
        logger.info(
            "tool initialised (%s, %d ranks): %d trainable parameters; %d rows, %d distinct images indexed",
            self.grto.placement,
            self.tool_wg.world_size,
            sizes[0],
            len(self.image_store),
            self.image_store.num_images,
        )
        self._log_placement()

    def _log_placement(self) -> None:
        """One line naming the Ray node of every actor and tool rank (short node ids).

        Why: which node a pool's placement groups land on is Ray's choice; on a cluster of several
        nodes this line shows whether the actor's and the tool's ranks really span them."""
        actor = worker_nodes(self.actor_rollout_wg)
        tool = actor if self.tool_wg is self.actor_rollout_wg else worker_nodes(self.tool_wg)
        short = {node: f"n{i}:{node[:8]}" for i, node in enumerate(dict.fromkeys(actor + tool))}
        logger.info(
            "placement on %d Ray nodes: actor ranks on [%s]; tool ranks on [%s]",
            len(short),
            ", ".join(short[n] for n in actor),
            ", ".join(short[n] for n in tool),
        )

    def _data_files(self, key: str) -> list[str]:
        files = self.config.data.get(key) or []
        return [files] if isinstance(files, str) else list(files)

    def _step_folder(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _load_checkpoint(self) -> None:
        self._init_tool()
        super()._load_checkpoint()
        if self.global_steps > 0:
            tool_dir = os.path.join(self._step_folder(), "tool")
            step = self.tool_wg.tool_load(tool_dir)[0]
            logger.info("Resumed the tool from %s (tool step %d)", tool_dir, step)
            dump_after_resume("grto", lambda out: save_resumed_state(self, out))

    def _save_checkpoint(self) -> None:
        # the tool first: verl writes latest_checkpointed_iteration.txt last, so a checkpoint
        # that resume can see always holds both the policy and the tool
        self.tool_wg.tool_save(os.path.join(self._step_folder(), "tool"))
        super()._save_checkpoint()

    # ---- phase 1: tool masks -> mask rewards (before advantages) ----------------------------
    def _shards(self, view: RolloutView, prompts: list[list[ToolPrompt]]) -> tuple[list[ToolBatch], list[list[int]]]:
        """Split rollouts over the tool's data-parallel ranks, keeping each image's rollouts together (rows
        that show one image too: the groups are keyed by image); returns one batch per rank and the
        rollout indices each holds. The batches carry prompts and RLE ground truths, no image."""
        groups = group_by_image(self.image_store.keys(view.sample_ids))
        shards = shard_by_image(groups, self.tool_wg.world_size)

        def target_of(i: int) -> tuple[str, Any]:
            return view.sample_ids[i], tool_target(view.ground_truths[i])

        batches = [tool_batch(shard, prompts.__getitem__, target_of) for shard in shards]
        return batches, [rollout_rows(shard) for shard in shards]

    def _score(
        self,
        batches: list[ToolBatch],
        shard_rows: list[list[int]],
        n: int,
        mask_rows: list[int] = (),  # type: ignore[assignment]
        fill_baseline: bool = False,
    ) -> StepScores:
        """The tool's scores of ``n`` rollouts sharded as ``_shards`` made them, in rollout order; the masks
        of ``mask_rows`` (rollout indices) come back too."""
        wanted = set(mask_rows)
        local_rows = [[k for k, i in enumerate(rows) if i in wanted] for rows in shard_rows]
        world = len(batches)
        per_rank = self.tool_wg.tool_predict(batches, local_rows, [fill_baseline] * world)
        return StepScores.gather(n, shard_rows, per_rank)

    def _tool_rewards(self, batch: Any, metrics: dict) -> ToolPhase:
        """Phase 1: the tool's masks for every rollout, their mask rewards written to ``rm_scores``."""
        data = tq.kv_batch_get(
            keys=batch.keys,
            partition_id=batch.partition_id,
            select_fields=[*VIEW_FIELDS, "rm_scores"],
        )
        view = RolloutView(data, self.tokenizer)
        parsed, prompts = _parse_view(view)

        log_images = bool(self.grto.log_images_every) and self.global_steps % self.grto.log_images_every == 0
        overlay_rows = _first_rows(view.sample_ids, self.grto.num_logged_images) if log_images else []
        self.tool_wg.tool_begin_step()
        batches, shard_rows = self._shards(view, prompts)
        scores = self._score(batches, shard_rows, len(view), overlay_rows)

        reward = self.grto.reward
        gt_masks = [decode_rle(gt.mask_rle) for gt in view.ground_truths] if reward.points_weight else None
        breakdowns = [
            score_tool_overlap(p, int(i), int(u), gt, reward, gt_masks[k] if gt_masks is not None else None)
            for k, (p, i, u, gt) in enumerate(
                zip(parsed, scores.intersection, scores.union, view.ground_truths, strict=True)
            )
        ]
        rewards = [b.score for b in breakdowns]
        put_rewards(batch, data["rm_scores"], rewards)

        phase = ToolPhase(view, prompts, [p.ok for p in parsed], batches, shard_rows, scores.ious)
        if overlay_rows:
            tb_dir = default_tb_dir(self.config.trainer.project_name, self.config.trainer.experiment_name)
            log_overlays(
                self.global_steps,
                self.image_store.images([view.sample_ids[i] for i in overlay_rows]),
                [decode_rle(scores.masks[i]) if i in scores.masks else None for i in overlay_rows],
                [decode_rle(view.ground_truths[i].mask_rle) for i in overlay_rows],
                self.config.trainer.logger,
                tb_dir,
            )
        for key in reward.logged_parts():  # a part whose weight is 0 is not computed, so not logged
            metrics[f"grto/reward/{key}"] = float(np.mean([b.metrics()[key] for b in breakdowns]))
        metrics["grto/reward/score"] = float(np.mean(rewards))
        metrics["grto/unparseable_fraction"] = 1.0 - float(np.mean(phase.parse_ok))
        reasons = defaultdict(int)
        for b in breakdowns:
            if not b.parse_ok:
                reasons[b.reason.split(":")[0]] += 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]:
            logger.info("unparseable rollouts: %d x %s", count, reason)
        return phase

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        with marked_timer("tool_predict", self.timing_raw, color="purple"):
            self._tool_phase = self._tool_rewards(batch, metrics)
        return super()._compute_advantage(batch, metrics)

    # ---- phase 2: tool update on the same rollouts (after, or beside, the actor update) ------
    def _tool_weights(self, phase: ToolPhase, batch: Any) -> np.ndarray:
        """w_i per rollout, from the advantages already in TransferQueue; 0 for the rollouts whose box
        misses the object when ``grto.min_box_iou`` > 0 (:func:`tool_step_weights`, as BTO's).

        Relative weights only: lambda (``grto.tool_loss_coef``) is not folded in (the tool's
        weighted mean would cancel it) but passed to the update as ``loss_scale`` and applied
        after the mean (``ToolEngine.objective``)."""
        view = phase.view
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["advantages"])
        seq_adv = np.array([float(a[0]) if a.numel() else 0.0 for a in data["advantages"].unbind()])
        return tool_step_weights(
            self.grto.weighting,
            phase.prompts,
            [gt.boxes for gt in view.ground_truths],
            phase.parse_ok,
            min_box_iou=self.grto.min_box_iou,
            advantages=seq_adv,
            group_ids=view.uids,
        )

    def _start_tool_update(self, phase: ToolPhase, batch: Any) -> tuple[np.ndarray, list[Any]]:
        """Queue the tool's update epochs on its workers without waiting (own pool: they run while
        the actor updates); on the colocated group they run here, one after the other."""
        weights = self._tool_weights(phase, batch)
        shard_weights = [[float(weights[i]) for i in rows] for rows in phase.shard_rows]
        scale = float(self.grto.tool_loss_coef)  # lambda, applied after the weighted mean
        if self.separate_tool:
            return weights, [
                tool_update_async(self.tool_wg, phase.batches, shard_weights, scale)
                for _ in range(self.grto.tool_epochs)
            ]
        scales = [scale] * len(phase.batches)  # Dispatch.DP_COMPUTE: one copy per rank
        return weights, [
            self.tool_wg.tool_update(phase.batches, shard_weights, scales) for _ in range(self.grto.tool_epochs)
        ]

    def _finish_tool_update(self, phase: ToolPhase, weights: np.ndarray, pending: list[Any], metrics: dict) -> None:
        per_epoch = [ray.get(p) if self.separate_tool else p for p in pending]
        last = per_epoch[-1][0]  # the engine reduces its metrics over all ranks: every rank returns the same
        for key in ("loss", "scaled_loss", "bce", "dice", "grad_norm", "skipped", "num_empty", "num_rollouts"):
            metrics[f"grto/tool/{key}"] = last[key]
        # the tool's IoU on the rollouts it trains on (the parseable ones), before and (asked) after its update
        parse_ok = np.asarray(phase.parse_ok, dtype=bool)
        metrics["grto/tool/iou_before"] = float(phase.iou_before[parse_ok].mean()) if parse_ok.any() else float("nan")
        if self.grto.iou_after:  # a second prediction pass over the step's rollouts: off at full size
            after = self._score(phase.batches, phase.shard_rows, len(phase.iou_before))
            metrics["grto/tool/iou_after"] = mean_overlap_iou(after.intersection, after.union, phase.parse_ok)
        self.tool_wg.tool_begin_step()  # the step's features are not needed again: free them before the rollout
        metrics["grto/tool/weight_mean"] = float(weights.mean())
        if self.tool_wg.world_size > 1:
            # every rank's weights after the update: one digest when the replicas are in sync. Not
            # on one rank, where it could not differ: hashing reads every trainable weight (a few ms
            # for the tiny tool and SAM2's decoder; ~1 GB when a SAM2-L is trained whole)
            metrics.update(fingerprint_metrics(self.tool_wg.tool_fingerprint()))
        if last["skipped"]:
            logger.warning("tool step skipped at global step %d (non-finite loss or no signal)", self.global_steps)

    def _tool_update(self, phase: ToolPhase, batch: Any, metrics: dict) -> None:
        """The tool's update epochs on the step's rollouts, waited for (the colocated path)."""
        self._finish_tool_update(phase, *self._start_tool_update(phase, batch), metrics)

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        phase, self._tool_phase = self._tool_phase, None
        if not self.grto.trains_tool:
            return super()._update_actor(batch, metrics)
        if phase is None:
            raise RuntimeError("the tool update needs phase 1's result (_compute_advantage runs _tool_rewards first)")
        if self.separate_tool:
            with marked_timer("update_tool_submit", self.timing_raw, color="purple"):
                weights, pending = self._start_tool_update(phase, batch)
            batch = super()._update_actor(batch, metrics)
            with marked_timer("update_tool", self.timing_raw, color="purple"):  # the wait beyond the actor's
                self._finish_tool_update(phase, weights, pending, metrics)
        else:
            batch = super()._update_actor(batch, metrics)
            with marked_timer("update_tool", self.timing_raw, color="purple"):
                self._tool_update(phase, batch, metrics)
        return batch

    # ---- generation outside the training step (validation, BTO's buffer) ---------------------
    def generate_batch(self, batch_dict: dict[str, Any], *, validate: bool, n: int | None = None) -> Any:
        """Answers for one dataloader batch through verl's agent loop and rollout servers.

        The same submission verl's ``_validate`` makes (prompts registered in TransferQueue, then
        sampled back through the replay buffer), greedy ``val_kwargs`` when ``validate`` and the
        training sampler otherwise, with ``n`` answers per prompt (None: the config's). Returns the
        batch's ``KVBatchMeta``; the caller reads its fields and clears it from TransferQueue.
        """
        partition = "val" if validate else "train"
        size = len(batch_dict["raw_prompt"])
        batch_dict["uid"] = np.array([str(uuid.uuid4()) for _ in range(size)], dtype=object)
        if n is not None:
            batch_dict["__rollout_n__"] = np.array([n] * size, dtype=object)
        batch = tu.get_tensordict(batch_dict)
        tu.assign_non_tensor_data(batch, "global_steps", self.global_steps)
        if validate:
            tu.assign_non_tensor_data(batch, "validate", True)
        tags = [{"is_prompt": True, "status": "pending", "global_steps": self.global_steps} for _ in range(size)]
        tq.kv_batch_put(keys=list(batch["uid"]), partition_id=partition, tags=tags)
        self.agent_loop_manager.generate_sequences(batch)
        meta, _ = self.replay_buffer.sample(global_steps=self.global_steps, partition_id=partition, batch_size=size)
        return meta

    # ---- validation through the tool ---------------------------------------------------------
    #: What the validation verl runs before its first step is labelled in the summary.
    initial_validation_label = "before GRTO"

    def _validate(self) -> dict[str, float]:
        """Validation as the task scores it: greedy answers -> the tool's masks -> gIoU and cIoU.

        Replaces verl's reward-based validation in the grto modes (verl's would score the agent
        loop's box reward, not the masks). Beside the tool's score: the trivial baseline of a mask
        that fills the answer's boxes, and the parse rate. Unparseable answers are missing masks
        (the empty-mask rule of docs/benchmarks.md).
        """
        self._init_tool()
        start = time.perf_counter()
        tool_acc, fill_acc = IoUAccumulator(), IoUAccumulator()
        parsed_ok: list[bool] = []
        box_ious: list[float] = []
        area_ratios: list[float] = []
        # one cache for the whole pass (bounded by grto.tool.cache_bytes), not one per batch: rows that
        # show an image another batch showed (RefCOCO's sentences) reuse its features
        self.tool_wg.tool_begin_step()
        for batch_dict in self.val_dataloader:
            meta = self.generate_batch(batch_dict, validate=True)
            data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=VIEW_FIELDS)
            tq.kv_clear(keys=meta.keys, partition_id=meta.partition_id)
            view = RolloutView(data, self.tokenizer)
            parsed, prompts = _parse_view(view)
            # the policy alone, before the tool: how well its boxes match the referred objects' boxes
            box_ious += [score_box_answer(t, gt).box_iou for t, gt in zip(view.texts, view.ground_truths, strict=True)]
            area_ratios += [
                r for p, gt in zip(parsed, view.ground_truths, strict=True) if (r := box_area_ratio(p, gt)) is not None
            ]
            batches, rows = self._shards(view, prompts)
            # counts from the tool's workers: an unparseable answer reached them with no prompt and
            # scored as the empty mask (a missing prediction), its filled boxes as the empty mask too
            scores = self._score(batches, rows, len(view), fill_baseline=True)
            assert scores.fill_intersection is not None and scores.fill_union is not None
            for k, p in enumerate(parsed):
                tool_acc.add_counts(int(scores.intersection[k]), int(scores.union[k]))
                fill_acc.add_counts(int(scores.fill_intersection[k]), int(scores.fill_union[k]))
                parsed_ok.append(p.ok)
        self.tool_wg.tool_begin_step()  # drop the validation images' features
        metrics = validation_metrics(tool_acc, fill_acc, parsed_ok, box_ious, area_ratios)
        self._record_validation(metrics, start)
        return metrics

    def _record_validation(self, metrics: dict[str, float], start: float) -> None:
        """Keep a validation's metrics in ``val_history`` under its label, and its time."""
        # verl validates once before its first step (global_steps 0), then after step N's update
        label = self.initial_validation_label if self.global_steps == 0 else f"after GRTO step {self.global_steps}"
        self.val_history.append({"step": float(self.global_steps), "label": label, **metrics})
        self.stage_seconds["validation"] = self.stage_seconds.get("validation", 0.0) + time.perf_counter() - start

    # ---- summary ------------------------------------------------------------------------------
    def _compute_metrics(self, batch: Any, metrics: dict, timing_raw: dict, global_steps: int, epoch: int) -> None:
        if "step" in timing_raw:
            self.step_seconds.append(float(timing_raw["step"]))
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)

    def summary(self) -> dict[str, Any]:
        """Validation before and after, and where the time went (written beside the checkpoints)."""
        steps = self.step_seconds
        return {
            "trainer_mode": self.config.trainer.v1.trainer_mode,
            "validations": self.val_history,
            "val_first": self.val_history[0] if self.val_history else None,
            "val_last": self.val_history[-1] if self.val_history else None,
            "steps": len(steps),
            "seconds": {**self.stage_seconds, "grto_steps": float(sum(steps))},
            "mean_step_s": float(np.mean(steps)) if steps else None,
            "steps_per_epoch": int(self.steps_per_epoch),
        }

    def fit(self, agent_loop_manager: Any) -> None:
        super().fit(agent_loop_manager)
        summary = self.summary()
        path = os.path.join(self.config.trainer.default_local_dir, SUMMARY_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        print(format_summary(summary), flush=True)


def put_rewards(batch: Any, rm_scores: Any, rewards: list[float]) -> None:
    """Write each rollout's reward on its last response token (``rm_scores``, a jagged tensor of the
    responses' lengths, zero elsewhere) back to TransferQueue: the score verl's advantage then reads."""
    new_scores = []
    for i, row in enumerate(rm_scores.unbind()):
        row = torch.zeros_like(row, dtype=torch.float32)
        if row.numel():
            row[-1] = rewards[i]
        new_scores.append(row)
    nested = torch.nested.as_nested_tensor(new_scores, layout=torch.jagged)
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=tu.get_tensordict({"rm_scores": nested}))


def validation_metrics(
    tool: IoUAccumulator,
    fill: IoUAccumulator,
    parsed_ok: list[bool],
    box_ious: list[float],
    area_ratios: list[float],
) -> dict[str, float]:
    """A validation's ``val-grto/*`` metrics: the tool's masks' gIoU / cIoU, filling the answers' boxes,
    the parse rate, the policy's box IoU and box area ratio (> 1: the policy's boxes are larger than the
    objects', looser; < 1: tighter or cut), and the number of samples."""
    tool_res, fill_res = tool.results(), fill.results()
    return {
        "val-grto/gIoU": tool_res["gIoU"],
        "val-grto/cIoU": tool_res["cIoU"],
        "val-grto/box_fill_gIoU": fill_res["gIoU"],
        "val-grto/parse_rate": float(np.mean(parsed_ok)),
        "val-grto/policy_box_iou": float(np.mean(box_ious)),
        "val-grto/policy_box_area_ratio": float(np.median(area_ratios)) if area_ratios else float("nan"),
        "val-grto/n": float(tool_res["n"]),
    }


def _first_rows(sample_ids: list[str], k: int) -> list[int]:
    """The first rollout of each of the first ``k`` distinct dataset rows (the overlays' samples)."""
    first: dict[str, int] = {}
    for i, sid in enumerate(sample_ids):
        first.setdefault(sid, i)
    return list(first.values())[:k]


def format_validation(v: dict[str, Any]) -> str:
    """One validation (an entry of ``val_history``) as one line: the tool's score beside its baselines."""
    label = v.get("label", f"step {int(v['step'])}")
    return (
        f"validation {label}: gIoU {v['val-grto/gIoU']:.3f}  cIoU {v['val-grto/cIoU']:.3f}"
        f"  (filling the policy's boxes: gIoU {v['val-grto/box_fill_gIoU']:.3f}; policy box IoU"
        f" {v.get('val-grto/policy_box_iou', float('nan')):.3f}, box area / object's"
        f" {v.get('val-grto/policy_box_area_ratio', float('nan')):.2f}, parse rate {v['val-grto/parse_rate']:.2f},"
        f" n={int(v['val-grto/n'])})"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The run's summary as a few human-readable lines."""
    lines = [f"==== verl-grto {summary['trainer_mode']} summary ===="]
    lines += [format_validation(v) for v in summary.get("validations") or []]
    lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    if summary.get("bto_fraction_of_grto_epoch") is not None:
        lines.append(f"BTO wall time / one GRTO epoch: {summary['bto_fraction_of_grto_epoch']:.2f}")
    return "\n".join(lines)
