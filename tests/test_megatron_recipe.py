"""The Megatron recipe as far as a CPU machine can take it, with ``megatron-core`` installed.

Skipped unless ``megatron.core`` imports (the main environment does not install it; docs/recipes.md,
"The Megatron recipe on CPU", says how to run this file in a venv that adds it). What runs:

1. the recipe composes and resolves (with the tiny Qwen2.5-VL as ``POLICY_PATH``: verl reads the
   model's config when it builds its model config);
2. the grto trainer maps the actor role to :class:`ActorRolloutRefToolWorker`, which *is* verl's
   engine worker (``verl.workers.engine_workers.ActorRolloutRefWorker``: the class verl's v1 trainer
   runs for every strategy, Megatron included) with the tool mixed in;
3. that worker is constructed in-process for role ``actor_rollout_ref`` and hosts the tool
   (``init_tool``, a tool prediction);
4. its ``init_model`` builds verl's model config and the actor's and reference's Megatron engine
   configs (``McoreActorConfig`` / ``McoreEngineConfig``: TP 2, mbridge, reference offloaded), and
   stops where verl looks up the Megatron engine for the device: verl registers it for CUDA (and
   NPU) only. The Megatron engine class it would build on a GPU is checked to be registered.

What is not run (it needs GPUs, NCCL and mbridge): Megatron's parallel state, the model built through
mbridge, the vLLM rollout, a training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (docs/recipes.md: Megatron on CPU)")

import verl  # noqa: E402,F401  (loads the plugin)
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from verl.trainer.ppo.utils import Role  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402

from verl_grto.data.masks import decode_rle  # noqa: E402
from verl_grto.tool.engine import ToolBatch  # noqa: E402
from verl_grto.tool.prompts import ObjectPrompt  # noqa: E402
from verl_grto.tool.worker import ActorRolloutRefToolWorker, ToolSettings  # noqa: E402
from verl_grto.trainer.config import GRTOConfig  # noqa: E402
from verl_grto.trainer.grto_trainer import GRTOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "grto_qwen25vl_7b_sam21_large_megatron"
TINY_POLICY = ROOT / "verl_grto/assets/shipped/seed0/tiny_qwen25vl_warm"
TINY_TOOL = ROOT / "verl_grto/assets/shipped/seed0/tiny_sam2_pretrained"


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DictConfig:
    monkeypatch.setenv("POLICY_PATH", str(TINY_POLICY))
    monkeypatch.setenv("TOOL_PATH", str(TINY_TOOL))
    for name in ("TRAIN_FILES", "VAL_FILES"):
        monkeypatch.setenv(name, str(tmp_path / f"{name.lower()}.parquet"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("NNODES", raising=False)
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        cfg = compose(config_name=RECIPE)
    OmegaConf.resolve(cfg)
    return cfg


def test_the_trainer_runs_the_tool_in_verls_megatron_capable_worker(config: DictConfig) -> None:
    assert config.actor_rollout_ref.actor.strategy == config.actor_rollout_ref.ref.strategy == "megatron"
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


def test_verl_builds_the_megatron_worker_configs_and_stops_at_the_engine(
    config: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29533")
    worker = ActorRolloutRefToolWorker(config=config.actor_rollout_ref, role="actor_rollout_ref")
    # the tool is hosted by the same worker object
    settings = ToolSettings.from_config({"path": str(TINY_TOOL), "loss": {"resolution": 256}})
    assert worker.init_tool(settings) > 0
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    gt = np.zeros((96, 128), dtype=bool)
    gt[10:50, 10:60] = True
    batch = ToolBatch(["a"], [image], [0], [[ObjectPrompt((10.0, 10.0, 60.0, 50.0))]], [gt])
    scores = worker.tool_predict(batch, [0])
    assert decode_rle(scores.masks[0]).shape == (96, 128) and scores.union[0] >= gt.sum()

    with pytest.raises(ValueError, match=r"No engine registered for device='cpu'.*backend='megatron'"):
        worker.init_model()
    # init_model got through verl's model config and its Megatron actor / reference configs
    actor = omega_conf_to_dataclass(worker.config.actor)
    ref = omega_conf_to_dataclass(worker.config.ref)
    assert type(actor).__name__ == type(ref).__name__ == "McoreActorConfig"
    assert type(actor.engine).__name__ == "McoreEngineConfig"
    assert actor.engine.tensor_model_parallel_size == 2 and actor.engine.use_mbridge
    assert ref.engine.param_offload and ref.ppo_micro_batch_size_per_gpu == 16
    # on a GPU the same lookup gives verl's Megatron engine
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")
    assert EngineRegistry.get_engine_cls("language_model", "megatron").__name__ == "MegatronEngineWithLMHead"
