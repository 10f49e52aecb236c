"""Throughput of the ``hf`` rollout server: concurrent requests batched vs answered one at a time.

    .venv/bin/python benchmarks/rollout_batching.py [--requests 64] [--threads 2]

Sends ``--requests`` prompts (synthetic scenes, the tiny warm policy, the main job's sampling and
48-token limit) to one :class:`verl_grto.rollout.hf_server.HFRolloutServer` at once, as verl's agent
loop sends a batch's samples, twice: with ``max_num_seqs=1`` (every request its own ``generate``
call, the server before batching) and with the default. Prints answers per second of each and their
ratio, measured in one run. A measurement, not a test: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import torch

from verl_grto.assets.warmstart import ensure_warm_policy
from verl_grto.data.synthetic import generate_split
from verl_grto.policy.inputs import render_row
from verl_grto.rollout.hf_server import HFRolloutServer

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": 48}


def answers_per_second(server: HFRolloutServer, prompts: list) -> tuple[float, int]:
    async def run() -> list:
        return await asyncio.gather(
            *[
                server.generate(prompt_ids=ids, sampling_params=dict(SAMPLING), request_id=str(k), image_data=images)
                for k, (ids, images) in enumerate(prompts)
            ]
        )

    before = server.batches_run
    start = time.perf_counter()
    outputs = asyncio.run(run())
    seconds = time.perf_counter() - start
    assert len(outputs) == len(prompts)
    return len(prompts) / seconds, server.batches_run - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    policy = ensure_warm_policy(seed=0)
    config = {"response_length": 48, "prompt_length": 4096}
    servers = {
        "one at a time": HFRolloutServer(str(policy), {**config, "max_num_seqs": 1}, seed=0),
        "batched": HFRolloutServer(str(policy), config, seed=0),
    }
    rows = generate_split(args.requests, 0, "camouflage", "val", max_objects=1, min_objects=1)
    any_server = next(iter(servers.values()))
    prompts = []
    for row in rows:
        record = row.to_record()
        prompts.append(render_row(record, any_server.processor))

    rates = {}
    for name, server in servers.items():
        answers_per_second(server, prompts[:4])  # warm-up
        rates[name], calls = answers_per_second(server, prompts)
        print(f"{name:14}: {rates[name]:6.2f} answers/s ({args.requests} requests, {calls} generate calls)")
    print(f"ratio batched / one at a time: {rates['batched'] / rates['one at a time']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
