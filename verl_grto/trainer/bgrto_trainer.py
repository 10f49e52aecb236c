"""verl V1 trainer mode ``bgrto``: BTO (bootstrap the tool off-policy), then GRTO (docs/method.md).

Before the first GRTO step (after verl's initial validation, if any):

1. **Buffer** -- G answers per training prompt from the initial policy, which is the reference
   policy mu at step 0, sampled through verl's own agent loop and rollout servers
   (:meth:`GRTOTrainer.generate_batch`) and stored by
   :func:`verl_grto.algorithm.bto.build.build_buffer` under ``<default_local_dir>/bto/buffer``
   (parquet + sidecar; resumes where a crash stopped it).
2. **Tool** -- K epochs of off-policy tool training on the buffer in the tool's workers
   (:class:`~verl_grto.algorithm.bto.train.BTORequest`, run by :meth:`ToolWorkerMixin.tool_run`),
   image features cached for the whole stage; checkpoints under ``bto/checkpoints`` let a crash
   resume inside the stage.
3. ``bto/report.json`` marks BTO done (written last); a restart before the first GRTO checkpoint
   reloads the bootstrapped tool from it instead of repeating BTO, and a restart after one resumes
   GRTO from verl's checkpoint, which holds the policy and the tool.

Then GRTO runs exactly as trainer mode ``grto``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer

from verl_grto.algorithm.bto.build import Rollout, build_buffer
from verl_grto.algorithm.bto.train import BTORequest
from verl_grto.atomic import atomic_file
from verl_grto.trainer.config import BTOConfig
from verl_grto.trainer.grto_trainer import GRTOTrainer, as_list

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

BTO_DIR = "bto"
REPORT_NAME = "report.json"


def dataset_rows(dataset: Any) -> list[dict[str, Any]]:
    """The rows of verl's training dataset (after its own filtering and sub-sampling) as
    :func:`build_buffer` reads them: ``extra_info``, ``reward_model`` and the index in the dataset.
    Only those two columns are read (``datasets`` memory-maps the rest, images included)."""
    table = dataset.dataframe.select_columns(["extra_info", "reward_model"])
    return [
        {"extra_info": extra, "reward_model": reward, "dataset_index": i}
        for i, (extra, reward) in enumerate(zip(table["extra_info"], table["reward_model"], strict=True))
    ]


@register_trainer("bgrto")
class BGRTOTrainer(GRTOTrainer):
    initial_validation_label = "before BTO"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.bto = BTOConfig.from_config(config.get("bto"))
        self.bto_dir = os.path.join(config.trainer.default_local_dir, BTO_DIR)
        self._fresh_start = True
        self.bto_report: dict[str, Any] | None = None

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        self._fresh_start = self.global_steps == 0

    def on_train_begin(self) -> None:
        super().on_train_begin()
        if not self._fresh_start:
            logger.info("resumed GRTO at step %d: BTO is behind this run", self.global_steps)
            return
        report_path = os.path.join(self.bto_dir, REPORT_NAME)
        if os.path.exists(report_path):
            with open(report_path) as f:
                self.bto_report = json.load(f)
            self.tool_wg.tool_load(self.bto_report["tool"]["tool_dir"])
            logger.info("BTO already done (%s): the bootstrapped tool is loaded", report_path)
        else:
            self.bto_report = self._run_bto()
        if self.bto.validate_after and self.val_dataloader is not None:
            val = self._validate()
            self.val_history[-1]["step"] = float(self.global_steps - 1)  # still before GRTO's first step
            self.val_history[-1]["label"] = "after BTO"
            self.logger.log(data=val, step=self.global_steps - 1)

    # ---- stage 1: the reference policy's rollouts --------------------------------------------
    def _generate_fn(self, rows: Sequence[dict[str, Any]], n: int) -> list[list[Rollout]]:
        """``generate_fn`` for :func:`build_buffer`: the rows' prompts through verl's rollout."""
        from verl.utils.dataset.rl_dataset import collate_fn

        batch_dict = collate_fn([self.train_dataset[int(r["dataset_index"])] for r in rows])
        meta = self.generate_batch(batch_dict, validate=False, n=n)
        fields = ["responses", "extra_info", "rollout_log_probs"]
        data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=fields)
        tq.kv_clear(keys=meta.keys, partition_id=meta.partition_id)
        tokens = [t.tolist() for t in data["responses"].unbind()]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        logprobs = [lp.float().tolist() for lp in data["rollout_log_probs"].unbind()]
        by_sample: dict[str, list[Rollout]] = {}
        for extra, text, lp, ids in zip(as_list(data["extra_info"]), texts, logprobs, tokens, strict=True):
            by_sample.setdefault(str(extra["sample_id"]), []).append(Rollout(text, lp, ids))
        out = []
        for row in rows:
            got = by_sample.get(str(row["extra_info"]["sample_id"]), [])
            if len(got) < n:
                raise RuntimeError(
                    f"verl's rollout returned {len(got)} of {n} answers for sample {row['extra_info']['sample_id']}"
                )
            out.append(got[:n])
        return out

    def _run_bto(self) -> dict[str, Any]:
        self._init_tool()
        files = self._data_files("train_files")
        rows = dataset_rows(self.train_dataset)
        if self.bto.max_prompts is not None:
            rows = rows[: self.bto.max_prompts]
        group_size = self.bto.group_size or int(self.config.actor_rollout_ref.rollout.n)
        rollout_cfg = self.config.actor_rollout_ref.rollout
        start = time.perf_counter()
        buffer = build_buffer(
            rows,
            self._generate_fn,
            group_size,
            os.path.join(self.bto_dir, "buffer"),
            reference_policy=str(self.config.actor_rollout_ref.model.path),
            seed=self.bto.seed,
            sampling={"temperature": float(rollout_cfg.temperature), "top_p": float(rollout_cfg.top_p)},
            chunk_size=self.bto.prompts_per_generate or int(self.config.data.train_batch_size),
            save_every=1,  # a part per generated chunk: a kill loses at most the chunk in flight
        )
        buffer_s = time.perf_counter() - start

        start = time.perf_counter()
        request = BTORequest(
            buffer_dir=os.path.join(self.bto_dir, "buffer"),
            image_files=files,
            checkpoint_dir=os.path.join(self.bto_dir, "checkpoints"),
            epochs=self.bto.epochs,
            batch_size=self.bto.batch_size,
            checkpoint_every=self.bto.checkpoint_every,
            seed=self.bto.seed,
            min_box_iou=self.bto.min_box_iou,
            cache_bytes=self.bto.cache_bytes,
        )
        tool_report = self._train_tool_offline(request)
        tool_s = time.perf_counter() - start

        parse_rate = float(np.mean([r.parse_ok for r in buffer.records])) if len(buffer) else float("nan")
        report = {
            "buffer": {
                "rows": len(buffer.done_sample_ids()),
                "rollouts": len(buffer),
                "group_size": group_size,
                "parse_rate": parse_rate,
                "seconds": buffer_s,
            },
            "tool": {**tool_report, "seconds": tool_s},
        }
        with atomic_file(os.path.join(self.bto_dir, REPORT_NAME)) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        self.stage_seconds.update(bto_buffer=buffer_s, bto_tool=tool_s)
        self.logger.log(
            data={
                "bto/buffer_parse_rate": parse_rate,
                "bto/buffer_s": buffer_s,
                "bto/tool_s": tool_s,
                "bto/tool_loss_first_epoch": tool_report["epoch_losses"][0],
                "bto/tool_loss_last_epoch": tool_report["epoch_losses"][-1],
            },
            step=self.global_steps - 1,
        )
        logger.info(
            "BTO: %d rollouts (parse rate %.2f) in %.1f s; tool %d epochs in %.1f s, loss %s",
            len(buffer),
            parse_rate,
            buffer_s,
            self.bto.epochs,
            tool_s,
            [round(v, 4) for v in tool_report["epoch_losses"]],
        )
        return report

    def _train_tool_offline(self, request: BTORequest) -> dict[str, Any]:
        """Run BTO's tool stage on the tool's workers with the rollout replicas asleep, then wake them with
        the current policy weights (verl's ``update_weights``, as after every step).

        Why: colocated, the replicas (vLLM at ``gpu_memory_utilization`` of each GPU) and the tool share
        the actor's devices; the buffer is built by then, so nothing generates until the validation
        after BTO. verl's sync trainer sleeps them after each rollout the same way (``on_sample_end``)."""
        self.checkpoint_manager.sleep_replicas()
        try:
            return self.tool_wg.tool_run(request)[0]
        finally:
            self.checkpoint_manager.update_weights(self.global_steps)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["bto"] = self.bto_report
        bto_s = self.stage_seconds.get("bto_buffer", 0.0) + self.stage_seconds.get("bto_tool", 0.0)
        if self.bto_report is not None and bto_s and out["mean_step_s"]:
            out["bto_fraction_of_grto_epoch"] = bto_s / (out["mean_step_s"] * out["steps_per_epoch"])
        return out
