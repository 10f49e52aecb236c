"""``verl-grto evaluate / predict --checkpoint``: verl's ``global_step_N`` layouts made here from the tiny policy.

The layouts are the ones verl 0.9.1's FSDP checkpoint manager writes (checked on real runs by
tests/test_e2e_bgrto.py and tests/test_e2e_lora.py): ``actor/huggingface`` with full weights
(``save_contents`` with ``hf_model``), FSDP shards only (DTensors, saved under a one-rank gloo group as
the trainer saves them), a LoRA actor's shards (PEFT names, ``lora_train_meta.json``) and a LoRA actor's
``actor/huggingface`` (which verl fills with PEFT-named weights that transformers alone would load as an
untrained model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from verl_grto.cli import main
from verl_grto.eval.checkpoint import STAMP, CheckpointError, checkpoint_models, step_dir
from verl_grto.policy.load import load_policy

LORA_R, LORA_ALPHA = 4, 8


def _hf_files(src: Path, dst: Path, weights: bool) -> None:
    """A Hugging Face folder as verl writes it: config, tokenizer, processor; the weights only with ``hf_model``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (weights or not f.name.startswith("model.")):
            shutil.copy(f, dst / f.name)


def _step(root: Path, tool: Path, step: int = 3) -> Path:
    """An empty run folder with ``global_step_<step>``, its tool, and verl's tracker."""
    step_path = root / f"global_step_{step}"
    (step_path / "actor").mkdir(parents=True)
    shutil.copytree(tool, step_path / "tool")
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return step_path


def _save_dtensor_shard(state: dict[str, torch.Tensor], actor: Path, store: Path) -> None:
    """``model_world_size_1_rank_0.pt`` of DTensors (Shard(0), a one-rank mesh) and ``fsdp_config.json``,
    as verl's FSDP2 checkpoint manager writes them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
        shard = {k: distribute_tensor(v.detach().clone(), mesh, [Shard(0)]) for k, v in state.items()}
        torch.save(shard, actor / "model_world_size_1_rank_0.pt")
    finally:
        dist.destroy_process_group()
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))


def _lora_model(policy: Path) -> torch.nn.Module:
    """The tiny policy with a LoRA adapter on the language model, trained (non-zero ``lora_B``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, _, _ = load_policy(str(policy))
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules="all-linear",
        exclude_modules=".*visual.*",
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    return peft_model


def _lora_meta(actor: Path) -> None:
    (actor / "lora_train_meta.json").write_text(
        json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA, "task_type": "CAUSAL_LM"})
    )


def _base_state(policy: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_policy(str(policy))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loaded(models) -> dict[str, torch.Tensor]:
    model, _, _ = load_policy(str(models.policy), adapter=models.adapter)
    return dict(model.state_dict())


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(want)
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= atol, f"max weight difference {worst:.3g} > {atol}"


def test_full_huggingface_weights_are_used_as_they_are(tiny_assets, tmp_path):
    step = _step(tmp_path / "run", tiny_assets.tool)
    _hf_files(tiny_assets.policy, step / "actor" / "huggingface", weights=True)
    for where in (step, tmp_path / "run"):  # the step folder, or the run folder (its latest step)
        models = checkpoint_models(where, tmp_path / "merged")
        assert models.policy == step / "actor" / "huggingface" and models.adapter is None
        assert models.tool == step / "tool" and models.policy_from == "actor/huggingface"
    assert not (tmp_path / "merged").exists()  # nothing merged


def test_fsdp_shards_are_merged_with_verls_merger_once(tiny_assets, tmp_path):
    step = _step(tmp_path / "run", tiny_assets.tool)
    actor = step / "actor"
    _hf_files(tiny_assets.policy, actor / "huggingface", weights=False)
    base = _base_state(tiny_assets.policy)  # the module's own names, as the FSDP actor saves them
    _save_dtensor_shard(base, actor, tmp_path / "store")

    models = checkpoint_models(step, tmp_path / "merged")
    assert models.policy == tmp_path / "merged" and models.adapter is None
    assert models.policy_from == "merged FSDP shards"
    # verl's merger stores bf16: the weights are the actor's, rounded to bf16
    _assert_close(_loaded(models), {k: v.bfloat16() for k, v in base.items()}, atol=0.0)
    stamp = (tmp_path / "merged" / STAMP).stat().st_mtime_ns
    assert checkpoint_models(step, tmp_path / "merged").policy == models.policy  # reused, not merged again
    assert (tmp_path / "merged" / STAMP).stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".merged.*"))  # no half-written merge left beside it

    # a merged folder of other files is refused, never silently reused
    other = _step(tmp_path / "other", tiny_assets.tool, step=4)
    _hf_files(tiny_assets.policy, other / "actor" / "huggingface", weights=False)
    shutil.copy(actor / "model_world_size_1_rank_0.pt", other / "actor")
    shutil.copy(actor / "fsdp_config.json", other / "actor")
    with pytest.raises(CheckpointError, match="merged from other files"):
        checkpoint_models(other, tmp_path / "merged")


