"""Building the BTO buffer: G answers per dataset row from a ``generate_fn``, parsed and stored
(docs/method.md, "BTO in code", step 1). Resumable: rows already in the buffer are skipped."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from verl_grto.algorithm.bto import PROGRESS_INTERVAL_S, chunks
from verl_grto.algorithm.bto.buffer import BufferMeta, BufferRecord, RolloutBuffer, prompts_to_json
from verl_grto.data.schema import GroundTruth
from verl_grto.eval.inference import REASONING_ANSWER_MAX_NEW_TOKENS
from verl_grto.faults import kill_point
from verl_grto.reward.frame import parse_policy_answer

logger = logging.getLogger(__name__)


class Rollout(NamedTuple):
    """One sampled answer: its text (decoded as verl's reward manager does), per-token log-probs, tokens."""

    text: str
    logprobs: Sequence[float]
    token_ids: Sequence[int] = ()


#: ``generate_fn(rows, n)``: for each dataset row (a verl RL parquet row as a dict), ``n`` answers as
#: :class:`Rollout` or plain ``(text, logprobs)`` tuples.
GenerateFn = Callable[[Sequence[dict[str, Any]], int], Sequence[Sequence[tuple]]]


def _sample_id(row: Mapping[str, Any]) -> str:
    return str(row["extra_info"]["sample_id"])


def make_records(row: Mapping[str, Any], rollouts: Sequence[tuple]) -> list[BufferRecord]:
    """Parse one row's answers into buffer records (the parser never raises; failures keep their reason).
    The records keep the row's ground truth with its ignore region, wherever the row held it
    (:meth:`GroundTruth.from_row`), so BTO's tool loss leaves those pixels out as GRTO's does."""
    gt = GroundTruth.from_row(row["reward_model"]["ground_truth"], row.get("extra_info"))
    gt_json = gt.to_json()
    sid = _sample_id(row)
    records = []
    for k, raw in enumerate(rollouts):
        rollout = Rollout(*raw)
        parsed = parse_policy_answer(rollout.text, gt)  # prompts in the image's frame, as the tool reads them
        records.append(
            BufferRecord(
                sample_id=sid,
                uid=sid,
                rollout_index=k,
                answer=rollout.text,
                prompts=prompts_to_json(parsed.objects),
                parse_ok=parsed.ok,
                parse_reason=parsed.reason,
                logprobs=[float(v) for v in rollout.logprobs],
                response_ids=[int(v) for v in rollout.token_ids],
                ground_truth=gt_json,
            )
        )
    return records


def build_buffer(
    rows: Iterable[dict[str, Any]],
    generate_fn: GenerateFn,
    group_size: int,
    out_dir: str | Path,
    *,
    reference_policy: str,
    seed: int = 0,
    sampling: Mapping[str, Any] | None = None,
    chunk_size: int = 8,
    save_every: int = 64,
    progress: bool = True,
) -> RolloutBuffer:
    """Sample ``group_size`` answers per row not yet in ``out_dir``'s buffer, parse and store them.

    Resumable: a buffer already in ``out_dir`` (from a crashed or shorter build) is loaded and its
    rows are skipped; its sidecar must name the same reference policy, G, seed and sampling settings,
    since one buffer must hold samples of one policy. Rows go to ``generate_fn`` ``chunk_size`` at a
    time; a part is written every ``save_every`` rows, so a crash loses at most that many rows'
    answers. The result is consolidated into ``rollouts.parquet``. A resumed build equals an
    uninterrupted one when ``generate_fn`` is a function of the row (e.g. seeded per sample, as
    :func:`hf_generate_fn` is); rows listed twice are sampled once.
    """
    if group_size < 1 or chunk_size < 1 or save_every < 1:
        raise ValueError(
            f"group_size, chunk_size and save_every must be positive: {group_size}, {chunk_size}, {save_every}"
        )
    out_dir = Path(out_dir)
    meta = BufferMeta(
        reference_policy=str(reference_policy),
        group_size=group_size,
        seed=seed,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sampling=dict(sampling or {}),
    )
    if RolloutBuffer.exists(out_dir):
        buffer = RolloutBuffer.load(out_dir)
        if not buffer.meta.same_source(meta):
            raise ValueError(f"{out_dir} holds a buffer of another source: {buffer.meta} (asked {meta})")
        logger.info("resuming the buffer in %s: %d rollouts already there", out_dir, len(buffer))
    else:
        buffer = RolloutBuffer(meta)
    done = buffer.done_sample_ids()

    def pending() -> Iterator[dict[str, Any]]:
        for row in rows:
            sid = _sample_id(row)
            if sid not in done:
                done.add(sid)
                yield row

    total = len(rows) if isinstance(rows, Sequence) else None
    bar = tqdm(
        total=total,
        initial=len(buffer.done_sample_ids()),
        desc="BTO buffer",
        unit="row",
        disable=not progress,
        mininterval=PROGRESS_INTERVAL_S,
    )
    unsaved = 0
    try:
        for chunk in chunks(pending(), chunk_size):
            outputs = generate_fn(chunk, group_size)
            if len(outputs) != len(chunk) or any(len(o) != group_size for o in outputs):
                raise ValueError(
                    f"generate_fn returned {[len(o) for o in outputs]} answers for {len(chunk)} rows x {group_size}"
                )
            buffer.append(r for row, rollouts in zip(chunk, outputs, strict=True) for r in make_records(row, rollouts))
            unsaved += len(chunk)
            bar.update(len(chunk))
            if unsaved >= save_every:
                buffer.save_partial(out_dir)
                unsaved = 0
                kill_point("bto.buffer.part_saved")
    except BaseException:
        buffer.save_partial(out_dir)  # keep what was generated before the error (a hard kill loses < save_every rows)
        raise
    finally:
        bar.close()
    buffer.save(out_dir)
    return buffer


def _row_seed(seed: int, sample_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode())) % (2**63)


