"""Memory of the ``hf`` rollout server under load: peak RSS with 512 concurrent requests against 64.

    .venv/bin/python benchmarks/rollout_load.py [--max-num-seqs 64] [--threads 1] [--out FILE.json]

Each case runs in a fresh process (one :class:`verl_grto.rollout.hf_server.HFRolloutServer`, the
tiny warm policy, camouflage scenes, sampling, up to 48 tokens): its resident memory is sampled every
5 ms while the requests are answered, all sent at once as verl's agent loop sends a batch's samples.
The cases: 64 and 512 requests with ``max_num_seqs`` = ``--max-num-seqs`` (the claim: the same peak),
and 512 requests with ``max_num_seqs`` = 512 (what the bound saves). Growth = peak during the requests
minus the RSS just before them (model loaded, prompts built), so the model's own memory does not
dilute the ratio. Every prompt's images are held by the caller in all cases (as in verl). A
measurement, not a test: this machine is shared and noisy; ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": 48}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _case(requests: int, max_num_seqs: int, threads: int, queue: Any) -> None:
    """One measurement in this (fresh) process; puts its result on ``queue``."""
    import torch

    from verl_grto.assets.warmstart import ensure_warm_policy
    from verl_grto.data.synthetic import generate_split
    from verl_grto.policy.inputs import render_row
    from verl_grto.rollout.hf_server import HFRolloutServer

    torch.set_num_threads(threads)
    config = {"response_length": 48, "prompt_length": 4096, "max_num_seqs": max_num_seqs}
    server = HFRolloutServer(str(ensure_warm_policy(seed=0)), config, seed=0)
    rows = generate_split(64, 0, "camouflage", "val", max_objects=1, min_objects=1)
    distinct = [render_row(row.to_record(), server.processor) for row in rows]
    # mixed prompt lengths: the scenes' expressions differ; each request holds its own copy of the ids
    prompts = [(list(distinct[k % len(distinct)][0]), distinct[k % len(distinct)][1]) for k in range(requests)]

    async def run() -> list:
        return await asyncio.gather(
            *[
                server.generate(prompt_ids=ids, sampling_params=dict(SAMPLING), request_id=str(k), image_data=images)
                for k, (ids, images) in enumerate(prompts)
            ]
        )

    asyncio.run(_warm(server, prompts[:2]))
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    batches = server.batches_run
    start = time.perf_counter()
    outputs = asyncio.run(run())
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    assert len(outputs) == requests and all(o.token_ids for o in outputs)
    queue.put(
        {
            "requests": requests,
            "max_num_seqs": max_num_seqs,
            "rss_before_mb": before / 2**20,
            "peak_rss_mb": peak[0] / 2**20,
            "growth_mb": (peak[0] - before) / 2**20,
            "generate_calls": server.batches_run - batches,
            "seconds": seconds,
        }
    )


async def _warm(server: Any, prompts: list) -> None:
    """One small batch first, so one-off allocations (kernels, caches) are in the baseline."""
    await asyncio.gather(
        *[
            server.generate(prompt_ids=ids, sampling_params=dict(SAMPLING), request_id=f"w{k}", image_data=images)
            for k, (ids, images) in enumerate(prompts)
        ]
    )


def measure(requests: int, max_num_seqs: int, threads: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no memory left over from another case
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(requests, max_num_seqs, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    cases = {
        "64 requests": (64, args.max_num_seqs),
        "512 requests": (512, args.max_num_seqs),
        "512 requests, max_num_seqs 512": (512, 512),
    }
    results = {}
    for name, (requests, seqs) in cases.items():
        r = results[name] = measure(requests, seqs, args.threads)
        print(
            f"{name:32}: peak RSS {r['peak_rss_mb']:7.1f} MB (+{r['growth_mb']:6.1f} MB over {r['rss_before_mb']:.1f}),"
            f" {r['generate_calls']} generate calls, {r['seconds']:.1f} s",
            flush=True,
        )
    small, large, unbounded = results.values()
    summary = {
        "peak_ratio_512_vs_64": large["peak_rss_mb"] / small["peak_rss_mb"],
        "growth_ratio_512_vs_64": large["growth_mb"] / small["growth_mb"],
        "growth_ratio_unbounded_vs_64": unbounded["growth_mb"] / small["growth_mb"],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "cases": results, **summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
