"""Every recipe composes, resolves, passes the checks verl's ``main_ppo`` runs before training, and
makes verl build what it is meant to run (:func:`verl_view`: the trainer class, advantage estimator,
actor config, reward function and rollout replica verl looks up from it).

The GPU recipes cannot run here, so this is their only gate: a typo in a key, a batch size that
does not divide, a ``grto:`` section the trainer would reject, or a trainer mode the plugin does not
register all fail in seconds instead of after a multi-node job has been scheduled.

The tiny recipes' ``${grto_asset:...}`` / ``${grto_synthetic:...}`` resolvers *build* models and data
(minutes on this machine), so those recipes are checked unresolved, then validated with the
resolver-backed paths replaced by placeholders: everything else in them is resolved and validated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import verl  # noqa: F401  (first: loads the verl_grto plugin, which registers resolvers, trainer, estimator)
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, get_trainer_cls
from verl.utils.config import omega_conf_to_dataclass, validate_config
from verl.workers.rollout.replica import RolloutReplicaRegistry

from verl_grto.algorithm.advantage import compute_grto_advantage
from verl_grto.reward.box_reward import compute_score as box_reward
from verl_grto.rollout.hf_server import HFReplica
from verl_grto.trainer.bgrto_trainer import BGRTOTrainer
from verl_grto.trainer.config import AgentConfig, BTOConfig, GRTOConfig
from verl_grto.trainer.grto_trainer import GRTOTrainer

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.endswith("_base"))
pytestmark = pytest.mark.filterwarnings("ignore:Disabled critic:UserWarning")  # GRPO-style runs have no critic

FULL_SIZE_RECIPES = (
    "grto_agent_qwen25vl_7b_sam21_large",
    "grto_qwen25vl_7b_sam21_large",
    "grto_qwen25vl_7b_sam21_large_megatron",
    "grto_qwen3vl_8b_sam21_large",
    "grto_qwen3vl_30b_a3b_sam21_large_megatron",
)
ONE_GPU_RECIPE = "grto_qwen25vl_3b_sam21_bplus_lora_1gpu"
GPU_RECIPES = (*FULL_SIZE_RECIPES, ONE_GPU_RECIPE)
#: The coordinate convention each recipe names (docs/method.md, "Image frames").
QWEN3VL_RECIPES = ("grto_qwen3vl_8b_sam21_large", "grto_qwen3vl_30b_a3b_sam21_large_megatron", "grto_qwen3vl_tiny_cpu")
GPU_ENV = ("POLICY_PATH", "TOOL_PATH", "TRAIN_FILES", "VAL_FILES")
# The keys the tiny recipes fill through the asset-building resolvers.
RESOLVER_KEYS = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "grto.tool.path")
#: Resolvers that build nothing (a path in the package, a template string): resolved as they are.
CHEAP_RESOLVERS = ("${grto_tool_config:", "${grto_chat_template:")
#: The multi-turn recipes (trainer mode grto_agent: the policy calls the tool in verl's agent loop).
AGENT_RECIPES = ("grto_agent_qwen25vl_7b_sam21_large", "grto_agent_tiny_cpu")


@pytest.fixture(autouse=True)
def _gpu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The GPU recipes read their paths from the environment; point them at a temp folder."""
    for name in GPU_ENV:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("NNODES", raising=False)
    yield


