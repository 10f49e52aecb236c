"""``verl-grto``: a thin command line over the package. Each command imports lazily."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any


def _cmd_doctor(args: argparse.Namespace) -> int:
    from verl_grto.doctor import run_doctor

    return run_doctor()


def _cmd_assets(args: argparse.Namespace) -> int:
    from verl_grto.assets.build import build_assets

    paths = build_assets(Path(args.out), seed=args.seed)
    built = {"policy": str(paths.policy), "tool": str(paths.tool)}
    if args.warm_start:
        from verl_grto.assets.warmstart import build_warm_policy

        built["policy_warm"] = str(build_warm_policy(Path(args.out), seed=args.seed))
    if args.pretrain_tool:
        from verl_grto.assets.tool_pretrain import build_pretrained_tool

        built["tool_pretrained"] = str(build_pretrained_tool(paths.tool, seed=args.seed))
    if args.agent_policy:
        from verl_grto.assets.agent_warmstart import build_agent_policy

        base = Path(built["policy_warm"]) if args.warm_start else None
        tool = Path(built["tool_pretrained"]) if args.pretrain_tool else None
        built["policy_agent"] = str(build_agent_policy(paths.policy.parent, args.seed, base, tool))
    if args.ship and not (args.warm_start and args.pretrain_tool) and not args.agent_policy:
        raise SystemExit(
            "assets --ship: ships the trained assets; pass --warm-start and --pretrain-tool (and/or --agent-policy)"
        )
    if args.ship and args.warm_start and args.pretrain_tool:
        from verl_grto.assets.shipped import ship

        reports = {
            "warmstart_report": json.loads((Path(built["policy_warm"]) / "warmstart_report.json").read_text()),
            "pretrain_report": json.loads((Path(built["tool_pretrained"]) / "pretrain_report.json").read_text()),
        }
        shipped = ship([Path(built["policy_warm"]), Path(built["tool_pretrained"])], args.seed, reports)
        built["shipped"] = str(shipped)
    if args.ship and args.agent_policy:  # after ship(), which rewrites the manifest
        from verl_grto.assets.agent_warmstart import REPORT_NAME
        from verl_grto.assets.shipped import ship_extra

        report = json.loads((Path(built["policy_agent"]) / REPORT_NAME).read_text())
        ship_extra(Path(built["policy_agent"]), args.seed, "agent", {"agent_warmstart_report": report})
    print(json.dumps(built, indent=2))
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


class CLIError(Exception):
    """A user error (bad flag, missing or corrupt input): printed as one line, exit status 2, no traceback."""


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from verl_grto.data.convert import CONVERTERS, AnnotationFileError, convert
    from verl_grto.data.convert.options import parse_options

    if args.name not in CONVERTERS:
        raise CLIError(f"unknown dataset {args.name!r}; one of {', '.join(CONVERTERS)}")
    try:
        opts = parse_options(CONVERTERS[args.name], args.opt)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        report = convert(args.name, Path(args.src), Path(args.out), **opts)
    except AnnotationFileError as exc:
        print(f"verl-grto: malformed annotation file, nothing converted: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:  # a release layout not found, an option value refused
        raise CLIError(str(exc)) from None
    print(report.summary())
    return 0


def _cmd_data_add_tool(args: argparse.Namespace) -> int:
    from verl_grto.agent.data import add_tool_fields

    src = _existing(args.src, "file")
    try:
        n = add_tool_fields(src, Path(args.out), agent_name=args.agent_name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps({"rows": n, "out": str(args.out), "agent_name": args.agent_name}))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from verl_grto.data.check import check_parquet

    files = [_existing(f, "file") for f in args.files]  # a mistyped path is a usage error, not a bad row
    n_problems, bad_files, bad_rows = 0, 0, 0
    for path in files:
        problems = check_parquet(path)
        for problem in problems:
            print(problem)
        n_problems += len(problems)
        bad_files += bool(problems)
        bad_rows += len({p.row for p in problems if p.row is not None})
    if bad_files:
        print(
            f"verl-grto: {n_problems} problem(s), {bad_rows} bad row(s), in {bad_files} of {len(files)} file(s)",
            file=sys.stderr,
        )
        return 1
    print(f"verl-grto: every row of {len(files)} file(s) is usable", file=sys.stderr)
    return 0


def _existing(path: str, what: str) -> Path:
    """``path``, or a CLIError naming what is missing (before minutes of model loading, not after)."""
    if not Path(path).exists():
        raise CLIError(f"{what} {path} does not exist")
    return Path(path)


def _dtype(name: str) -> Any:
    """The policy's torch dtype for ``--dtype`` (None: the predictor's default for the device)."""
    import torch

    return None if name == "auto" else {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _models(args: argparse.Namespace, merge_dir: Path) -> tuple[Path, Path | None, Path, dict[str, Any]]:
    """(policy, adapter, tool, what the report records) from ``--checkpoint`` and/or ``--policy`` /
    ``--adapter`` / ``--tool`` (these replace the checkpoint's parts); a LoRA or FSDP-sharded checkpoint's
    policy is merged into ``merge_dir``."""
    from verl_grto.eval.checkpoint import CheckpointError, checkpoint_models

    if args.adapter is not None and args.policy is None:
        raise CLIError("--adapter is a LoRA adapter for --policy (a checkpoint brings its own); give --policy too")
    if args.checkpoint is None and (args.policy is None or args.tool is None):
        raise CLIError("inference needs a policy and a tool: give --checkpoint, or both --policy and --tool")
    described: dict[str, Any] = {}
    policy = None if args.policy is None else _existing(args.policy, "policy")
    adapter = None if args.adapter is None else _existing(args.adapter, "adapter")
    tool = None if args.tool is None else _existing(args.tool, "tool")
    if args.checkpoint is not None and policy is None:  # the policy is merged only when the checkpoint's is used
        try:
            found = checkpoint_models(args.checkpoint, merge_dir)
        except CheckpointError as exc:
            raise CLIError(f"--checkpoint: {exc}") from None
        policy, adapter, tool = found.policy, found.adapter, tool or found.tool
        described = found.describe()
    elif args.checkpoint is not None:
        tool = tool or _checkpoint_tool(args.checkpoint)
        described = {"checkpoint": args.checkpoint}
    assert policy is not None and tool is not None  # every path above set them or raised
    described.update({"policy": str(policy), "adapter": None if adapter is None else str(adapter), "tool": str(tool)})
    return policy, adapter, tool, described


def _policy_predictor(
    args: argparse.Namespace, merge_dir: Path, records_path: Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """The policy + tool predictor the flags name (:func:`_models`), and what the report records of it."""
    from verl_grto.eval.inference import PolicyToolPredictor

    policy, adapter, tool, described = _models(args, merge_dir)
    predictor = PolicyToolPredictor(
        policy,
        tool,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=_dtype(args.dtype),
        records_path=records_path,
        adapter_dir=adapter,
    )
    return predictor, described


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from verl_grto.eval.evaluate import evaluate_predictions, format_table, run_predictions, sample_ids, suite_for

    split = _existing(args.split, "split")
    out = Path(args.out)
    use_policy = any(getattr(args, k) is not None for k in ("checkpoint", "policy", "tool", "adapter"))
    if use_policy == (args.predictions is not None):
        raise CLIError(
            "give either --checkpoint (or --policy and --tool) to run inference, or --predictions to score existing PNGs"
        )
    for flag in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    suite = suite_for(split) if args.suite == "auto" else args.suite
    sections: dict[str, Any] = {}  # added to the report
    if use_policy:
        from verl_grto.eval.inference import read_records, summarize_records

        predictions_dir, records_path = out / "predictions", out / "records.jsonl"
        predictor, sections["models"] = _policy_predictor(args, Path(args.merge_dir or out / "policy"), records_path)
        run_predictions(split, predictor, predictions_dir, batch_size=args.batch_size, limit=args.limit)
        sections["policy"] = summarize_records(read_records(records_path), sample_ids(split, args.limit))
    else:
        predictions_dir = _existing(args.predictions, "predictions folder")
    report = evaluate_predictions(
        split, predictions_dir, suite, out / "report.json", limit=args.limit, sections=sections
    )
    print(format_table(report))
    if "policy" in sections:
        policy = sections["policy"]
        rate = "n/a" if policy["parse_rate"] is None else f"{policy['parse_rate']:.1%}"
        print(f"policy answers parsed: {policy['parsed']}/{policy['answered']} ({rate})")
    print(f"report: {out / 'report.json'}")
    return 0


def _numbers(text: str, n: int, flag: str, form: str) -> list[float]:
    """``n`` finite comma-separated numbers, or a CLIError quoting ``form``."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CLIError(f"{flag} expects {form}, got {text!r}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise CLIError(f"{flag} expects {form}, got {text!r}")
    return values


def _flag_prompt(box: str | None, points: str | None, image_hw: tuple[int, int]) -> Any:
    """The --box / --points object, checked against the image by the answer parser's rules."""
    from verl_grto.reward.answer import ToolPrompt, format_answer, parse_answer

    bbox = None
    if box is not None:
        x1, y1, x2, y2 = _numbers(box, 4, "--box", "x1,y1,x2,y2")
        bbox = (x1, y1, x2, y2)
    pts: list[tuple[float, float]] = []
    for text in points.split(";") if points else []:
        x, y = _numbers(text, 2, "--points", "x,y;x,y;...")
        pts.append((x, y))
    prompt = ToolPrompt(bbox, tuple(pts), (1,) * len(pts))
    parsed = parse_answer(format_answer([prompt]), image_hw)
    if not parsed.ok:
        raise CLIError(
            f"bad --box/--points for the {image_hw[1]}x{image_hw[0]} image: "
            + parsed.reason.removeprefix("answer JSON: ")
        )
    return parsed.objects[0]


def _checkpoint_tool(checkpoint: str) -> Path:
    """The tool folder of ``--checkpoint`` (a ``global_step_N`` or run folder)."""
    from verl_grto.eval.checkpoint import CheckpointError, step_dir

    try:
        return _existing(str(step_dir(checkpoint) / "tool"), "the checkpoint's tool")
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint: {exc}") from None


def _cmd_predict(args: argparse.Namespace) -> int:
    from verl_grto.data.convert.base import RowError, load_image, resize_limits
    from verl_grto.data.frame import PolicyFrame
    from verl_grto.data.schema import build_instruction, build_short_instruction
    from verl_grto.eval.evaluate import write_prediction
    from verl_grto.eval.inference import PromptedToolPredictor, ToolSegmenter, row_rgb
    from verl_grto.eval.overlay import overlay

    if not Path(args.image).is_file():
        raise CLIError(f"image {args.image} does not exist")
    try:
        image = load_image(Path(args.image))  # decoded completely; EXIF-rotated / grey images normalised
    except RowError as exc:
        raise CLIError(f"--image {args.image}: {exc}") from None
    prompted = args.box is not None or args.points is not None
    flag_object = _flag_prompt(args.box, args.points, (image.height, image.width)) if prompted else None
    if not prompted and ((args.policy is None and args.checkpoint is None) or args.prompt is None):
        raise CLIError("without --box/--points, predict needs --prompt and --checkpoint (or --policy and --tool)")
    if prompted and args.tool is None and args.checkpoint is None:
        raise CLIError("--box/--points need a tool: give --tool or --checkpoint")
    with tempfile.TemporaryDirectory(prefix="verl_grto_predict_") as scratch:
        frame = PolicyFrame()
        if flag_object is not None:  # the policy is not needed, so not loaded
            tool = _existing(args.tool, "tool") if args.tool is not None else _checkpoint_tool(args.checkpoint)
            predictor: Any = PromptedToolPredictor(ToolSegmenter(tool, device=args.device or "cpu"), [flag_object])
        else:
            merge_dir = Path(args.merge_dir) if args.merge_dir else Path(scratch) / "policy"
            predictor, _ = _policy_predictor(args, merge_dir)
            frame = PolicyFrame.from_processor(predictor.policy.processor)
        # The policy sees the image resized by these limits with its processor's factor and answers in its
        # family's convention (docs/method.md, "Image frames"); --box/--points are pixels of the image file.
        limits = resize_limits(frame.factor, args.min_pixels, args.max_pixels)
        answer_h, answer_w = limits.size(image.height, image.width)
        row = {
            "prompt": [
                {
                    "role": "user",
                    "content": build_short_instruction(args.prompt or "", frame.coords)
                    if args.instruction == "short"
                    else build_instruction(args.prompt or "", answer_w, answer_h, coords=frame.coords),
                }
            ],
            "images": [{"bytes": image.data, "path": None, **limits.image_keys()}],
            "extra_info": {"sample_id": Path(args.image).stem},
        }
        mask = predictor(row)
    record = predictor.records[-1]
    objects = [flag_object] if flag_object is not None else predictor.parse(row, record.answer, mask.shape).objects
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_prediction(out, mask)
    overlay_path = out.with_name(f"{out.stem}.overlay.png")
    overlay(row_rgb(row), mask, objects).save(overlay_path)
    print(
        json.dumps(
            {
                "mask": str(out),
                "overlay": str(overlay_path),
                "foreground_pixels": int(mask.sum()),
                "answer": record.answer,
                "parse_reason": record.reason,
                "objects_used": record.num_objects,
                "prompt_issues": record.prompt_issues,
            },
            indent=2,
        )
    )
    return 0


def _sam2_config(value: str) -> Any:
    """``--config``: a Meta config name, or a transformers Sam2 ``config.json`` (or its folder) for other shapes."""
    from transformers import Sam2Config

    from verl_grto.tool.configs import META_CONFIG_NAMES, meta_sam2_config

    if value in META_CONFIG_NAMES:
        return meta_sam2_config(value)
    if Path(value).exists():
        try:
            return Sam2Config.from_pretrained(value)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--config {value}: not a transformers Sam2 config ({exc})") from None
    raise CLIError(f"unknown SAM2 config {value!r}; one of {', '.join(META_CONFIG_NAMES)} or a config.json path")


def _conversion_error(exc: Exception) -> str:
    """One line for a conversion failure (a KeyError's str() would wrap its message in quotes)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _cmd_convert_sam2(args: argparse.Namespace) -> int:
    from verl_grto.tool.convert import convert_meta_checkpoint

    checkpoint = _existing(args.checkpoint, "checkpoint")
    config = _sam2_config(args.config)  # checked before the checkpoint is read
    try:
        model = convert_meta_checkpoint(str(checkpoint), config, args.out)
    except (KeyError, ValueError) as exc:  # not a Meta checkpoint, or keys of another model
        raise CLIError(f"--checkpoint {checkpoint}: {_conversion_error(exc)}") from None
    except RuntimeError as exc:  # load_state_dict: shapes of another architecture
        first = str(exc).strip().splitlines()
        raise CLIError(f"--checkpoint {checkpoint} does not fit --config {args.config}: {first[-1].strip()}") from None
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"tool": args.out, "config": args.config, "parameters": params}, indent=2))
    return 0


def _cmd_export_sam2(args: argparse.Namespace) -> int:
    from verl_grto.tool.convert import export_meta_checkpoint

    tool = _existing(args.tool, "tool")
    if not (tool / "config.json").is_file():
        raise CLIError(f"--tool {tool} is not a transformers Sam2 folder (no config.json)")
    base = None if args.base_checkpoint is None else str(_existing(args.base_checkpoint, "base checkpoint"))
    try:
        state = export_meta_checkpoint(str(tool), args.out, base_checkpoint=base)
    except (KeyError, ValueError, OSError) as exc:  # unreadable tool, or a base checkpoint of another model
        raise CLIError(_conversion_error(exc)) from None
    print(json.dumps({"checkpoint": args.out, "keys": len(state), "base_checkpoint": base}, indent=2))
    return 0


def _model_flags(parser: argparse.ArgumentParser, merge_default: str = "<out>/policy") -> None:
    """The flags that name the models: a training checkpoint, or a policy (+ adapter) and a tool."""
    parser.add_argument(
        "--checkpoint",
        help="a training run's checkpoint: verl's global_step_N folder (policy from actor/, tool from tool/), "
        "or the run folder (its latest complete step)",
    )
    parser.add_argument("--policy", help="policy (Hugging Face folder); replaces the checkpoint's")
    parser.add_argument("--adapter", help="a LoRA adapter (PEFT folder) trained on --policy, merged in at load")
    parser.add_argument("--tool", help="tool (transformers Sam2 folder); replaces the checkpoint's")
    parser.add_argument(
        "--merge-dir",
        help="where a checkpoint's policy is merged when it has no full Hugging Face weights (FSDP shards, LoRA); "
        f"default: {merge_default}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verl-grto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser(
        "doctor", help="check, in a fresh process, that verl loads everything this plugin registers"
    )
    doctor.set_defaults(func=_cmd_doctor)

    assets = sub.add_parser("assets", help="build the tiny Qwen2.5-VL policy and tiny SAM2 tool locally")
    assets.add_argument("--out", required=True, help="output folder (gets tiny_qwen25vl/ and tiny_sam2/)")
    assets.add_argument("--seed", type=int, default=0)
    assets.add_argument("--warm-start", action="store_true", help="also the supervised warm-started policy (minutes)")
    assets.add_argument(
        "--pretrain-tool", action="store_true", help="also the tool pre-trained on plain scenes (minutes)"
    )
    assets.add_argument(
        "--agent-policy",
        action="store_true",
        help="also the multi-turn policy: the warm policy taught the segmentation tool's call format (minutes)",
    )
    assets.add_argument(
        "--ship",
        action="store_true",
        help="copy the trained assets into the package (verl_grto/assets/shipped/seed<SEED>/), with a manifest",
    )
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

    conv = data_sub.add_parser("convert", help="convert an official benchmark release to parquet (docs/benchmarks.md)")
    conv.add_argument("name", help="dataset: reasonseg, refcoco, refcoco+, refcocog, cod10k, camo, nc4k, earthreason")
    conv.add_argument("--src", required=True, help="the release folder")
    conv.add_argument("--out", required=True, help="output folder (gets <split>.parquet and conversion_report.json)")
    conv.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a converter option, e.g. splits=val,test or keep_empty=false (repeatable)",
    )
    conv.set_defaults(func=_cmd_data_convert)

    add_tool = data_sub.add_parser(
        "add-tool",
        help="copy a parquet with the fields that route each row through the multi-turn loop with the segmentation "
        "tool (agent_name, extra_info.tools_kwargs.segment)",
    )
    add_tool.add_argument("--src", required=True, help="a parquet of the project's row format")
    add_tool.add_argument("--out", required=True, help="the copy to write")
    add_tool.add_argument(
        "--agent-name", default="grto_tool_agent", help="the agent loop (grto_tool_agent, or verl's tool_agent)"
    )
    add_tool.set_defaults(func=_cmd_data_add_tool)

    check = data_sub.add_parser(
        "check",
        help="decode every row of verl RL parquet files; print file:row: reason per problem, exit 1 if any",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="parquet files (train, val, ...)")
    check.set_defaults(func=_cmd_data_check)

    ev = sub.add_parser(
        "evaluate", help="predict a split with a policy + tool (resumable), or score PNGs; write report.json"
    )
    ev.add_argument("--split", required=True, help="a split parquet")
    _model_flags(ev)
    ev.add_argument("--predictions", help="score the <sample_id>.png in this folder instead of running inference")
    ev.add_argument(
        "--out", required=True, help="output folder: report.json, and predictions/ + records.jsonl when inferring"
    )
    ev.add_argument(
        "--suite",
        choices=["seg", "cod", "auto"],
        default="auto",
        help="metrics: seg (gIoU, cIoU), cod (adds the COD suite), auto (cod for COD releases)",
    )
    ev.add_argument("--limit", type=int, help="only the first N rows")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="the policy's answer budget")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per policy generate call")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the policy's dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    ev.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="segment one image: policy + tool, or the tool alone on --box/--points")
    _model_flags(pr, merge_default="a temporary folder, removed after")
    pr.add_argument("--image", required=True)
    pr.add_argument("--prompt", help="the referring expression (the policy's instruction is built around it)")
    pr.add_argument(
        "--out", required=True, help="mask PNG (0/255, image size); the overlay goes beside it as <stem>.overlay.png"
    )
    pr.add_argument(
        "--instruction",
        choices=["full", "short"],
        default="full",
        help="full: the instruction real datasets' rows carry; short: the tiny world's ('Locate <prompt>.')",
    )
    pr.add_argument("--box", help="x1,y1,x2,y2 in image pixels (x2/y2 exclusive): bypass the policy")
    pr.add_argument("--points", help="x,y;x,y object points in image pixels: bypass the policy")
    pr.add_argument(
        "--min-pixels",
        type=int,
        help="the policy's resize limits (default: the full-size recipes' for the policy's processor factor, "
        "256 to 1280 merged patches); answers are read in the resized frame",
    )
    pr.add_argument("--max-pixels", type=int)
    pr.add_argument("--max-new-tokens", type=int, default=256)
    pr.add_argument("--device", help="cpu or cuda (default: cuda when available, cpu for the tool alone)")
    pr.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the policy's dtype")
    pr.set_defaults(func=_cmd_predict)

    conv_sam2 = sub.add_parser("convert-sam2", help="Meta SAM2 .pt checkpoint -> tool folder (transformers Sam2)")
    conv_sam2.add_argument("--checkpoint", required=True, help="Meta .pt ({'model': state_dict})")
    conv_sam2.add_argument(
        "--config",
        required=True,
        help="Meta config name (sam2.1_hiera_t, _s, _b+, _l; or sam2_...) or a Sam2 config.json",
    )
    conv_sam2.add_argument("--out", required=True, help="output folder (save_pretrained)")
    conv_sam2.set_defaults(func=_cmd_convert_sam2)

    exp_sam2 = sub.add_parser("export-sam2", help="tool folder -> Meta SAM2 .pt checkpoint")
    exp_sam2.add_argument("--tool", required=True, help="tool folder (transformers Sam2, e.g. a saved ToolEngine)")
    exp_sam2.add_argument("--out", required=True, help="output .pt")
    exp_sam2.add_argument(
        "--base-checkpoint",
        help="the Meta .pt the tool came from: its video-memory weights are carried over, "
        "so Meta's build_sam2 loads the result (without it only the image model is written)",
    )
    exp_sam2.set_defaults(func=_cmd_export_sam2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"verl-grto: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
