"""LoRA on the policy: the ``hf`` rollout server's two sync modes, verl's FSDP2 merge, the merged sync's dtype.

The end-to-end run of both modes through ``main_ppo`` (parity in verl's own
``training/rollout_probs_diff_max``) is tests/test_e2e_lora.py; here each piece alone, in seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import verl  # noqa: F401  (plugin registration: the patches)
from test_hf_rollout import LOGPROB_TOL, _actor_logprobs, _generate, _prompt

from verl_grto.policy.load import load_policy
from verl_grto.rollout.hf_server import HFRolloutServer
from verl_grto.rollout.weight_sync import WeightSyncError, base_model, is_peft_model

#: the tiny recipes' LoRA (recipes/lora/tiny_cpu.yaml), as verl builds it (transformer_impl.py:359-368)
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "exclude_modules": ".*visual.*"}


def _peft_actor(policy, seed: int = 0, **overrides):
    """The tiny policy with verl's LoRA config and a trained adapter (non-zero ``lora_B``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, _, _ = load_policy(str(policy))
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, bias="none", **{**LORA, **overrides})
    torch.manual_seed(seed)  # lora_A's initialisation
    actor = get_peft_model(model, config).eval()
    _train(actor, seed)
    return actor


def _train(actor, seed: int) -> None:
    """Move the adapter as a few optimiser steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _adapter_sync(actor) -> tuple[dict[str, torch.Tensor], dict]:
    """What verl sends with ``lora.merge=false`` (fsdp_utils.py:715-760, transformer_impl.py:1001-1060)."""
    from peft.utils import get_peft_model_state_dict

    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(actor).items()}
    return tensors, actor.peft_config["default"].to_dict()


def _gap(server, actor, ids, images) -> float:
    """Max |rollout - actor| log-prob over a sampled answer (the actor: a transformers model, LoRA layers in it)."""
    out = _generate(server, ids, images)
    model = base_model(actor)
    return float((torch.tensor(out.log_probs) - _actor_logprobs(model, server, ids, images, out.token_ids)).abs().max())


@pytest.fixture
def server(tiny_assets):
    return HFRolloutServer(str(tiny_assets.policy), {"response_length": 24, "prompt_length": 256}, seed=0)


def test_adapter_sync_serves_the_actors_adapter_after_each_sync(server, tiny_assets):
    actor = _peft_actor(tiny_assets.policy)
    ids, images = _prompt(server)
    assert _gap(server, actor, ids, images) > 10 * LOGPROB_TOL  # the base model is not the adapted actor

    tensors, config = _adapter_sync(actor)
    assert all("lora_" in name for name in tensors)
    assert server.update_weights(tensors, global_steps=1, peft_config=config, base_sync_done=True) == len(tensors)
    assert is_peft_model(server.model)
    assert _gap(server, actor, ids, images) < LOGPROB_TOL

    _train(actor, seed=1)  # the next step's adapter: loaded into the same wrapped model
    tensors, config = _adapter_sync(actor)
    server.update_weights(tensors, global_steps=2, peft_config=config, base_sync_done=True)
    assert _gap(server, actor, ids, images) < LOGPROB_TOL
    assert all(p.dtype == torch.float32 for p in server.model.parameters())  # the served model's dtype


def test_merged_sync_serves_the_merged_weights_in_the_served_dtype(server, tiny_assets):
    actor = _peft_actor(tiny_assets.policy)
    merged = actor.merge_and_unload()
    ids, images = _prompt(server)
    assert _gap(server, merged, ids, images) > 10 * LOGPROB_TOL
    server.update_weights({k: v.clone() for k, v in merged.state_dict().items()}, global_steps=1)
    assert not is_peft_model(server.model)
    assert _gap(server, merged, ids, images) < LOGPROB_TOL


def test_base_tensors_with_lora_names_fill_the_base_layers(server, tiny_assets):
    """``base_sync_done=False`` (a rollout started from dummy weights): base tensors named as the
    LoRA-wrapped actor's (``...q_proj.base_layer.weight``, verl's replace_lora_wrapper), then the adapter."""
    actor = _peft_actor(tiny_assets.policy)
    base = {
        k.removeprefix("base_model.model."): v.detach().clone() + 0.01
        for k, v in actor.state_dict().items()
        if "lora_" not in k
    }
    assert any(".base_layer." in k for k in base)
    tensors, config = _adapter_sync(actor)
    server.update_weights(base, global_steps=0, peft_config=config, base_sync_done=False)
    server.update_weights(tensors, global_steps=1, peft_config=config, base_sync_done=True)
    served = dict(server.model.named_parameters())
    name = "model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(served[f"base_model.model.{name}"], base[name])


def test_an_adapter_that_does_not_fit_is_refused(server, tiny_assets):
    actor = _peft_actor(tiny_assets.policy)
    tensors, config = _adapter_sync(actor)
    extra = {**tensors, "base_model.model.model.not_a_layer.lora_A.weight": torch.zeros(8, 8)}
    with pytest.raises(WeightSyncError, match="1 unknown tensors"):
        server.update_weights(extra, peft_config=config)
    server.update_weights(tensors, peft_config=config)
    missing = dict(list(tensors.items())[1:])
    with pytest.raises(WeightSyncError, match="1 adapter weights not sent"):
        server.update_weights(missing, peft_config=config)
    other_tensors, other_config = _adapter_sync(_peft_actor(tiny_assets.policy, r=4))
    with pytest.raises(WeightSyncError, match="adapter config changed"):
        server.update_weights(other_tensors, peft_config=other_config)
    with pytest.raises(WeightSyncError, match="only LoRA adapters"):
        HFRolloutServer(str(tiny_assets.policy), {"response_length": 8, "prompt_length": 256}).update_weights(
            tensors, peft_config={**config, "peft_type": "IA3"}
        )


# ---- verl's FSDP2 side (one-rank gloo group, fully_shard as verl's engine applies it) ----


@pytest.fixture
def one_rank(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    finally:
        dist.destroy_process_group()


def _fsdp2(model, mesh):
    """``model`` wrapped by verl's own ``apply_fsdp2`` (decoder layers, vision blocks, embeddings, lm_head, root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from verl.utils.fsdp_utils import apply_fsdp2

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    apply_fsdp2(model, {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": True}, {})
    return model


def _unmerged_after_verls_merge(model) -> list[str]:
    from peft.tuners.lora import LoraLayer
    from verl.utils.fsdp_utils import fsdp_merge_unmerge

    fsdp_merge_unmerge(model, do_merge=True)
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not m.merged)


def test_verls_fsdp2_merge_skips_lora_outside_wrapped_blocks(tiny_assets, one_rank):
    """verl/utils/fsdp_utils.py:926-931 merges LoRA only inside wrapped non-root submodules. With LoRA
    on every linear layer, the vision merger's layers (not in any wrapped block) stay unmerged, so a
    merged sync would send them without their adapter; the recipes' ``exclude_modules: .*visual.*``
    leaves no LoRA layer outside the wrapped decoder layers."""
    everywhere = _fsdp2(_peft_actor(tiny_assets.policy, exclude_modules=None), one_rank)
    assert _unmerged_after_verls_merge(everywhere) == [
        "base_model.model.model.visual.merger.mlp.0",
        "base_model.model.model.visual.merger.mlp.2",
    ]
    language_only = _fsdp2(_peft_actor(tiny_assets.policy), one_rank)
    assert _unmerged_after_verls_merge(language_only) == []


def test_the_merged_sync_keeps_the_actors_compute_dtype(tiny_assets, one_rank):
    """verl_grto/patches.py: the merged tensors leave in the actor's compute dtype (fp32 here), not
    bf16, and are the PEFT merge of the adapter into the base weights; the adapter is unmerged after."""
    from types import SimpleNamespace

    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    actor = _peft_actor(tiny_assets.policy)
    want = {k: v.detach().clone() for k, v in _peft_actor(tiny_assets.policy).merge_and_unload().state_dict().items()}
    module = _fsdp2(actor, one_rank)
    engine = SimpleNamespace(module=module, _autocast_dtype=torch.float32, _is_offload_param=False)
    got = dict(FSDPEngine._merged_lora_per_tensor_param(engine))
    assert sorted(got) == sorted(want)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6
    engine_bf16 = SimpleNamespace(module=module, _autocast_dtype=torch.bfloat16, _is_offload_param=False)
    sharded = {k: v for k, v in dict(FSDPEngine._merged_lora_per_tensor_param(engine_bf16)).items()}
    assert (
        sharded["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    )  # verl's GPU default
    again = dict(FSDPEngine._merged_lora_per_tensor_param(engine))  # the merge was undone in between
    assert all(torch.equal(again[k], got[k]) for k in got)
