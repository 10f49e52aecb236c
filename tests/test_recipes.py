"""Every recipe composes, resolves and passes the checks verl's ``main_ppo`` runs before training.

The GPU recipes cannot run here, so this is their only gate: a typo in a key, a batch size that
does not divide, a ``grto:`` section the trainer would reject, or a trainer mode the plugin does not
register all fail in seconds instead of after a multi-node job has been scheduled.

The tiny recipes' ``${grto_asset:...}`` / ``${grto_synthetic:...}`` resolvers *build* models and data
(minutes on this machine), so those recipes are checked unresolved, then validated with the
resolver-backed paths replaced by placeholders: everything else in them is resolved and validated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import verl  # noqa: F401  (first: loads the verl_grto plugin, which registers resolvers, trainer, estimator)
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
from verl.utils.config import validate_config

from verl_grto.trainer.config import AgentConfig, BTOConfig, GRTOConfig

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.endswith("_base"))
pytestmark = pytest.mark.filterwarnings("ignore:Disabled critic:UserWarning")  # GRPO-style runs have no critic

GPU_RECIPES = (
    "grto_agent_qwen25vl_7b_sam21_large",
    "grto_qwen25vl_7b_sam21_large",
    "grto_qwen25vl_7b_sam21_large_megatron",
    "grto_qwen3vl_8b_sam21_large",
    "grto_qwen3vl_30b_a3b_sam21_large_megatron",
)
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


def test_the_gpu_recipes_are_found() -> None:
    assert set(GPU_RECIPES) <= set(RECIPES)
    assert not [r for r in RECIPES if r.endswith("_base")]


def _raw(cfg: DictConfig, key: str) -> object:
    """The value at `key` as written (interpolations unresolved), or None if the key is absent."""
    node: object = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in GPU_RECIPES])
def test_tiny_recipe_composes_and_validates(name: str, tmp_path: Path) -> None:
    cfg = _compose(name)
    assert cfg.trainer.device == "cpu"
    assert cfg.actor_rollout_ref.rollout.name == "hf"
    present = [key for key in RESOLVER_KEYS if _raw(cfg, key) is not None]
    assert "data.train_files" in present and "actor_rollout_ref.model.path" in present
    for key in present:
        assert str(_raw(cfg, key)).startswith("${grto_"), f"{name}: {key} should come from an asset resolver"
        OmegaConf.update(cfg, key, str(tmp_path / key))
    text = OmegaConf.to_yaml(cfg, resolve=False)
    for cheap in CHEAP_RESOLVERS:
        text = text.replace(cheap, "")
    assert "${grto_" not in text, "resolving would build assets"
    _validate(cfg)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_resolves_and_validates(name: str, tmp_path: Path) -> None:
    cfg = _compose(name)
    _validate(cfg)
    assert cfg.data.train_files == str(tmp_path / "train_files")
    assert cfg.data.val_files == str(tmp_path / "val_files")
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "policy_path")
    assert cfg.trainer.v1.trainer_mode == ("grto_agent" if name in AGENT_RECIPES else "grto")
    assert cfg.trainer.n_gpus_per_node == 8
    arr = cfg.actor_rollout_ref
    assert arr.rollout.name == "vllm" and arr.rollout.n == 8 and arr.rollout.dtype == "bfloat16"
    assert arr.actor.use_kl_loss and arr.actor.kl_loss_type == "low_var_kl"
    grto = GRTOConfig.from_config(cfg.grto)
    assert grto.tool.path == str(tmp_path / "tool_path")
    assert grto.tool.lr == pytest.approx(1e-5) and grto.tool.max_grad_norm == 1.0
    assert grto.tool.loss.resolution == 256
    assert grto.trains_tool


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


def test_bgrto_main_job_is_b_grto_on_camouflage() -> None:
    cfg = _compose("bgrto_tiny_cpu")
    assert cfg.trainer.v1.trainer_mode == "bgrto" and cfg.algorithm.adv_estimator == "grto"
    assert "camouflage" in str(_raw(cfg, "data.train_files")) and cfg.trainer.val_before_train
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