def hf_generate_fn(
    policy_dir: str | Path,
    *,
    max_new_tokens: int = REASONING_ANSWER_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int = 0,
) -> GenerateFn:
    """A ``generate_fn`` for CPU and tests: the ``hf`` rollout server (:class:`HFRolloutServer`) sampling
    in-process, prompts built as verl's agent loop builds them (:mod:`verl_grto.policy.inputs`).

    Log-probs are the server's (log-softmax of the temperature-scaled logits of each sampled token,
    the quantity verl's actor recomputes). The sampler is reseeded from (``seed``, sample id) for
    every row, so a row's answers do not depend on the rows before it and a resumed
    :func:`build_buffer` reproduces an uninterrupted one.
    """
    from verl_grto.policy.inputs import render_row
    from verl_grto.rollout.hf_server import HFRolloutServer  # imports ray and verl: only when used

    server = HFRolloutServer(str(policy_dir), {"response_length": max_new_tokens, "prompt_length": 1 << 20}, seed=seed)
    params = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_new_tokens,
        "logprobs": True,
    }

    async def sample(ids: list[int], images: list[Any], n: int, sid: str) -> list[Any]:
        # the row's n answers are sent at once: the server samples them in one batched call, from the
        # row's own seed, so a row's answers do not depend on which rows came before it
        return await asyncio.gather(
            *[
                server.generate(
                    prompt_ids=ids, sampling_params=dict(params), request_id=f"{sid}/{k}", image_data=images
                )
                for k in range(n)
            ]
        )

    def generate(rows: Sequence[dict[str, Any]], n: int) -> list[list[Rollout]]:
        out = []
        for row in rows:
            ids, images = render_row(row, server.processor)
            server.reseed(_row_seed(seed, _sample_id(row)))
            outputs = asyncio.run(sample(ids, images, n, _sample_id(row)))
            out.append(
                [
                    Rollout(
                        server.tokenizer.decode(o.token_ids, skip_special_tokens=True),
                        list(o.log_probs),
                        list(o.token_ids),
                    )
                    for o in outputs
                ]
            )
        return out

    return generate