def _compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def _validate(cfg: DictConfig) -> None:
    """What main_ppo checks before it starts Ray, plus what the plugin itself would reject."""
    OmegaConf.resolve(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    get_adv_estimator_fn(cfg.algorithm.adv_estimator)
    mode = cfg.trainer.v1.trainer_mode
    assert mode in TRAINER_REGISTRY, f"trainer mode {mode!r} not registered: {sorted(TRAINER_REGISTRY)}"
    if mode in ("grto", "bgrto") or "grto" in cfg:
        GRTOConfig.from_config(cfg.grto)
    if mode == "bgrto" or "bto" in cfg:
        BTOConfig.from_config(cfg.bto)
    if mode == "grto_agent" or "grto_agent" in cfg:
        AgentConfig.from_config(cfg.grto_agent)
        assert cfg.actor_rollout_ref.rollout.multi_turn.enable


@dataclass
class VerlView:
    """What verl builds from a recipe before training, looked up through verl's own registries and
    loaders: the behaviour a recipe selects, rather than the values it spells."""

    trainer_cls: type
    advantage_fn: Any
    actor_config: Any
    reward_fn: Any
    uses_reference: bool


def verl_view(cfg: DictConfig) -> VerlView:
    """``cfg`` resolved and checked as main_ppo does (:func:`_validate`), then what verl builds from it."""
    _validate(cfg)
    return VerlView(
        trainer_cls=get_trainer_cls(cfg.trainer.v1.trainer_mode),
        advantage_fn=get_adv_estimator_fn(cfg.algorithm.adv_estimator),
        actor_config=omega_conf_to_dataclass(cfg.actor_rollout_ref.actor),
        reward_fn=get_custom_reward_fn(cfg),
        uses_reference=need_reference_policy(cfg),
    )


def _tiny(name: str, tmp_path: Path) -> DictConfig:
    """A tiny recipe with its asset-building resolvers replaced by placeholder paths."""
    cfg = _compose(name)
    present = [key for key in RESOLVER_KEYS if _raw(cfg, key) is not None]
    assert "data.train_files" in present and "actor_rollout_ref.model.path" in present
    for key in present:
        assert str(_raw(cfg, key)).startswith("${grto_"), f"{name}: {key} should come from an asset resolver"
        OmegaConf.update(cfg, key, str(tmp_path / key))
    text = OmegaConf.to_yaml(cfg, resolve=False)
    for cheap in CHEAP_RESOLVERS:
        text = text.replace(cheap, "")
    assert "${grto_" not in text, "resolving would build assets"
    return cfg


def _raw(cfg: DictConfig, key: str) -> object:
    """The value at `key` as written (interpolations unresolved), or None if the key is absent."""
    node: object = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def test_the_gpu_recipes_are_found() -> None:
    assert set(GPU_RECIPES) <= set(RECIPES)
    assert not [r for r in RECIPES if r.endswith("_base")]


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in GPU_RECIPES])
def test_tiny_recipe_builds_the_plugins_pieces_in_verl(name: str, tmp_path: Path) -> None:
    """A tiny recipe runs on the plugin's CPU pieces: verl builds the plugin's rollout replica for it,
    scores rollouts with the plugin's box reward and, in trainer modes grto / bgrto, gets a tool section
    the trainer accepts, pointing at the resolver's tool."""
    cfg = _tiny(name, tmp_path)
    view = verl_view(cfg)
    assert RolloutReplicaRegistry.get(cfg.actor_rollout_ref.rollout.name) is HFReplica
    assert view.reward_fn is not None and view.reward_fn.args[0] is box_reward
    if issubclass(view.trainer_cls, GRTOTrainer):
        assert GRTOConfig.from_config(cfg.grto).tool.path == str(tmp_path / "grto.tool.path")


@pytest.mark.parametrize("name", FULL_SIZE_RECIPES)
def test_gpu_recipe_resolves_and_builds_grto(name: str, tmp_path: Path) -> None:
    """A GPU recipe takes its paths from the environment, passes main_ppo's checks, and makes verl build
    GRTO: the plugin's trainer and advantage, a tool that trains, a reference model (the KL loss) and
    the actor config of the recipe's engine."""
    cfg = _compose(name)
    view = verl_view(cfg)
    assert cfg.data.train_files == str(tmp_path / "train_files")
    assert cfg.data.val_files == str(tmp_path / "val_files")
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "policy_path")
    assert issubclass(view.trainer_cls, GRTOTrainer) and view.advantage_fn is compute_grto_advantage
    assert cfg.trainer.v1.trainer_mode == ("grto_agent" if name in AGENT_RECIPES else "grto")
    assert cfg.trainer.n_gpus_per_node == 8
    arr = cfg.actor_rollout_ref
    assert arr.rollout.name == "vllm" and arr.rollout.n == 8 and arr.rollout.dtype == "bfloat16"
    assert arr.actor.use_kl_loss and arr.actor.kl_loss_type == "low_var_kl"
    grto = GRTOConfig.from_config(cfg.grto)
    assert grto.tool.path == str(tmp_path / "tool_path") and grto.trains_tool
    assert grto.tool.lr == pytest.approx(1e-5) and grto.tool.max_grad_norm == 1.0
    assert grto.tool.loss.resolution == 256
    assert view.uses_reference
    engine = "Mcore" if name.endswith("_megatron") else "FSDP"
    assert type(view.actor_config).__name__ == f"{engine}ActorConfig"


@pytest.mark.parametrize("name", ["grto_qwen25vl_7b_sam21_large", "grto_qwen3vl_8b_sam21_large"])
def test_fsdp_recipe_is_one_node_fsdp2(name: str) -> None:
    cfg = _compose(name)
    assert cfg.trainer.nnodes == 1
    assert cfg.actor_rollout_ref.actor.strategy == cfg.actor_rollout_ref.ref.strategy == "fsdp2"