@pytest.mark.parametrize("where", ["shards", "huggingface"])
def test_a_lora_checkpoint_loads_as_base_plus_adapter(tiny_assets, tmp_path, where):
    step = _step(tmp_path / "run", tiny_assets.tool)
    actor = step / "actor"
    peft_model = _lora_model(tiny_assets.policy)
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}  # PEFT names, as verl saves
    _lora_meta(actor)
    if where == "shards":
        _hf_files(tiny_assets.policy, actor / "huggingface", weights=False)
        _save_dtensor_shard(state, actor, tmp_path / "store")
    else:  # save_contents with hf_model: verl writes the PEFT-named full state dict there
        _hf_files(tiny_assets.policy, actor / "huggingface", weights=False)
        save_file(state, str(actor / "huggingface" / "model.safetensors"))

    models = checkpoint_models(step, tmp_path / "merged")
    assert models.adapter == tmp_path / "merged" / "lora_adapter"
    config = json.loads((models.adapter / "adapter_config.json").read_text())
    assert config["r"] == LORA_R and config["lora_alpha"] == LORA_ALPHA
    trained = sorted(n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n in state if ".lora_A." in n)
    assert config["target_modules"] == trained  # exactly the trained modules: no fresh adapter on the vision MLP
    assert not any("visual" in m for m in config["target_modules"])

    if where == "shards":  # bf16 (verl's merger), merged by PEFT in fp32
        with torch.no_grad():
            for p in peft_model.parameters():
                p.copy_(p.bfloat16().float())
        atol = 1e-6
    else:  # the fp32 weights themselves
        atol = 1e-6
        assert models.policy_from == "merged actor/huggingface (PEFT names)"
    want = dict(peft_model.merge_and_unload().state_dict())
    _assert_close(_loaded(models), want, atol=atol)
    base = _base_state(tiny_assets.policy)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert (want[q] - base[q]).abs().max() > 1e-3  # the adapter moved the weights: the check has teeth


def test_checkpoint_errors_name_what_is_missing(tiny_assets, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        step_dir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="neither a global_step_N folder nor a run folder"):
        step_dir(tmp_path / "plain")
    (tmp_path / "plain" / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="global_step_7 does not exist"):
        step_dir(tmp_path / "plain")

    step = _step(tmp_path / "run", tiny_assets.tool)
    shutil.rmtree(step / "tool")
    with pytest.raises(CheckpointError, match="has no tool"):
        checkpoint_models(step, tmp_path / "m")
    shutil.copytree(tiny_assets.tool, step / "tool")
    _hf_files(tiny_assets.policy, step / "actor" / "huggingface", weights=False)
    with pytest.raises(CheckpointError, match="neither Hugging Face weights nor FSDP shards"):
        checkpoint_models(step, tmp_path / "m")
    (step / "actor" / "model" / "dist_ckpt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="Megatron checkpoint without Hugging Face weights"):
        checkpoint_models(step, tmp_path / "m")
    shutil.rmtree(step / "actor" / "model")

    # a LoRA run saved with save_lora_only has no base weights to merge into
    peft_model = _lora_model(tiny_assets.policy)
    adapter_only = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    _save_dtensor_shard(adapter_only, step / "actor", tmp_path / "store")
    with pytest.raises(CheckpointError, match="only the LoRA adapter"):
        checkpoint_models(step, tmp_path / "m")


def test_evaluate_and_predict_take_a_checkpoint(tiny_assets, tmp_path, capsys):
    from verl_grto.data.synthetic import write_synthetic

    split = write_synthetic(tmp_path / "data", n_train=1, n_val=3, seed=0, domain="plain")["val"]
    step = _step(tmp_path / "run", tiny_assets.tool)
    peft_model = _lora_model(tiny_assets.policy)
    _lora_meta(step / "actor")
    _hf_files(tiny_assets.policy, step / "actor" / "huggingface", weights=False)
    save_file(
        {k: v.detach().clone() for k, v in peft_model.state_dict().items()},
        str(step / "actor" / "huggingface" / "model.safetensors"),
    )

    out = tmp_path / "ev"
    common = ["--max-new-tokens", "8", "--device", "cpu"]
    assert (
        main(["evaluate", "--split", str(split), "--checkpoint", str(tmp_path / "run"), "--out", str(out), *common])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 3 and report["policy"]["answered"] == 3
    assert report["models"]["checkpoint"] == str(step) and report["models"]["tool"] == str(step / "tool")
    assert report["models"]["adapter"] == str(out / "policy" / "lora_adapter")  # merged under --out by default
    capsys.readouterr()

    import pyarrow.parquet as pq

    image = tmp_path / "scene.png"
    image.write_bytes(pq.read_table(split).to_pylist()[0]["images"][0]["bytes"])
    mask = tmp_path / "mask.png"
    args = ["predict", "--checkpoint", str(step), "--image", str(image), "--prompt", "the red ring", "--out", str(mask)]
    assert main([*args, *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert mask.is_file() and printed["answer"] is not None
    assert (
        main(["predict", "--checkpoint", str(step), "--image", str(image), "--box", "1,1,30,30", "--out", str(mask)])
        == 0
    )


def test_checkpoint_flag_errors(tiny_assets, tmp_path, capsys):
    from verl_grto.data.synthetic import write_synthetic

    split = str(write_synthetic(tmp_path / "data", n_train=1, n_val=1, seed=0, domain="plain")["val"])
    out = str(tmp_path / "ev")
    assert main(["evaluate", "--split", split, "--out", out, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "--checkpoint: checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--split", split, "--out", out, "--adapter", out, "--tool", out]) == 2
    assert "give --policy too" in capsys.readouterr().err
    step = _step(tmp_path / "run", tiny_assets.tool)
    (step / "actor" / "huggingface").mkdir()
    assert main(["evaluate", "--split", split, "--out", out, "--checkpoint", str(step)]) == 2
    assert "has no config.json" in capsys.readouterr().err
