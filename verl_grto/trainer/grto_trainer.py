"""verl V1 trainer mode ``grto``: GRPO for the policy, the tool trained on the same rollouts.

Per step (verl's sync trainer, plus two phases):
  rollout (verl's servers) -> old / ref log-probs ->
  **tool masks for every rollout and mask rewards** (replacing the agent loop's box reward in
  ``rm_scores``) -> advantages (GRPO) -> actor update -> **tool update from the same batch** ->
  weight sync; checkpoints hold the policy *and* the tool (``global_step_N/tool``).
The tool lives in the actor's worker processes (:class:`ActorRolloutRefToolWorker`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import numpy as np
import ray
import torch
import transfer_queue as tq
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.debug import marked_timer

from verl_grto.algorithm.tool_weights import tool_loss_weights
from verl_grto.data.image_store import SampleImageStore
from verl_grto.data.masks import decode_rle
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.metrics import intersection_union, sample_iou
from verl_grto.reward.answer import parse_answer
from verl_grto.reward.mask_reward import score_mask_answer
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.worker import ActorRolloutRefToolWorker
from verl_grto.trainer.config import GRTOConfig
from verl_grto.trainer.overlays import default_tb_dir, log_overlays

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

_ACTOR_ROLES = {Role.Actor, Role.ActorRollout, Role.ActorRolloutRef}


def _as_list(value: Any) -> list[Any]:
    return list(value.tolist() if hasattr(value, "tolist") else value)


class RolloutView:
    """What the tool phases need of a batch, read once from TransferQueue."""

    def __init__(self, data: Any, tokenizer: Any) -> None:
        responses = data["responses"]
        self.response_tokens = [t.tolist() for t in responses.unbind()]
        self.texts = tokenizer.batch_decode(self.response_tokens, skip_special_tokens=True)
        self.uids = [str(u) for u in _as_list(data["uid"])]
        extra = _as_list(data["extra_info"])
        self.sample_ids = [str(e["sample_id"]) for e in extra]
        self.ground_truths = [GroundTruth.from_json(rm["ground_truth"]) for rm in _as_list(data["reward_model"])]

    def __len__(self) -> int:
        return len(self.texts)


@register_trainer("grto")
class GRTOTrainer(PPOTrainerSync):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.grto = GRTOConfig.from_config(config.get("grto"))
        self._tool_ready = False
        self._view: RolloutView | None = None
        self._tool_batches: list[ToolBatch] | None = None
        self._parse_ok: list[bool] = []

    # ---- set-up: the actor workers host the tool -------------------------------------------
    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in list(self.role_worker_mapping):
            if role in _ACTOR_ROLES:
                self.role_worker_mapping[role] = ray.remote(ActorRolloutRefToolWorker)

    def _init_tool(self) -> None:
        if self._tool_ready:
            return
        sizes = self.actor_rollout_wg.init_tool(self.grto.tool)
        files = self.config.data.train_files
        files = [files] if isinstance(files, str) else list(files)
        self.image_store = SampleImageStore(files)
        self._tool_ready = True
        logger.info(
            "tool initialised: %d trainable parameters; %d training images indexed", sizes[0], len(self.image_store)
        )

    def _step_folder(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _load_checkpoint(self) -> None:
        self._init_tool()
        super()._load_checkpoint()
        if self.global_steps > 0:
            tool_dir = os.path.join(self._step_folder(), "tool")
            step = self.actor_rollout_wg.tool_load(tool_dir)[0]
            logger.info("Resumed the tool from %s (tool step %d)", tool_dir, step)

    def _save_checkpoint(self) -> None:
        # the tool first: verl writes latest_checkpointed_iteration.txt last, so a checkpoint
        # that resume can see always holds both the policy and the tool
        self.actor_rollout_wg.tool_save(os.path.join(self._step_folder(), "tool"))
        super()._save_checkpoint()

    # ---- phase 1: tool masks -> mask rewards (before advantages) ----------------------------
    def _shards(self, view: RolloutView, gt_masks: list[np.ndarray] | None, prompts: list[Any]) -> list[ToolBatch]:
        """Split rollouts over the tool's data-parallel ranks, keeping each image's rollouts together."""
        world = self.actor_rollout_wg.world_size
        by_image: dict[str, list[int]] = defaultdict(list)
        for i, sid in enumerate(view.sample_ids):
            by_image[sid].append(i)
        shard_rows: list[list[int]] = [[] for _ in range(world)]
        for k, rows in enumerate(by_image.values()):
            shard_rows[k % world].extend(rows)
        self._shard_rows = shard_rows
        batches = []
        for rows in shard_rows:
            sids = list(dict.fromkeys(view.sample_ids[i] for i in rows))
            position = {s: j for j, s in enumerate(sids)}
            batches.append(
                ToolBatch(
                    sample_ids=sids,
                    images=self.image_store.images(sids),
                    image_index=[position[view.sample_ids[i]] for i in rows],
                    prompts=[prompts[i] for i in rows],
                    gt_masks=[gt_masks[i] for i in rows] if gt_masks is not None else None,
                )
            )
        return batches

    def _predict_masks(self, n: int) -> list[np.ndarray | None]:
        """The tool's masks for the current step's rollouts, in rollout order (embeddings cached)."""
        shard_masks = self.actor_rollout_wg.tool_predict(self._tool_batches)
        masks: list[np.ndarray | None] = [None] * n
        for rows, out in zip(self._shard_rows, shard_masks, strict=True):
            for i, m in zip(rows, out.masks, strict=True):
                masks[i] = m
        return masks

    def _mean_parsed_iou(self, masks: list[np.ndarray | None]) -> float:
        """Mean mask IoU against the ground truth over the parseable rollouts (the ones the tool trains on)."""
        ious = [
            sample_iou(*intersection_union(m, gt))
            for m, gt, ok in zip(masks, self._gt_masks, self._parse_ok, strict=True)
            if ok
        ]
        return float(np.mean(ious)) if ious else float("nan")

    def _tool_rewards(self, batch: Any, metrics: dict) -> None:
        data = tq.kv_batch_get(
            keys=batch.keys,
            partition_id=batch.partition_id,
            select_fields=["responses", "uid", "extra_info", "reward_model", "rm_scores"],
        )
        view = RolloutView(data, self.tokenizer)
        parsed = [parse_answer(t, gt.image_size) for t, gt in zip(view.texts, view.ground_truths, strict=True)]
        gt_masks = [decode_rle(gt.mask_rle) for gt in view.ground_truths]
        prompts = [list(p.objects) if p.ok else [] for p in parsed]

        self.actor_rollout_wg.tool_begin_step()
        self._tool_batches = self._shards(view, gt_masks, prompts)
        masks = self._predict_masks(len(view))
        self._masks_before, self._gt_masks = masks, gt_masks

        breakdowns = [
            score_mask_answer(p, m if p.ok else None, gt, gm, self.grto.reward)
            for p, m, gt, gm in zip(parsed, masks, view.ground_truths, gt_masks, strict=True)
        ]
        scores = [b.score for b in breakdowns]
        old = data["rm_scores"]
        new_scores = []
        for i, row in enumerate(old.unbind()):
            row = torch.zeros_like(row, dtype=torch.float32)
            if row.numel():
                row[-1] = scores[i]
            new_scores.append(row)
        rm_scores = torch.nested.as_nested_tensor(new_scores, layout=torch.jagged)
        tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=tu.get_tensordict({"rm_scores": rm_scores})
        )

        self._view, self._parse_ok = view, [p.ok for p in parsed]
        if self.grto.log_images_every and self.global_steps % self.grto.log_images_every == 0:
            rows = [view.sample_ids.index(s) for s in dict.fromkeys(view.sample_ids)][: self.grto.num_logged_images]
            tb_dir = default_tb_dir(self.config.trainer.project_name, self.config.trainer.experiment_name)
            log_overlays(
                self.global_steps,
                self.image_store.images([view.sample_ids[i] for i in rows]),
                [masks[i] for i in rows],
                [gt_masks[i] for i in rows],
                self.config.trainer.logger,
                tb_dir,
            )
        for key in ("mask_iou", "format_reward", "box_iou", "points_in_mask", "repeat_fraction"):
            metrics[f"grto/reward/{key}"] = float(np.mean([b.metrics()[key] for b in breakdowns]))
        metrics["grto/reward/score"] = float(np.mean(scores))
        metrics["grto/unparseable_fraction"] = 1.0 - float(np.mean(self._parse_ok))
        reasons = defaultdict(int)
        for b in breakdowns:
            if not b.parse_ok:
                reasons[b.reason.split(":")[0]] += 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]:
            logger.info("unparseable rollouts: %d x %s", count, reason)

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        with marked_timer("tool_predict", self.timing_raw, color="purple"):
            self._tool_rewards(batch, metrics)
        return super()._compute_advantage(batch, metrics)

    # ---- phase 2: tool update on the same rollouts (after the actor update) -----------------
    def _tool_update(self, batch: Any, metrics: dict) -> None:
        assert self._view is not None and self._tool_batches is not None
        view = self._view
        fields = ["advantages"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        seq_adv = np.array([float(a[0]) if a.numel() else 0.0 for a in data["advantages"].unbind()])
        weights = (
            tool_loss_weights(
                self.grto.weighting,
                n=len(view),
                advantages=seq_adv,
                group_ids=view.uids,
                parse_ok=self._parse_ok,
            )
            * self.grto.tool_loss_coef
        )
        shard_weights = [[float(weights[i]) for i in rows] for rows in self._shard_rows]
        per_epoch = []
        for _ in range(self.grto.tool_epochs):
            per_epoch.append(self.actor_rollout_wg.tool_update(self._tool_batches, shard_weights)[0])
        last = per_epoch[-1]
        for key in ("loss", "bce", "dice", "grad_norm", "skipped", "num_empty"):
            metrics[f"grto/tool/{key}"] = last[key]
        metrics["grto/tool/iou_before"] = self._mean_parsed_iou(self._masks_before)
        metrics["grto/tool/iou_after"] = self._mean_parsed_iou(self._predict_masks(len(view)))
        metrics["grto/tool/weight_mean"] = float(weights.mean())
        if last["skipped"]:
            logger.warning("tool step skipped at global step %d (non-finite loss or no signal)", self.global_steps)

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        batch = super()._update_actor(batch, metrics)
        if self.grto.trains_tool:
            with marked_timer("update_tool", self.timing_raw, color="purple"):
                self._tool_update(batch, metrics)
        self._view, self._tool_batches = None, None
        return batch
