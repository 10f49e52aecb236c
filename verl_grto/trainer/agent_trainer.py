"""verl V1 trainer mode ``grto_agent``: GRTO when the policy calls the tool inside verl's multi-turn agent loop.

The single-turn trainer (:class:`~verl_grto.trainer.grto_trainer.GRTOTrainer`, mode ``grto``) segments a
rollout's answer after generation. Here the policy calls the tool *during* generation (verl's
``ToolAgentLoop`` with :class:`~verl_grto.agent.segment_tool.SegmentTool`, the rows routed to
``grto_tool_agent``), sees each mask and decides to call again or to answer; every call leaves a record
in the trajectory's ``extra_fields`` (:mod:`verl_grto.agent.calls`). This subclass keeps the step of
``grto`` (verl's sync step, the tool phases in the same two hooks) and changes what the phases read:

* **set-up**: once the tool's workers hold the tool, this job's :class:`~verl_grto.agent.router.ToolCallRouter`
  is started, through which the agent-loop workers' calls reach them (trained mode);
* **phase 1** (:meth:`_tool_rewards`): each trajectory's calls and final mask (``grto_agent.final_mask``,
  :func:`~verl_grto.agent.calls.final_mask`); every valid call of every trajectory (and the answer's
  prompts when the final mask is the answer's) is a *tool row*, predicted and scored on the tool's
  workers (the features its calls computed are still in their cache); the reward is the final row's
  (:func:`~verl_grto.reward.mask_reward.score_tool_overlap`, its format term from the trajectory's last
  turn) minus the recorded penalties of invalid calls, written to ``rm_scores``;
* **phase 2** (:meth:`_tool_weights`): the tool's update trains on every row, weighted from its
  trajectory's advantage (:func:`~verl_grto.algorithm.tool_step.tool_call_weights`);
* **validation** (:meth:`_validate`): greedy trajectories, the final masks' gIoU / cIoU beside filling
  the final prompts' boxes, and what stopping at the first call would have scored.

Trajectory traces (``grto_agent.trace_every``) show each turn with its loss mask, the calls and the
reward: ``<default_local_dir>/agent_trace/step_<N>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer

from verl_grto.agent.calls import FAILED, CallRecord, FinalMask, calls_of, final_mask
from verl_grto.agent.data import tool_field_problems
from verl_grto.agent.router import start_router
from verl_grto.algorithm.tool_step import (
    group_by_image,
    rollout_rows,
    shard_by_image,
    tool_batch,
    tool_call_weights,
    tool_target,
)
from verl_grto.atomic import atomic_file
from verl_grto.data.masks import decode_rle
from verl_grto.eval.metrics import IoUAccumulator, box_area_ratio
from verl_grto.patches import worker_group_method_name
from verl_grto.reward.answer import ParsedAnswer, ToolPrompt
from verl_grto.reward.geometry import matched_mean_iou, pairwise_box_iou
from verl_grto.reward.mask_reward import score_tool_overlap
from verl_grto.tool.engine import ToolBatch
from verl_grto.trainer.config import AgentConfig
from verl_grto.trainer.grto_trainer import (
    VIEW_FIELDS,
    GRTOTrainer,
    RolloutView,
    ToolPhase,
    as_list,
    put_rewards,
    validation_metrics,
)

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

#: What the multi-turn phases read of a batch from TransferQueue.
AGENT_FIELDS = [*VIEW_FIELDS, "response_mask", "extra_fields"]
TRACE_DIR = "agent_trace"
#: Calls per step whose masks are compared with the tool's masks of the same prompts (``call_mask_agreement``).
CHECKED_CALLS = 16


def turn_runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """``(mask value, start, end)`` of each run of equal values of a response mask, in order."""
    runs: list[tuple[int, int, int]] = []
    for k, m in enumerate(mask):
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1], k + 1)
        else:
            runs.append((int(m), k, k + 1))
    return runs


def last_turn_text(tokens: list[int], mask: list[int], tokenizer: Any) -> str:
    """The policy's last turn (the last run of mask-1 tokens), decoded without special tokens."""
    turns = [(s, e) for m, s, e in turn_runs(mask) if m == 1]
    if not turns:
        return ""
    start, end = turns[-1]
    return tokenizer.decode(tokens[start:end], skip_special_tokens=True)


