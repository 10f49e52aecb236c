"""The full-size FSDP recipes' workers as far as a CPU machine can take them.

Run in a child pytest by tests/test_fsdp_recipe_workers.py (a verl worker initialises
``torch.distributed`` and device meshes in its process, which other tests must not share). For each
one-node FSDP recipe (Qwen2.5-VL-7B, Qwen3-VL-8B), with a tiny model of the recipe's family as
``POLICY_PATH`` (the shipped tiny Qwen2.5-VL; the tiny Qwen3-VL built here):

1. the grto trainer maps the actor role to :class:`ActorRolloutRefToolWorker`, verl's engine worker
   with the tool mixed in;
2. that worker is constructed in-process for ``actor_rollout_ref``, hosts the tool (``init_tool``, a
   tool prediction), and its ``init_model`` builds verl's FSDP2 engines for the reference and the actor
   from the recipe's configs (the model of the recipe's family wrapped by FSDP2, the reference's
   parameters offloaded), then stops where the rollout's device mesh needs the recipe's TP 2 and this
   process is one rank.

The one change to the recipe: attention ``sdpa`` (flash-attention, the GPU recipes' default, is not
installed on CPU). Not run: the vLLM rollout, NCCL, a training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import verl  # noqa: F401  (loads the plugin)
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.utils import Role
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl_grto.tool.engine import ToolBatch
from verl_grto.tool.prompts import ObjectPrompt
from verl_grto.tool.worker import ActorRolloutRefToolWorker, ToolSettings
from verl_grto.trainer.config import GRTOConfig
from verl_grto.trainer.grto_trainer import GRTOTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_QWEN25VL = ROOT / "verl_grto/assets/shipped/seed0/tiny_qwen25vl_warm"
TINY_TOOL = ROOT / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"
#: recipe -> the transformers model class its policy (and the tiny stand-in) is built as
RECIPES = {
    "grto_qwen25vl_7b_sam21_large": "Qwen2_5_VLForConditionalGeneration",
    "grto_qwen3vl_8b_sam21_large": "Qwen3VLForConditionalGeneration",
}
CPU_OVERRIDES = ["+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]


@pytest.fixture(scope="module")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from verl_grto.assets.qwen3vl import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl"))


@pytest.fixture(params=sorted(RECIPES))
def config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DictConfig:
    policy = request.getfixturevalue("tiny_qwen3vl") if "qwen3vl" in request.param else TINY_QWEN25VL
    monkeypatch.setenv("POLICY_PATH", str(policy))
    monkeypatch.setenv("TOOL_PATH", str(TINY_TOOL))
    for name in ("TRAIN_FILES", "VAL_FILES"):
        monkeypatch.setenv(name, str(tmp_path / f"{name.lower()}.parquet"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        cfg = compose(config_name=request.param, overrides=CPU_OVERRIDES)
    OmegaConf.resolve(cfg)
    return cfg


def test_the_trainer_runs_the_tool_in_verls_fsdp_worker(config: DictConfig) -> None:
    assert config.actor_rollout_ref.actor.strategy == config.actor_rollout_ref.ref.strategy == "fsdp2"
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


def test_verl_builds_the_fsdp_engines_and_stops_at_the_rollout(
    config: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29534")
    worker = ActorRolloutRefToolWorker(config=config.actor_rollout_ref, role="actor_rollout_ref")
    settings = ToolSettings.from_config({"path": str(TINY_TOOL), "loss": {"resolution": 256}})
    assert worker.init_tool(settings) > 0
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    masks = worker.tool_predict(ToolBatch(["a"], [image], [0], [[ObjectPrompt((10.0, 10.0, 60.0, 50.0))]]))
    assert masks.masks[0].shape == (96, 128)

    with pytest.raises(AssertionError, match="not divisible by infer_world_size: 2"):
        worker.init_model()
    # the reference and the actor were built by verl's FSDP2 engine, from the recipe's configs
    model_class = RECIPES[config.trainer.experiment_name]
    for part in (worker.ref, worker.actor):
        engine = part.engine
        assert type(engine).__name__ == "FSDPEngineWithLMHead"
        assert type(engine.module).__name__ == f"FSDP{model_class}"  # fully_shard's wrapper of the policy
        assert engine.engine_config.strategy == "fsdp2"
    assert worker.ref.engine.engine_config.param_offload and not worker.actor.engine.engine_config.param_offload
    actor = omega_conf_to_dataclass(worker.config.actor)
    assert actor.ppo_micro_batch_size_per_gpu == 4 and actor.use_kl_loss
