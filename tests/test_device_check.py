"""The GPU check's dry run: the same code on tiny configs on the CPU, in a Python that cannot import verl.

The GPU machines this check is written for have torch and transformers but no verl, Ray or vLLM, so
the dry run is run with those three blocked (an import hook raising ModuleNotFoundError, as a
missing package does), and the test fails if any of them was loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from verl_grto.data.frame import ResizeLimits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu/device_check.py"
BLOCKED = ("verl", "ray", "vllm")
RUNNER = f"""
import importlib.abc, runpy, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("LOADED:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_dry_run_writes_the_report_without_verl(tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(runner), str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED: []" in proc.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    tool, policy, est = report["tool"], report["policy"], report["estimates"]
    assert policy["dtype"] == "bfloat16"
    # the tool as the trainer runs it (the full-size recipe's settings): fp32 decoder, bf16 encoder
    assert (tool["decoder_dtype"], tool["encoder_dtype"]) == ("float32", "bfloat16")
    assert tool["rollouts"] == tool["images"] * tool["group"]
    assert tool["phase_images_encoded"] == tool["images"]  # the cache: each image encoded once per step
    assert tool["update_skipped"] == 0  # every shard's update stepped the tool
    assert 0 < tool["trainable_parameters"] < tool["parameters"]  # the mask decoder only, as the recipes train it
    for key in ("encoder_s_per_image", "decoder_fwd_bwd_s_per_rollout", "phase_s", "floor_s"):
        assert tool[key] > 0, key
    assert policy["generate_s"] > 0 and policy["actor_fwd_bwd_s"] > 0 and policy["image_tokens"] > 0
    assert 0 < est["tool_fraction_of_step"] < 1


def test_the_default_policy_image_is_the_recipes_frame() -> None:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ResizeLimits().size(1300, 2000) == module.RECIPE_FRAME_HW
    args = module.parse_args([])
    assert tuple(args.image_hw) == module.RECIPE_FRAME_HW
    assert (args.images, args.group, args.shard_images) == (128, 8, 16)
