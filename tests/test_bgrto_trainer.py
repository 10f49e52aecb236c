"""The ``bgrto`` trainer mode's pieces that run without Ray (the whole mode: tests/test_e2e_bgrto.py)."""

from __future__ import annotations

import datasets
import pytest

from verl_grto.trainer.bgrto_trainer import dataset_rows
from verl_grto.trainer.config import BTOConfig
from verl_grto.trainer.grto_trainer import format_summary


def test_bto_config_defaults_and_errors():
    cfg = BTOConfig.from_config({"epochs": 2, "max_prompts": 16})
    assert (cfg.epochs, cfg.max_prompts, cfg.group_size, cfg.batch_size) == (2, 16, None, 8)
    assert BTOConfig.from_config(None) == BTOConfig()
    for bad in ({"epochs": 0}, {"group_size": 0}, {"max_prompts": 0}, {"batch_size": 0}, {"prompts_per_generate": 0}):
        with pytest.raises(ValueError, match="bto\\."):
            BTOConfig.from_config(bad)
    with pytest.raises(TypeError):
        BTOConfig.from_config({"epoch": 3})  # a typo is an error, not a silent default


class _Dataset:
    """What :func:`dataset_rows` reads of verl's RLHFDataset: its (filtered) ``datasets`` table."""

    def __init__(self, table: datasets.Dataset) -> None:
        self.dataframe = table


def test_dataset_rows_follow_verls_dataset_order_after_filtering():
    table = datasets.Dataset.from_list(
        [
            {"extra_info": {"sample_id": f"s{i}"}, "reward_model": {"ground_truth": f"g{i}"}, "images": [b"x" * 10]}
            for i in range(5)
        ]
    )
    filtered = table.select([4, 1, 3])  # verl's sub-sampling / long-prompt filter keep a subset, in its order
    rows = dataset_rows(_Dataset(filtered))
    assert [r["extra_info"]["sample_id"] for r in rows] == ["s4", "s1", "s3"]
    assert [r["dataset_index"] for r in rows] == [0, 1, 2]
    assert rows[0]["reward_model"] == {"ground_truth": "g4"} and "images" not in rows[0]


def test_summary_names_scores_baseline_and_times():
    val = {
        "val-grto/gIoU": 0.2,
        "val-grto/cIoU": 0.3,
        "val-grto/box_fill_gIoU": 0.25,
        "val-grto/parse_rate": 1.0,
        "val-grto/policy_box_iou": 0.55,
        "val-grto/n": 32.0,
    }
    summary = {
        "trainer_mode": "bgrto",
        "validations": [
            {"step": 0.0, "label": "before BTO", **val},
            {"step": 0.0, "label": "after BTO", **val, "val-grto/gIoU": 0.3},
            {"step": 8.0, "label": "after GRTO step 8", **val, "val-grto/gIoU": 0.4},
        ],
        "seconds": {"bto_buffer": 10.0, "bto_tool": 5.0, "grto_steps": 80.0},
        "bto_fraction_of_grto_epoch": 0.12,
    }
    text = format_summary(summary)
    assert "validation before BTO: gIoU 0.200" in text and "validation after BTO: gIoU 0.300" in text
    assert "validation after GRTO step 8: gIoU 0.400" in text
    assert "filling the policy's boxes: gIoU 0.250" in text and "policy box IoU 0.550" in text
    assert "bto_buffer 10.0" in text
    assert "BTO wall time / one GRTO epoch: 0.12" in text


def test_bto_trains_the_tool_with_the_rollout_replicas_asleep():
    """Colocated, vLLM and the tool share the actor's GPUs: the replicas sleep while BTO trains the tool
    and wake (with the policy's weights, verl's update_weights) before anything generates again, also
    when the stage fails."""
    from types import SimpleNamespace

    from verl_grto.trainer.bgrto_trainer import BGRTOTrainer

    calls: list[str] = []
    trainer = object.__new__(BGRTOTrainer)
    trainer.global_steps = 1
    trainer.checkpoint_manager = SimpleNamespace(
        sleep_replicas=lambda: calls.append("sleep"), update_weights=lambda step: calls.append(f"wake@{step}")
    )
    trainer.tool_wg = SimpleNamespace(tool_run=lambda request: calls.append(f"train:{request}") or [{"ok": 1}])
    assert trainer._train_tool_offline("req") == {"ok": 1}
    assert calls == ["sleep", "train:req", "wake@1"]

    def crash(request):
        calls.append("crash")
        raise RuntimeError("tool worker died")

    calls.clear()
    trainer.tool_wg = SimpleNamespace(tool_run=crash)
    with pytest.raises(RuntimeError, match="died"):
        trainer._train_tool_offline("req")
    assert calls == ["sleep", "crash", "wake@1"]


def test_bto_cache_bytes_is_configured_and_checked():
    cfg = BTOConfig.from_config({"cache_bytes": 123})
    assert cfg.cache_bytes == 123 and BTOConfig().cache_bytes == 4 << 30
    with pytest.raises(ValueError, match="bto.cache_bytes"):
        BTOConfig.from_config({"cache_bytes": -1})
