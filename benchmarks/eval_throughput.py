"""Evaluation throughput (samples/s) of policy + tool inference, split into policy generation and tool decoding.

Run: ``.venv/bin/python benchmarks/eval_throughput.py [--rows 32] [--batch-sizes 1,8] [--policy DIR]``.
Not a test: it prints numbers for one machine and load.

What it measures, on ``--rows`` synthetic val rows with the tiny models (built by ``ensure_assets``
into ``--work``, a temporary folder by default):

* ``evaluate``: the whole :func:`verl_grto.eval.evaluate.run_predictions` path per batch size (prompt
  building, greedy generation, parsing, tool, PNG writing), as samples/s, with the per-sample
  generation and tool time from the predictor's records;
* ``tool on gt boxes``: the tool decoding the ground-truth boxes of the same rows, batched the same
  way. The random tiny policy never writes a parseable answer, so in ``evaluate`` the tool is
  skipped (nothing to decode); this line is what tool decoding costs when every answer parses, and
  the ``gen/tool`` ratio is taken against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated rows per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the tiny recipe's response length")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--policy", help="a policy folder (default: the tiny random policy)")
    parser.add_argument("--work", help="folder for assets, data and predictions (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from verl_grto.assets.build import ensure_assets
    from verl_grto.data.schema import GroundTruth
    from verl_grto.data.synthetic import write_synthetic
    from verl_grto.eval.evaluate import run_predictions
    from verl_grto.eval.inference import PolicyToolPredictor, row_rgb, summarize_records
    from verl_grto.reward.answer import ToolPrompt

    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        assets = ensure_assets(root=work / "assets")
        split = write_synthetic(work / "data", n_train=1, n_val=args.rows, seed=0, domain="plain")["val"]
        rows = pq.read_table(split).to_pylist()
        policy = args.policy or assets.policy
        print(
            f"{len(rows)} rows of {split.name}, policy {policy}, tool {assets.tool}, "
            f"max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}, device cpu"
        )
        print(
            f"{'path':<24}{'batch':>6}{'samples/s':>11}{'gen s/smp':>11}{'tool s/smp':>12}{'gen/tool':>10}{'parsed':>8}"
        )

        tool_per_sample: dict[int, float] = {}
        predictor = PolicyToolPredictor(policy, assets.tool, max_new_tokens=args.max_new_tokens, device="cpu")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            images = [row_rgb(r) for r in rows]
            boxes = [
                [ToolPrompt(tuple(b)) for b in GroundTruth.from_json(r["reward_model"]["ground_truth"]).boxes]
                for r in rows
            ]
            start = time.perf_counter()
            for i in range(0, len(rows), batch):
                predictor.segmenter.segment(images[i : i + batch], boxes[i : i + batch])
            tool_per_sample[batch] = (time.perf_counter() - start) / len(rows)

            predictor.records.clear()
            start = time.perf_counter()
            run_predictions(
                split, predictor, work / f"predictions-b{batch}-{time.time_ns()}", progress=False, batch_size=batch
            )
            wall = time.perf_counter() - start
            summary = summarize_records(
                {r.sample_id: r for r in predictor.records}, [r.sample_id for r in predictor.records]
            )
            gen, tool = summary["generation_s_per_sample"], summary["tool_s_per_sample"]
            ratio = gen / tool_per_sample[batch]
            print(
                f"{'evaluate':<24}{batch:>6}{len(rows) / wall:>11.2f}{gen:>11.4f}{tool:>12.4f}{ratio:>10.1f}"
                f"{summary['parsed']:>5}/{summary['answered']}"
            )
            print(
                f"{'tool on gt boxes':<24}{batch:>6}{1 / tool_per_sample[batch]:>11.2f}{'':>11}"
                f"{tool_per_sample[batch]:>12.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