@dataclass
class Trajectories:
    """A step's trajectories as the multi-turn phases read them: the single-turn view (responses, uids,
    sample ids, ground truths), each response's loss mask, calls, final mask and number of policy turns."""

    view: RolloutView
    masks: list[list[int]]
    calls: list[list[CallRecord]]
    final: list[FinalMask]
    policy_turns: list[int]

    @classmethod
    def read(cls, data: Any, tokenizer: Any, final_mode: str) -> Trajectories:
        view = RolloutView(data, tokenizer)
        masks = [m.tolist() for m in data["response_mask"].unbind()]
        calls = [calls_of(e if isinstance(e, dict) else {}) for e in as_list(data["extra_fields"])]
        final = [
            final_mask(c, last_turn_text(t, m, tokenizer), gt.answer_frame, gt.image_size, final_mode)
            for c, t, m, gt in zip(calls, view.response_tokens, masks, view.ground_truths, strict=True)
        ]
        turns = [sum(1 for v, _, _ in turn_runs(m) if v == 1) for m in masks]
        return cls(view, masks, calls, final, turns)

    def __len__(self) -> int:
        return len(self.final)

    def check_tool(self) -> None:
        """Stop when the tool failed on a call (not the policy's fault): training on masks that were never
        made would be silently wrong."""
        failed = [(i, c) for i, calls in enumerate(self.calls) for c in calls if c.kind == FAILED]
        if failed:
            i, call = failed[0]
            raise RuntimeError(
                f"the segmentation tool failed on {len(failed)} call(s) of this batch, e.g. trajectory {i} "
                f"(sample {self.view.sample_ids[i]}) call {call.index}: {call.error}"
            )


@dataclass
class ToolRows:
    """The tool's rows of a step: every valid call of every trajectory, plus the answer's prompts for a
    trajectory whose final mask is its answer's, plus one empty row for a trajectory with no mask at all
    (scored as the missing prediction). ``final_row[i]`` / ``first_row[i]``: trajectory i's final mask's
    row and its first mask's row (its first valid call's; its final row when it made none)."""

    trajectory: list[int] = field(default_factory=list)
    prompts: list[list[ToolPrompt]] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    call: list[int | None] = field(default_factory=list)
    final_row: list[int] = field(default_factory=list)
    first_row: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trajectory)

    def _add(self, i: int, prompts: list[ToolPrompt], kind: str, call: int | None = None) -> int:
        self.trajectory.append(i)
        self.prompts.append(prompts)
        self.kind.append(kind)
        self.call.append(call)
        return len(self.trajectory) - 1

    @classmethod
    def of(cls, traj: Trajectories) -> ToolRows:
        rows = cls()
        for i, (calls, final) in enumerate(zip(traj.calls, traj.final, strict=True)):
            by_call = {c.index: rows._add(i, [c.prompt()], "call", c.index) for c in calls if c.ok}  # type: ignore[list-item]
            if final.source == "call":
                final_row = by_call[final.call_index]  # type: ignore[index]
            else:
                final_row = rows._add(i, list(final.prompts), final.source)
            rows.final_row.append(final_row)
            rows.first_row.append(min(by_call.values()) if by_call else final_row)
        return rows


@dataclass
class AgentPhase(ToolPhase):
    """Phase 1's result in multi-turn: :class:`ToolPhase` whose "rollouts" are the tool rows, plus the rows
    and the trajectories they come from."""

    rows: ToolRows = field(default_factory=ToolRows)
    traj: Trajectories | None = None


