"""``verl-grto``: a thin command line over the package. Each command imports lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_doctor(args: argparse.Namespace) -> int:
    from verl_grto.doctor import run_doctor

    return run_doctor()


def _cmd_assets(args: argparse.Namespace) -> int:
    from verl_grto.assets.build import build_assets

    paths = build_assets(Path(args.out), seed=args.seed)
    print(json.dumps({"policy": str(paths.policy), "tool": str(paths.tool)}, indent=2))
    return 0


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from verl_grto.data.synthetic import write_synthetic

    paths = write_synthetic(
        Path(args.out),
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        domain=args.domain,
        size=args.size,
        max_objects=args.max_objects,
        min_objects=args.min_objects,
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verl-grto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check, in a fresh process, that verl loads everything this plugin registers")
    doctor.set_defaults(func=_cmd_doctor)

    assets = sub.add_parser("assets", help="build the tiny Qwen2.5-VL policy and tiny SAM2 tool locally")
    assets.add_argument("--out", required=True, help="output folder (gets tiny_qwen25vl/ and tiny_sam2/)")
    assets.add_argument("--seed", type=int, default=0)
    assets.set_defaults(func=_cmd_assets)

    data = sub.add_parser("data", help="datasets in verl's RL parquet format")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synthetic = data_sub.add_parser("synthetic", help="generate the synthetic referring-segmentation world")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--n-train", type=int, required=True)
    synthetic.add_argument("--n-val", type=int, required=True)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--domain", choices=["plain", "camouflage"], default="plain")
    synthetic.add_argument("--size", type=int, default=112, help="image side in pixels")
    synthetic.add_argument("--max-objects", type=int, default=4)
    synthetic.add_argument("--min-objects", type=int, default=2)
    synthetic.set_defaults(func=_cmd_data_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
