"""The trained tiny assets shipped in the package: current, small, loadable, rebuildable, and as good as claimed.

The main job and the e2e tests use them (no minutes of training first); ``verl-grto assets --ship``
rebuilds them. These tests fail when a builder's version is bumped without re-shipping, and measure
what the shipped models do on held-out scenes (the issue's bars: the reference policy localises on the
RL domain; the tool beats box fill on plain scenes and loses clearly on the shifted domain).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor, Sam2Model

from verl_grto.assets import shipped, tool_pretrain, warmstart
from verl_grto.assets.build import AssetPaths
from verl_grto.assets.shipped import MANIFEST_NAME, SHIPPED_DIR, USE_SHIPPED_ENV
from verl_grto.assets.tool_pretrain import (
    PRETRAINED_TOOL_DIR,
    ensure_pretrained_tool,
    evaluate_tool,
    pretrain_tool,
    pretrained_tool_stamp,
)
from verl_grto.assets.warmstart import WARM_POLICY_DIR, ensure_warm_policy, warm_policy_stamp, warm_start_policy
from verl_grto.atomic import read_stamp
from verl_grto.eval.policy_probe import probe_policy

SEED0 = SHIPPED_DIR / "seed0"
POLICY = SEED0 / WARM_POLICY_DIR
TOOL = SEED0 / PRETRAINED_TOOL_DIR
#: The issue's budget for everything shipped.
MAX_SHIPPED_BYTES = 10 * 1024 * 1024


def test_shipped_assets_are_current_and_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(USE_SHIPPED_ENV, raising=False)
    assert read_stamp(POLICY) == warm_policy_stamp(0), "re-ship: verl-grto assets --ship (see MANIFEST.json)"
    assert read_stamp(TOOL) == pretrained_tool_stamp(0), "re-ship: verl-grto assets --ship (see MANIFEST.json)"
    assert ensure_warm_policy(None, seed=0) == POLICY
    assert ensure_pretrained_tool(None, seed=0) == TOOL
    manifest = json.loads((SEED0 / MANIFEST_NAME).read_text())
    assert "assets" in manifest["command"] and "--ship" in manifest["command"] and manifest["seed"] == 0
    assert manifest["assets"] == {WARM_POLICY_DIR: read_stamp(POLICY), PRETRAINED_TOOL_DIR: read_stamp(TOOL)}
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert total <= MAX_SHIPPED_BYTES, total
    assert all(p.suffix != ".bin" for p in SHIPPED_DIR.rglob("*"))  # safetensors only, never pickles


def test_switching_shipping_off_builds_instead(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(USE_SHIPPED_ENV, "0")
    monkeypatch.setenv("VERL_GRTO_HOME", str(tmp_path / "home"))
    assert shipped.shipped_asset(WARM_POLICY_DIR, 0, warm_policy_stamp(0)) is None
    built: list[str] = []
    monkeypatch.setattr(warmstart, "warm_start_policy", lambda base, out, seed=0: built.append("policy"))
    monkeypatch.setattr(tool_pretrain, "pretrain_tool", lambda base, out, seed=0, steps=0: built.append("tool"))
    assert ensure_warm_policy(None, seed=0).is_relative_to(tmp_path / "home")
    assert ensure_pretrained_tool(None, seed=0).is_relative_to(tmp_path / "home")
    assert built == ["policy", "tool"]


def test_a_short_rebuild_gives_the_same_model_files_but_the_weights(tiny_assets: AssetPaths, tmp_path: Path) -> None:
    """What ``verl-grto assets --ship`` runs, for a few steps: same architecture, tokenizer and processor."""
    warm_start_policy(tiny_assets.policy, tmp_path / "policy", seed=0, steps=2, batch_size=2, eval_n=0)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "policy" / name).read_bytes() == (POLICY / name).read_bytes(), name
    pretrain_tool(tiny_assets.tool, tmp_path / "tool", seed=0, steps=2)
    rebuilt = json.loads((tmp_path / "tool" / "config.json").read_text())
    assert rebuilt == json.loads((TOOL / "config.json").read_text())


def test_the_shipped_reference_policy_localises_on_the_rl_domain() -> None:
    """Greedy answers on 64 held-out single-object camouflage scenes, beside the trivial baselines."""
    result = probe_policy(POLICY, seed=0, n=64, domain="camouflage")
    assert result.parse_rate >= 0.95, result
    assert result.mean_iou >= 0.5, result
    assert result.mean_iou >= result.mean_box_iou + 0.2, result  # far above a constant box
    assert result.distinct_responses >= 32, result  # answers follow the image


def test_the_shipped_tool_segments_plain_scenes_and_the_shift_is_real() -> None:
    """Masks from exact boxes on 64 held-out scenes of each domain, beside box fill."""
    model = Sam2Model.from_pretrained(str(TOOL)).float()
    plain_iou, plain_fill = evaluate_tool(model, "plain", seed=0)
    camo_iou, _ = evaluate_tool(model, "camouflage", seed=0)
    assert plain_iou >= plain_fill + 0.15, (plain_iou, plain_fill)
    assert camo_iou <= plain_iou - 0.15, (camo_iou, plain_iou)


def test_shipped_policy_loads_through_the_auto_classes() -> None:
    model = AutoModelForImageTextToText.from_pretrained(POLICY)
    processor = AutoProcessor.from_pretrained(POLICY)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert processor.tokenizer.pad_token == "<|endoftext|>"
