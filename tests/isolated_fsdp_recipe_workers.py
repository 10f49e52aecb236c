"""The full-size FSDP recipes' workers as far as a CPU machine can take them.

Run in a child pytest by tests/test_fsdp_recipe_workers.py (a verl worker initialises
``torch.distributed`` and device meshes in its process, which other tests must not share). For each
one-node FSDP recipe (Qwen2.5-VL-7B, Qwen3-VL-8B, and the multi-turn Qwen2.5-VL-7B with the tool as a call), with a tiny model of the recipe's family as
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

import pytest
from omegaconf import DictConfig
from recipe_workers import (
    TINY_QWEN25VL,
    assert_the_trainer_runs_the_tool_in_the_actor_worker,
    compose_recipe,
    worker_hosting_the_tool,
)
from verl.utils.config import omega_conf_to_dataclass

#: recipe -> the transformers model class its policy (and the tiny stand-in) is built as
RECIPES = {
    "grto_agent_qwen25vl_7b_sam21_large": "Qwen2_5_VLForConditionalGeneration",
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
    return compose_recipe(request.param, policy, monkeypatch, tmp_path, CPU_OVERRIDES)


def test_the_trainer_runs_the_tool_in_verls_fsdp_worker(config: DictConfig) -> None:
    assert config.actor_rollout_ref.actor.strategy == config.actor_rollout_ref.ref.strategy == "fsdp2"
    assert_the_trainer_runs_the_tool_in_the_actor_worker(config)


def test_verl_builds_the_fsdp_engines_and_stops_at_the_rollout(
    config: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = worker_hosting_the_tool(config, monkeypatch, 29534)
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
