"""OmegaConf resolvers that let a recipe name the embedded tiny default instead of paths.

``${grto_asset:policy,0}`` and ``${grto_synthetic:plain,train,512,64,0}`` build the
tiny models / synthetic data on first use (deterministically, atomically, under a
file lock; see verl_grto.assets.build and verl_grto.data.synthetic) and return
their paths. So ``python -m verl.trainer.main_ppo --config-path recipes
--config-name grpo_tiny_cpu`` works on a fresh machine with nothing downloaded.
Resolved once, in verl's TaskRunner (``OmegaConf.resolve`` in main_ppo.py).
"""

from __future__ import annotations

from omegaconf import OmegaConf

ASSET_KINDS = ("policy", "tool", "policy_warm", "tool_pretrained", "policy_qwen3vl", "policy_agent")


def resolve_asset(kind: str, seed: int | str = 0) -> str:
    """``${grto_asset:KIND,SEED}`` -> a tiny model directory, built if missing.

    ``policy`` / ``tool``: randomly initialised; ``policy_warm``: the policy after its supervised
    warm start (it localises single objects: the reference policy); ``tool_pretrained``: the tool
    after pre-training on the plain domain (the stand-in for SAM2's own pre-training). The two trained
    ones are the shipped copies when current (:mod:`verl_grto.assets.shipped`), else built.
    ``policy_qwen3vl``: a randomly initialised tiny Qwen3-VL (:mod:`verl_grto.assets.qwen3vl`).
    ``policy_agent``: the warm policy taught the segmentation tool's call format, for the multi-turn
    recipes (:mod:`verl_grto.assets.agent_warmstart`; shipped when current)."""
    from verl_grto.assets.build import ensure_assets

    seed = int(seed)
    if kind == "policy_qwen3vl":
        from verl_grto.assets.build import ensure_tiny_qwen3vl

        return str(ensure_tiny_qwen3vl(None, seed=seed))
    if kind in ("policy", "tool"):
        return str(getattr(ensure_assets(None, seed=seed), kind))
    if kind == "policy_warm":
        from verl_grto.assets.warmstart import ensure_warm_policy

        return str(ensure_warm_policy(None, seed=seed))
    if kind == "policy_agent":
        from verl_grto.assets.agent_warmstart import ensure_agent_policy

        return str(ensure_agent_policy(None, seed=seed))
    if kind == "tool_pretrained":
        from verl_grto.assets.tool_pretrain import ensure_pretrained_tool

        return str(ensure_pretrained_tool(None, seed=seed))
    raise ValueError(f"grto_asset: unknown asset {kind!r}; expected one of {ASSET_KINDS}")


def resolve_synthetic(
    domain: str,
    split: str,
    n_train: int | str,
    n_val: int | str,
    seed: int | str = 0,
    max_objects: int | str = 4,
    min_objects: int | str = 2,
    coords: str = "pixels",
) -> str:
    """``${grto_synthetic:DOMAIN,SPLIT,N_TRAIN,N_VAL,SEED[,MAX_OBJ[,MIN_OBJ[,COORDS]]]}`` -> a parquet path.

    ``COORDS``: the rows' coordinate convention, ``pixels`` (the tiny Qwen2.5-VL) or ``norm1000`` (the
    tiny Qwen3-VL; :mod:`verl_grto.data.frame`)."""
    from verl_grto.assets.build import default_home
    from verl_grto.data.synthetic import ensure_synthetic

    splits = ensure_synthetic(
        default_home() / "data",
        domain=domain,
        n_train=int(n_train),
        n_val=int(n_val),
        seed=int(seed),
        max_objects=int(max_objects),
        min_objects=int(min_objects),
        coords=str(coords),
    )
    if split not in splits:
        raise ValueError(f"grto_synthetic: unknown split {split!r}; have {sorted(splits)}")
    return str(splits[split])


TOOL_CONFIGS = {"trained": "segment_tool.yaml", "frozen": "segment_tool_frozen.yaml"}


def resolve_tool_config(mode: str = "trained") -> str:
    """``${grto_tool_config:trained|frozen}`` -> the absolute path of the shipped segmentation tool YAML
    (verl_grto/agent/), for ``actor_rollout_ref.rollout.multi_turn.tool_config_path``: absolute, so every
    agent-loop worker finds it whatever its working directory."""
    from pathlib import Path

    import verl_grto.agent

    if mode not in TOOL_CONFIGS:
        raise ValueError(f"grto_tool_config: unknown mode {mode!r}; expected one of {sorted(TOOL_CONFIGS)}")
    return str(Path(verl_grto.agent.__file__).resolve().parent / TOOL_CONFIGS[mode])


def resolve_chat_template(name: str) -> str:
    """``${grto_chat_template:qwen25vl_tool}`` -> a chat template of :mod:`verl_grto.agent.templates` (for
    ``actor_rollout_ref.model.custom_chat_template``)."""
    from verl_grto.agent.templates import TEMPLATES

    if name not in TEMPLATES:
        raise ValueError(f"grto_chat_template: unknown template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def resolve_agent_data(path: str) -> str:
    """``${grto_agent_data:FILE}`` -> a copy of the parquet ``FILE`` whose rows go through the multi-turn loop
    with the segmentation tool (``agent_name``, ``extra_info.tools_kwargs``: :mod:`verl_grto.agent.data`)."""
    from verl_grto.agent.data import ensure_agent_data

    return str(ensure_agent_data(path))


RESOLVERS = {
    "grto_asset": resolve_asset,
    "grto_synthetic": resolve_synthetic,
    "grto_tool_config": resolve_tool_config,
    "grto_chat_template": resolve_chat_template,
    "grto_agent_data": resolve_agent_data,
}


def register_resolvers() -> list[str]:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    return list(RESOLVERS)