@register_trainer("grto_agent")
class GRTOAgentTrainer(GRTOTrainer):
    initial_validation_label = "before GRTO"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.agent = AgentConfig.from_config(config.get("grto_agent"))
        self.router: Any = None

    # ---- set-up: rows routed to the tool-calling loop; the router the calls reach the tool through --
    def _check_data(self) -> None:
        """The grto checks, then every row must carry the tool fields (:mod:`verl_grto.agent.data`): a row
        without them would run single-turn and never call the tool."""
        super()._check_data()
        problems = [
            p for f in self._data_files("train_files") + self._data_files("val_files") for p in tool_field_problems(f)
        ]
        if problems:
            raise ValueError("rows without the segmentation tool's fields:\n" + "\n".join(problems[:10]))

    def _init_tool(self) -> None:
        ready = self._tool_ready
        super()._init_tool()
        if not ready:
            files = self._data_files("train_files") + self._data_files("val_files")
            method = worker_group_method_name(self.tool_wg, "tool_predict")
            self.router = start_router(self.tool_wg.workers, method, files, self.agent.router_max_batch)
            logger.info("tool router started: %d tool ranks, method %s", len(self.tool_wg.workers), method)

    # ---- the tool rows of a batch, sharded over the tool's ranks -----------------------------
    def _row_shards(self, traj: Trajectories, rows: ToolRows) -> tuple[list[ToolBatch], list[list[int]]]:
        view = traj.view
        sample_of = [view.sample_ids[i] for i in rows.trajectory]
        groups = group_by_image(self.image_store.keys(sample_of))
        shards = shard_by_image(groups, self.tool_wg.world_size)

        def target_of(r: int) -> tuple[str, Any]:
            i = rows.trajectory[r]
            return view.sample_ids[i], tool_target(view.ground_truths[i])

        batches = [tool_batch(shard, rows.prompts.__getitem__, target_of) for shard in shards]
        return batches, [rollout_rows(shard) for shard in shards]

    @staticmethod
    def _final_answer(final: FinalMask) -> ParsedAnswer:
        """The final mask's prompts as the reward reads them: its format term is the trajectory's last turn's."""
        reason = "" if final.prompts else (final.answer.reason or "no mask: no valid call and no answer")
        return ParsedAnswer(final.prompts if not reason else (), final.well_formed, reason)

    # ---- phase 1: every call's mask, the final masks' rewards --------------------------------
    def _tool_rewards(self, batch: Any, metrics: dict) -> AgentPhase:
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=[*AGENT_FIELDS, "rm_scores"]
        )
        traj = Trajectories.read(data, self.tokenizer, self.agent.final_mask)
        traj.check_tool()
        rows = ToolRows.of(traj)
        batches, shard_rows = self._row_shards(traj, rows)
        # the cache still holds the features the step's calls computed (cleared after the last step's update);
        # the masks of a few calls come back, to compare with the masks the policy was shown
        checked = [r for r, k in enumerate(rows.kind) if k == "call"][:CHECKED_CALLS]
        scores = self._score(batches, shard_rows, len(rows), checked)
        ious = scores.ious
        reward_cfg = self.grto.reward
        view = traj.view
        breakdowns, rewards, penalties = [], [], []
        for i, (final, gt) in enumerate(zip(traj.final, view.ground_truths, strict=True)):
            r = rows.final_row[i]
            b = score_tool_overlap(
                self._final_answer(final), int(scores.intersection[r]), int(scores.union[r]), gt, reward_cfg
            )
            penalty = float(sum(c.penalty for c in traj.calls[i]))
            breakdowns.append(b)
            penalties.append(penalty)
            rewards.append(b.score - penalty)
        put_rewards(batch, data["rm_scores"], rewards)
        parse_ok = [len(p) > 0 for p in rows.prompts]
        phase = AgentPhase(view, rows.prompts, parse_ok, batches, shard_rows, ious, rows=rows, traj=traj)
        metrics.update(self._step_metrics(traj, rows, ious, breakdowns, rewards, penalties))
        if checked:
            metrics["grto/agent/call_mask_agreement"] = self._mask_agreement(traj, rows, checked, scores.masks)
        if self.agent.trace_every and self.global_steps % self.agent.trace_every == 0:
            self._write_trace(traj, rows, ious, rewards)
        return phase

    @staticmethod
    def _mask_agreement(traj: Trajectories, rows: ToolRows, checked: list[int], masks: dict[int, Any]) -> float:
        """Mean IoU between the masks the policy was shown (the calls' records, made through the router
        during the rollout) and the tool's masks for the same prompts now, before its update: 1 when the
        calls were served by the weights the step trains (the empty-mask rule for two empty masks)."""
        ious = []
        for r in checked:
            record = next(c for c in traj.calls[rows.trajectory[r]] if c.index == rows.call[r])
            shown, now = decode_rle(record.mask_rle), decode_rle(masks[r])  # type: ignore[arg-type]
            union = int((shown | now).sum())
            ious.append(1.0 if union == 0 else int((shown & now).sum()) / union)
        return float(np.mean(ious))

    def _step_metrics(
        self, traj: Trajectories, rows: ToolRows, ious: np.ndarray, breakdowns: list, rewards: list, penalties: list
    ) -> dict[str, float]:
        calls = [len(c) for c in traj.calls]
        valid = [sum(c.ok for c in cs) for cs in traj.calls]
        with_call = [i for i, v in enumerate(valid) if v]
        sources = [f.source for f in traj.final]
        out = {
            "grto/reward/score": float(np.mean(rewards)),
            "grto/reward/mask_iou": float(np.mean([b.mask_iou for b in breakdowns])),
            "grto/reward/format_reward": float(np.mean([b.format_reward for b in breakdowns])),
            "grto/agent/penalty": float(np.mean(penalties)),
            "grto/agent/calls": float(sum(calls)),
            "grto/agent/valid_calls": float(sum(valid)),
            "grto/agent/calls_per_trajectory": float(np.mean(calls)),
            "grto/agent/invalid_call_fraction": float(1 - sum(valid) / sum(calls)) if sum(calls) else 0.0,
            "grto/agent/multi_turn_fraction": float(np.mean([t >= 2 for t in traj.policy_turns])),
            "grto/agent/policy_turns": float(np.mean(traj.policy_turns)),
            "grto/agent/tool_rows": float(len(rows)),
            "grto/agent/call_rows": float(sum(k == "call" for k in rows.kind)),
            "grto/agent/final_from_call": float(np.mean([s == "call" for s in sources])),
            "grto/agent/final_from_answer": float(np.mean([s == "answer" for s in sources])),
            "grto/agent/no_mask": float(np.mean([s == "none" for s in sources])),
        }
        if with_call:
            out["grto/agent/first_call_iou"] = float(np.mean([ious[rows.first_row[i]] for i in with_call]))
            out["grto/agent/final_iou"] = float(np.mean([ious[rows.final_row[i]] for i in with_call]))
        return out

    def _write_trace(self, traj: Trajectories, rows: ToolRows, ious: np.ndarray, rewards: list[float]) -> None:
        """The first ``trace_rows`` trajectories, turn by turn: each run of the loss mask decoded (special
        tokens kept, a run of image pads shown once as ``<|image_pad|>xN``), the calls, the final mask's
        source and IoU, the reward."""
        out = []
        for i in range(min(self.agent.trace_rows, len(traj))):
            tokens, mask = traj.view.response_tokens[i], traj.masks[i]
            segments = []
            for m, s, e in turn_runs(mask):
                text = self.tokenizer.decode(tokens[s:e], skip_special_tokens=False)
                segments.append({"loss_mask": m, "tokens": e - s, "text": _collapse_pads(text)})
            calls = [{k: v for k, v in c.as_dict().items() if k != "mask_rle"} for c in traj.calls[i]]
            final = traj.final[i]
            out.append(
                {
                    "sample_id": traj.view.sample_ids[i],
                    "uid": traj.view.uids[i],
                    "segments": segments,
                    "calls": calls,
                    "call_ious": [float(ious[r]) for r in range(len(rows)) if rows.trajectory[r] == i],
                    "final_source": final.source,
                    "final_iou": float(ious[rows.final_row[i]]),
                    "reward": float(rewards[i]),
                }
            )
        path = os.path.join(self.config.trainer.default_local_dir, TRACE_DIR, f"step_{self.global_steps}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(out, indent=1))

    # ---- phase 2: weights of the rows from their trajectories' advantages ---------------------
    def _tool_weights(self, phase: ToolPhase, batch: Any) -> np.ndarray:
        assert isinstance(phase, AgentPhase) and phase.traj is not None
        view = phase.view
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["advantages"])
        # GRPO's advantage is one number per trajectory, on every token the policy wrote (the first is one)
        seq_adv = np.array([float(a[0]) if a.numel() else 0.0 for a in data["advantages"].unbind()])
        weights = tool_call_weights(
            self.grto.weighting,
            phase.rows.trajectory,
            phase.rows.prompts,
            [gt.boxes for gt in view.ground_truths],
            call_weighting=self.agent.call_weighting,
            min_box_iou=self.grto.min_box_iou,
            advantages=seq_adv,
            group_ids=view.uids,
        )
        self._row_weights = weights
        return weights

    def _finish_tool_update(self, phase: ToolPhase, weights: np.ndarray, pending: list[Any], metrics: dict) -> None:
        super()._finish_tool_update(phase, weights, pending, metrics)
        if isinstance(phase, AgentPhase):
            kinds = np.array(phase.rows.kind)
            metrics["grto/agent/rows_trained"] = float((weights > 0).sum())
            metrics["grto/agent/calls_trained"] = float(((weights > 0) & (kinds == "call")).sum())

    # ---- validation: the final masks of greedy trajectories ----------------------------------
    def _validate(self) -> dict[str, float]:
        """gIoU / cIoU of the greedy trajectories' final masks (the tool's workers count them), beside
        filling the final prompts' boxes, and what stopping at the first valid call would have scored
        (``val-agent/first_call_gIoU``: the same trajectories, each scored by its first mask)."""
        self._init_tool()
        start = time.perf_counter()
        final_acc, fill_acc, first_acc = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
        has_mask: list[bool] = []
        box_ious: list[float] = []
        area_ratios: list[float] = []
        calls: list[int] = []
        valid: list[int] = []
        turns: list[int] = []
        self.tool_wg.tool_begin_step()
        for batch_dict in self.val_dataloader:
            meta = self.generate_batch(batch_dict, validate=True)
            data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=AGENT_FIELDS)
            tq.kv_clear(keys=meta.keys, partition_id=meta.partition_id)
            traj = Trajectories.read(data, self.tokenizer, self.agent.final_mask)
            traj.check_tool()
            rows = ToolRows.of(traj)
            batches, shard_rows = self._row_shards(traj, rows)
            scores = self._score(batches, shard_rows, len(rows), fill_baseline=True)
            assert scores.fill_intersection is not None and scores.fill_union is not None
            for i, (final, gt) in enumerate(zip(traj.final, traj.view.ground_truths, strict=True)):
                r, f = rows.final_row[i], rows.first_row[i]
                final_acc.add_counts(int(scores.intersection[r]), int(scores.union[r]))
                fill_acc.add_counts(int(scores.fill_intersection[r]), int(scores.fill_union[r]))
                first_acc.add_counts(int(scores.intersection[f]), int(scores.union[f]))
                has_mask.append(bool(final.prompts))
                boxes = [p.box if p.box is not None else (0.0, 0.0, 0.0, 0.0) for p in final.prompts]
                box_ious.append(matched_mean_iou(pairwise_box_iou(boxes, gt.boxes)) if boxes else 0.0)
                ratio = box_area_ratio(self._final_answer(final), gt)
                if ratio is not None:
                    area_ratios.append(ratio)
            calls += [len(c) for c in traj.calls]
            valid += [sum(c.ok for c in cs) for cs in traj.calls]
            turns += traj.policy_turns
        self.tool_wg.tool_begin_step()
        metrics = validation_metrics(final_acc, fill_acc, has_mask, box_ious, area_ratios)
        metrics["val-agent/first_call_gIoU"] = first_acc.results()["gIoU"]
        metrics["val-agent/calls_per_trajectory"] = float(np.mean(calls))
        metrics["val-agent/valid_calls_per_trajectory"] = float(np.mean(valid))
        metrics["val-agent/multi_turn_fraction"] = float(np.mean([t >= 2 for t in turns]))
        self._record_validation(metrics, start)
        return metrics


def _collapse_pads(text: str, pad: str = "<|image_pad|>") -> str:
    """``text`` with each run of image pad tokens written once with its length (``<|image_pad|>x64``)."""
    out, k = [], 0
    while k < len(text):
        if text.startswith(pad, k):
            n = 0
            while text.startswith(pad, k):
                k += len(pad)
                n += 1
            out.append(f"{pad}x{n}")
        else:
            out.append(text[k])
            k += 1
    return "".join(out)
