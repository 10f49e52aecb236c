"""Warm start: a short supervised run makes the random tiny policy answer in format; saved like the base; deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from verl_grto.assets import warmstart
from verl_grto.assets.build import AssetPaths, ensure_assets
from verl_grto.assets.warmstart import (
    REPORT_NAME,
    WARM_POLICY_DIR,
    answer_target,
    ensure_warm_policy,
    warm_start_policy,
)
from verl_grto.atomic import STAMP_NAME, read_stamp
from verl_grto.data.synthetic import make_sample
from verl_grto.eval.policy_probe import probe_policy
from verl_grto.reward.answer import parse_answer

#: Enough for the format at twice the default learning rate (measured: 100% of 32 held-out answers parse).
SHORT_STEPS = 80
SHORT_LR = 2e-3
PROBE_N = 32


@pytest.fixture(scope="module")
def warm(tiny_assets: AssetPaths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, warmstart.WarmStartReport]:
    out = tmp_path_factory.mktemp("warm") / "policy"
    return out, warm_start_policy(tiny_assets.policy, out, seed=0, steps=SHORT_STEPS, lr=SHORT_LR, eval_n=PROBE_N)


def test_answer_target_is_the_object_box_alone_in_few_tokens(tiny_assets: AssetPaths) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_assets.policy).tokenizer
    lengths = set()
    for i in range(20):
        scene, ref = make_sample(0, "plain", "t", i, max_objects=4)
        target = answer_target(scene, ref)
        parsed = parse_answer(target, (scene.size, scene.size))
        assert parsed.ok and parsed.has_think, parsed.reason
        assert target.startswith("<think></think><answer>")
        assert parsed.objects[0].box == scene.objects[ref.target].box and parsed.objects[0].points == ()
        lengths.add(len(tokenizer(target, add_special_tokens=False)["input_ids"]))
    assert max(lengths) <= 26, lengths  # 38 with a think text and a point: localisation came far later


def test_short_run_turns_unparseable_answers_into_parseable_ones(tiny_assets: AssetPaths, warm) -> None:
    _, report = warm
    before = probe_policy(tiny_assets.policy, seed=0, n=8)
    assert before.parse_rate == 0.0  # the random policy: every GRPO reward would be 0
    after = report.probe
    assert after is not None and after.n == PROBE_N and after.split == before.split
    assert after.parse_rate >= 0.8, after
    assert after.truncated_rate <= 0.2
    assert report.final_loss_mean10 < 0.5 * report.initial_loss
    # baselines are reported on the same scenes (whole-image box is far from a one-object box)
    assert 0.0 < after.whole_image_iou < 0.3 and after.random_object_iou == 1.0


def test_saved_policy_loads_like_the_base(tiny_assets: AssetPaths, warm) -> None:
    out, report = warm
    base = tiny_assets.policy
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    trained, initial = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["steps"] == SHORT_STEPS and saved["probe"]["parse_rate"] == report.probe.parse_rate


def test_same_seed_same_losses_other_seed_other_losses(tiny_assets: AssetPaths, tmp_path: Path) -> None:
    def run(name: str, seed: int) -> warmstart.WarmStartReport:
        return warm_start_policy(tiny_assets.policy, tmp_path / name, seed=seed, steps=4, batch_size=4, eval_n=0)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert [loss for _, loss in a.loss_curve] == pytest.approx([loss for _, loss in b.loss_curve], rel=1e-6)
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-6)
    assert c.final_loss != pytest.approx(a.final_loss, rel=1e-3)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), rtol=1e-5, atol=1e-6) for k in wa)


def test_ensure_warm_policy_builds_once_beside_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = warmstart.warm_start_policy

    def quick(base_dir: Path, out_dir: Path, seed: int = 0) -> warmstart.WarmStartReport:
        calls.append(seed)
        return real(base_dir, out_dir, seed=seed, steps=2, batch_size=2, eval_n=0)

    monkeypatch.setattr(warmstart, "warm_start_policy", quick)
    # a private root: a real default-settings build must never find this quick one under its stamp
    path = ensure_warm_policy(root=tmp_path, seed=0)
    base = ensure_assets(root=tmp_path, seed=0).policy
    assert path == tmp_path / "seed0" / WARM_POLICY_DIR == base.parent / WARM_POLICY_DIR
    assert (path / "model.safetensors").is_file() and (path / REPORT_NAME).is_file()
    assert read_stamp(path)["base"] == read_stamp(base)
    stamp_time = (path / STAMP_NAME).stat().st_mtime_ns
    assert ensure_warm_policy(root=tmp_path, seed=0) == path
    assert calls == [0]
    assert (path / STAMP_NAME).stat().st_mtime_ns == stamp_time


def test_train_policy_runs_its_phases_in_order_and_calls_back_after_every_step(tiny_assets: AssetPaths) -> None:
    seen: list[tuple[int, bool]] = []

    def callback(step: int, model: torch.nn.Module, processor: object) -> None:
        seen.append((step, model.training))

    phases = [warmstart.Phase("plain", (1, 1), 2), warmstart.Phase("camouflage", (1, 1), 1)]
    model, _, losses = warmstart.train_policy(tiny_assets.policy, 0, phases, batch_size=2, lr=1e-3, callback=callback)
    assert seen == [(1, False), (2, False), (3, False)]  # the callback sees the model in eval mode
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not model.training
    # the second phase trained on camouflage scenes: its loss is not the plain stream's third batch
    _, _, plain_losses = warmstart.train_policy(
        tiny_assets.policy, 0, [warmstart.Phase("plain", (1, 1), 3)], batch_size=2, lr=1e-3
    )
    assert plain_losses[:2] == pytest.approx(losses[:2], rel=1e-6)
    assert plain_losses[2] != pytest.approx(losses[2], rel=1e-4)


def test_stop_after_gives_the_full_runs_checkpoint(tiny_assets: AssetPaths) -> None:
    """An early stop is the full run's model at that step: same batches and learning-rate schedule so far."""
    phases = [warmstart.Phase("plain", (1, 1), 3), warmstart.Phase("camouflage", (1, 1), 2)]
    seen: list[int] = []
    _, _, full = warmstart.train_policy(tiny_assets.policy, 0, phases, batch_size=2, lr=1e-3)
    _, _, stopped = warmstart.train_policy(
        tiny_assets.policy, 0, phases, batch_size=2, lr=1e-3, stop_after=4, callback=lambda s, m, p: seen.append(s)
    )
    assert len(full) == 5 and len(stopped) == 4 and seen == [1, 2, 3, 4]
    assert stopped == pytest.approx(full[:4], rel=1e-6)  # step 4 is the camouflage phase's first, as in the full run
    with pytest.raises(ValueError, match="stop_after=6: expected 1..5"):
        warmstart.train_policy(tiny_assets.policy, 0, phases, batch_size=2, lr=1e-3, stop_after=6)


def test_the_default_warm_start_is_the_default_curriculum_stopped_early(
    tiny_assets: AssetPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list, int | None]] = []

    class Captured(Exception):
        pass

    def capture(base_dir: Path, seed: int, phases: list, batch_size: int, lr: float, **kwargs: object) -> None:
        calls.append((list(phases), kwargs.get("stop_after")))
        raise Captured

    monkeypatch.setattr(warmstart, "train_policy", capture)
    with pytest.raises(Captured):
        warm_start_policy(tiny_assets.policy, tmp_path / "default")
    with pytest.raises(Captured):
        warm_start_policy(tiny_assets.policy, tmp_path / "steps", steps=3)
    assert calls[0] == (list(warmstart.DEFAULT_PHASES), warmstart.DEFAULT_STOP_AFTER)
    assert calls[1][1] is None  # an explicit curriculum runs to its end unless told otherwise
    assert (
        sum(p.steps for p in warmstart.DEFAULT_PHASES)
        > warmstart.DEFAULT_STOP_AFTER
        > warmstart.DEFAULT_PHASES[0].steps
    )