@pytest.mark.parametrize("name", ["grto_qwen25vl_7b_sam21_large_megatron", "grto_qwen3vl_30b_a3b_sam21_large_megatron"])
def test_megatron_recipe_takes_nnodes_from_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNODES", "4")
    cfg = _compose(name)
    assert cfg.model_engine == "megatron"
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"
    _validate(cfg)
    assert cfg.trainer.nnodes == 4  # an int: validate_config multiplies it


@pytest.mark.parametrize(
    ("name", "nodes"),
    [
        ("grto_qwen25vl_7b_sam21_large_megatron", "3"),  # DP 12 x micro 4 = 48 !| 1024
        ("grto_qwen3vl_30b_a3b_sam21_large_megatron", "3"),  # DP 12 x micro 2 = 24 !| 1024
    ],
)
def test_megatron_recipe_rejects_a_node_count_that_breaks_the_batch(
    name: str, nodes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check verl would fail with at start-up, caught here."""
    monkeypatch.setenv("NNODES", nodes)
    with pytest.raises(AssertionError, match="divisible"):
        _validate(_compose(name))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_its_coordinate_convention(name: str) -> None:
    """The convention is named in the recipe and handed to the box reward (docs/method.md, "Image frames");
    the Qwen3-VL recipes resize in Qwen3-VL's 16-px patches in verl's dataset too."""
    from verl_grto.data.frame import NORM1000, PIXELS, default_limits, limits_from_kwargs

    cfg = _compose(name)
    coords = NORM1000 if name in QWEN3VL_RECIPES else PIXELS
    assert cfg.data.answer_coords == coords
    assert _raw(cfg, "reward.custom_reward_function.reward_kwargs.answer_coords") == "${data.answer_coords}"
    if name in QWEN3VL_RECIPES:
        assert cfg.data.image_patch_size == 16
    if name in GPU_RECIPES:  # the processor's limits are the converters' defaults for the family's factor
        factor = 32 if coords == NORM1000 else 28
        assert limits_from_kwargs(cfg.data.mm_processor_kwargs, factor) == default_limits(factor)


def test_the_moe_recipe_spreads_its_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _compose("grto_qwen3vl_30b_a3b_sam21_large_megatron")
    megatron = cfg.actor_rollout_ref.actor.megatron
    assert megatron.expert_model_parallel_size == 8 and megatron.tensor_model_parallel_size == 2
    assert cfg.actor_rollout_ref.ref.megatron.expert_model_parallel_size == 8  # verl's ref follows the actor
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 4


def test_a_missing_path_variable_fails_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset POLICY_PATH must stop the run, not fall back to a default model."""
    monkeypatch.delenv("POLICY_PATH")
    cfg = _compose("grto_qwen25vl_7b_sam21_large")
    with pytest.raises(Exception, match="POLICY_PATH"):
        OmegaConf.resolve(cfg)


def test_bgrto_main_job_builds_b_grto(tmp_path: Path) -> None:
    """The main job: verl builds the B-GRTO trainer (BTO, then GRTO steps) with GRTO's advantage and a
    tool that trains; its BTO section is one the trainer accepts."""
    view = verl_view(cfg := _tiny("bgrto_tiny_cpu", tmp_path))
    assert view.trainer_cls is BGRTOTrainer and view.advantage_fn is compute_grto_advantage
    assert BTOConfig.from_config(cfg.bto).epochs >= 1 and GRTOConfig.from_config(cfg.grto).trains_tool


def test_tool_placement_is_checked() -> None:
    cfg = _compose("grto_tiny_cpu", ["grto.placement=separate"])
    assert GRTOConfig.from_config(cfg.grto).placement == "separate"
    with pytest.raises(ValueError, match="placement"):
        GRTOConfig.from_config(_compose("grto_tiny_cpu", ["grto.placement=elsewhere"]).grto)


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in GPU_RECIPES and r not in AGENT_RECIPES])
def test_probes_answer_within_the_tiny_recipes_response_length(name: str) -> None:
    """The probes' default budget is named for the tiny recipes' response length: keep the two equal."""
    from verl_grto.eval.policy_probe import TINY_RESPONSE_LENGTH

    assert _compose(name).data.max_response_length == TINY_RESPONSE_LENGTH


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "actor_rollout_ref.actor.fsdp_config.param_offload=true",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.55",
        ],
    ],
)
def test_the_one_gpu_lora_recipe_resolves_and_validates(
    overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/recipes.md, "One GPU with LoRA": the recipe as written (48 GB) and the 24 GB column's overrides.

    verl's check of the LoRA rank against vLLM's allowed ranks (verl/utils/config.py:212-215) imports
    vLLM's rollout, which is not installed here: a stand-in records the rank it is asked about (64 is
    one of vLLM's allowed ranks, verl/workers/rollout/vllm_rollout/utils.py:94)."""
    import types

    asked: list[int] = []
    stand_in = types.ModuleType("verl.workers.rollout.vllm_rollout.utils")
    stand_in.get_vllm_max_lora_rank = asked.append
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    cfg = _compose(ONE_GPU_RECIPE, overrides)
    _validate(cfg)
    assert asked == [64]
    assert cfg.trainer.nnodes == 1 and cfg.trainer.n_gpus_per_node == 1 and cfg.trainer.v1.trainer_mode == "grto"
    model = cfg.actor_rollout_ref.model
    assert model.path == str(tmp_path / "policy_path") and model.lora_rank == 64
    assert model.exclude_modules == ".*visual.*" and model.lora.merge is False
    assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    # the reference policy is the actor with its adapter disabled: verl builds no reference worker
    assert cfg.actor_rollout_ref.actor.use_kl_loss and need_reference_policy(cfg)
    grto = GRTOConfig.from_config(cfg.grto)
    assert grto.placement == "colocated" and grto.tool.path == str(tmp_path / "tool_path")


@pytest.mark.parametrize("name", ["grto_tiny_cpu", "bgrto_tiny_cpu"])
def test_the_lora_overlay_composes_on_the_tiny_recipes(name: str, tmp_path: Path) -> None:
    """`--config-name <recipe> +lora=tiny_cpu` (recipes/lora/tiny_cpu.yaml): verl's LoRA keys, a run folder of its own."""
    cfg = _compose(name, ["+lora=tiny_cpu"])
    for key in RESOLVER_KEYS:
        if _raw(cfg, key) is not None:
            OmegaConf.update(cfg, key, str(tmp_path / key))
    _validate(cfg)
    model = cfg.actor_rollout_ref.model
    assert model.lora_rank == 8 and model.target_modules == "all-linear" and model.exclude_modules == ".*visual.*"
    assert (
        cfg.trainer.experiment_name
        == f"{cfg.trainer.v1.trainer_mode}_lora_tiny_cpu"
        != _compose(name).trainer.experiment_name
    )


def test_gpu_recipes_save_what_evaluation_reads() -> None:
    """`verl-grto evaluate --checkpoint`: FSDP shards (merged by verl's merger), or Megatron's Hugging Face weights."""
    fsdp = _compose("grto_qwen25vl_7b_sam21_large").actor_rollout_ref.actor.checkpoint.save_contents
    megatron = _compose("grto_qwen25vl_7b_sam21_large_megatron").actor_rollout_ref.actor.checkpoint.save_contents
    assert "model" in fsdp and "hf_model" in megatron


@pytest.mark.parametrize("name", AGENT_RECIPES)
def test_the_multi_turn_recipes_route_the_rows_through_the_tool(name: str) -> None:
    """The tool YAML, verl's multi-turn loop with the lenient hermes parser, a template that renders the tool's
    images (the tiny policy carries its own), and a response budget for the calls and replies."""
    from verl_grto.agent.templates import QWEN25VL_TOOL_CHAT_TEMPLATE
    from verl_grto.assets.agent_warmstart import PROBE_PROMPT_LENGTH, PROBE_RESPONSE_LENGTH

    cfg = _compose(name)
    multi_turn = cfg.actor_rollout_ref.rollout.multi_turn
    assert multi_turn.enable and multi_turn.format == "grto_hermes"
    assert _raw(cfg, "actor_rollout_ref.rollout.multi_turn.tool_config_path") == "${grto_tool_config:trained}"
    assert multi_turn.tool_config_path.endswith("verl_grto/agent/segment_tool.yaml")
    assert AgentConfig.from_config(cfg.grto_agent).final_mask == "last_call"
    if name in GPU_RECIPES:
        assert cfg.actor_rollout_ref.model.custom_chat_template == QWEN25VL_TOOL_CHAT_TEMPLATE
        # every call the tool allows, each with its reply image (at most reply_max_pixels: 28-px merged patches)
        # and ~100 text tokens of call and reply, then the single-turn recipe's 512 for reasoning and answer
        tool = OmegaConf.load(multi_turn.tool_config_path).tools[0].config
        reply_tokens = tool.reply_max_pixels // (28 * 28)
        assert tool.max_calls * (reply_tokens + 100) + 512 <= cfg.data.max_response_length
    else:
        assert "${grto_agent_data:" in str(_raw(cfg, "data.train_files"))
        assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (
            PROBE_PROMPT_LENGTH,
            PROBE_RESPONSE_LENGTH,
        )
