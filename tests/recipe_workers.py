"""What the full-size recipes' worker tests share (tests/test_megatron_recipe.py, tests/isolated_fsdp_recipe_workers.py).

A GPU recipe taken as far as a CPU process can: composed and resolved with a tiny model of the
recipe's family as ``POLICY_PATH`` (verl reads the model's config), the actor role mapped by the grto
trainer to :class:`ActorRolloutRefToolWorker` (verl's engine worker with the tool mixed in), and that
worker constructed in-process, hosting the tool. Importing this module imports verl (the plugin), not
megatron-core: the Megatron test adds that itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import verl  # noqa: F401  (loads the plugin)
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.utils import Role
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl_grto.data.masks import decode_rle
from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.prompts import ObjectPrompt
from verl_grto.tool.worker import ActorRolloutRefToolWorker, ToolSettings
from verl_grto.trainer.config import GRTOConfig
from verl_grto.trainer.grto_trainer import GRTOTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_QWEN25VL = ROOT / "verl_grto/assets/shipped/seed0/tiny_qwen25vl_warm"
TINY_TOOL = ROOT / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"


def compose_recipe(
    recipe: str, policy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overrides: Sequence[str] = ()
) -> DictConfig:
    """The GPU recipe, resolved, with ``policy`` as POLICY_PATH, the tiny tool, and files under ``tmp_path``."""
    monkeypatch.setenv("POLICY_PATH", str(policy))
    monkeypatch.setenv("TOOL_PATH", str(TINY_TOOL))
    for name in ("TRAIN_FILES", "VAL_FILES"):
        monkeypatch.setenv(name, str(tmp_path / f"{name.lower()}.parquet"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("NNODES", raising=False)
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        cfg = compose(config_name=recipe, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def assert_the_trainer_runs_the_tool_in_the_actor_worker(config: DictConfig) -> None:
    """The grto trainer maps every actor role to ActorRolloutRefToolWorker, which is verl's engine worker."""
    trainer = object.__new__(GRTOTrainer)  # only the worker mapping: no Ray, no datasets
    trainer.config = config
    trainer.grto = GRTOConfig.from_config(config.grto)
    trainer._init_resource_pool_mgr()
    actor_roles = [r for r in trainer.role_worker_mapping if r in (Role.ActorRollout, Role.ActorRolloutRef)]
    assert actor_roles
    for role in actor_roles:
        worker_cls = trainer.role_worker_mapping[role].__ray_metadata__.modified_class  # ray.remote's subclass
        assert issubclass(worker_cls, ActorRolloutRefToolWorker)
    assert issubclass(ActorRolloutRefToolWorker, ActorRolloutRefWorker)


def worker_hosting_the_tool(
    config: DictConfig, monkeypatch: pytest.MonkeyPatch, port: int
) -> ActorRolloutRefToolWorker:
    """The actor_rollout_ref worker of ``config`` as rank 0 of 1, with the tool initialised and one prediction made."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    worker = ActorRolloutRefToolWorker(config=config.actor_rollout_ref, role="actor_rollout_ref")
    settings = ToolSettings.from_config({"path": str(TINY_TOOL), "loss": {"resolution": 256}})
    assert worker.init_tool(settings) > 0
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    gt = np.zeros((96, 128), dtype=bool)
    gt[10:50, 10:60] = True
    batch = ToolBatch(["a"], [image], [0], [[ObjectPrompt((10.0, 10.0, 60.0, 50.0))]], [gt])
    scores = worker.tool_predict(batch, [0])
    assert decode_rle(scores.masks[0]).shape == (96, 128) and scores.union[0] >= gt.sum()
    return worker
