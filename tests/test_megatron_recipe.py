"""The Megatron recipes as far as a CPU machine can take them, with ``megatron-core`` installed.

Skipped unless ``megatron.core`` imports (the main environment does not install it; docs/recipes.md,
"The Megatron recipe on CPU", says how to run this file in a venv that adds it). Both Megatron recipes
(Qwen2.5-VL-7B, dense; Qwen3-VL-30B-A3B, a mixture of experts over EP 8) run through:

1. the recipe composes and resolves (with a tiny model of the recipe's family as ``POLICY_PATH``:
   verl reads the model's config when it builds its model config; the tiny Qwen2.5-VL, or a tiny
   Qwen3-VL-MoE built here, :mod:`verl_grto.assets.qwen3vl`);
2. the grto trainer maps the actor role to :class:`ActorRolloutRefToolWorker`, which *is* verl's
   engine worker (``verl.workers.engine_workers.ActorRolloutRefWorker``: the class verl's v1 trainer
   runs for every strategy, Megatron included) with the tool mixed in;
3. that worker is constructed in-process for role ``actor_rollout_ref`` and hosts the tool
   (``init_tool``, a tool prediction);
4. its ``init_model`` builds verl's model config and the actor's and reference's Megatron engine
   configs (``McoreActorConfig`` / ``McoreEngineConfig``: TP 2 (and EP 8), mbridge, reference offloaded), and
   stops where verl looks up the Megatron engine for the device: verl registers it for CUDA (and
   NPU) only. The Megatron engine class it would build on a GPU is checked to be registered.

What is not run (it needs GPUs, NCCL and mbridge): Megatron's parallel state, the model built through
mbridge, the vLLM rollout, a training step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (docs/recipes.md: Megatron on CPU)")

from omegaconf import DictConfig  # noqa: E402
from recipe_workers import (  # noqa: E402
    TINY_QWEN25VL,
    assert_the_trainer_runs_the_tool_in_the_actor_worker,
    compose_recipe,
    worker_hosting_the_tool,
)
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402

#: recipe -> (the tiny policy family standing in for its model, the expert-parallel size it asks for)
RECIPES = {
    "grto_qwen25vl_7b_sam21_large_megatron": ("qwen25vl", 1),
    "grto_qwen3vl_30b_a3b_sam21_large_megatron": ("qwen3vl_moe", 8),
}


@pytest.fixture(scope="module")
def tiny_qwen3vl_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from verl_grto.assets.qwen3vl import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl_moe"), moe=True)


@pytest.fixture(params=sorted(RECIPES))
def config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DictConfig:
    family, _ = RECIPES[request.param]
    policy = TINY_QWEN25VL if family == "qwen25vl" else request.getfixturevalue("tiny_qwen3vl_moe")
    return compose_recipe(request.param, policy, monkeypatch, tmp_path)


def test_the_trainer_runs_the_tool_in_verls_megatron_capable_worker(config: DictConfig) -> None:
    assert config.actor_rollout_ref.actor.strategy == config.actor_rollout_ref.ref.strategy == "megatron"
    assert_the_trainer_runs_the_tool_in_the_actor_worker(config)


def test_verl_builds_the_megatron_worker_configs_and_stops_at_the_engine(
    config: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = worker_hosting_the_tool(config, monkeypatch, 29533)  # the tool is hosted by the same worker object
    ref_micro_batch = config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu  # init_model moves it
    with pytest.raises(ValueError, match=r"No engine registered for device='cpu'.*backend='megatron'"):
        worker.init_model()
    # init_model got through verl's model config and its Megatron actor / reference configs
    actor = omega_conf_to_dataclass(worker.config.actor)
    ref = omega_conf_to_dataclass(worker.config.ref)
    assert type(actor).__name__ == type(ref).__name__ == "McoreActorConfig"
    assert type(actor.engine).__name__ == "McoreEngineConfig"
    assert actor.engine.tensor_model_parallel_size == 2 and actor.engine.use_mbridge
    assert ref.engine.param_offload and ref.ppo_micro_batch_size_per_gpu == ref_micro_batch
    family, expert_parallel = RECIPES[config.trainer.experiment_name]
    assert actor.engine.expert_model_parallel_size == ref.engine.expert_model_parallel_size == expert_parallel
    # the model config verl built is the recipe's family (the MoE recipe's: a mixture of experts)
    hf_config = omega_conf_to_dataclass(worker.config.model).hf_config
    assert type(hf_config).__name__ == {"qwen25vl": "Qwen2_5_VLConfig", "qwen3vl_moe": "Qwen3VLMoeConfig"}[family]
    # on a GPU the same lookup gives verl's Megatron engine
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")
    assert EngineRegistry.get_engine_cls("language_model", "megatron").__name__ == "MegatronEngineWithLMHead"
