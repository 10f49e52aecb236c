"""``verl-grto convert-sam2`` / ``export-sam2``: a Meta -> tool -> Meta round trip through the CLI, and its errors.

The round trip needs no Meta code: a Meta-format checkpoint is written from a tiny tool's weights
by the key mapping itself, plus video-memory tensors that only the base checkpoint carries. That
the mapping matches Meta's real modules is checked in test_tool_convert.py (and, through the CLI,
by the `sam2`-marked test below).
"""

from __future__ import annotations

import pytest
import torch
from test_tool_convert import TINY_OVERRIDES, meta_yaml, randomize_, tiny_hf_config  # noqa: F401 (fixture)

from verl_grto.cli import main
from verl_grto.tool.configs import META_CONFIG_NAMES
from verl_grto.tool.convert import hf_to_meta_state_dict
from verl_grto.tool.model import SegmentationTool

# Video-memory tensors (names as in Meta's checkpoints): the tool drops them, export restores them from the base.
VIDEO = {"maskmem_tpos_enc": (7, 1, 1, 64), "memory_encoder.out_proj.weight": (64, 32, 1, 1), "no_obj_ptr": (1, 32)}


@pytest.fixture(scope="module")
def meta_pt(tmp_path_factory):
    """A tiny Meta-format checkpoint (random weights, with video keys) and the config.json describing it."""
    root = tmp_path_factory.mktemp("meta")
    tool = SegmentationTool.from_config(tiny_hf_config(), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere (some tensors start at zero), the two positional copies kept tied
        for p in tool.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        tool.model.shared_image_embedding.positional_embedding.copy_(
            tool.model.prompt_encoder.shared_embedding.positional_embedding
        )
    state = {k: torch.randn(shape, generator=gen) for k, shape in VIDEO.items()}
    state.update(hf_to_meta_state_dict(tool.model.state_dict()))
    path = root / "tiny.pt"
    torch.save({"model": state}, path)
    tiny_hf_config().save_pretrained(root)  # root/config.json
    return path, root / "config.json"


def _error(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_round_trip_through_both_commands_is_exact(meta_pt, tmp_path):
    pt, config = meta_pt
    tool_dir, back = tmp_path / "tool", tmp_path / "back.pt"
    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", str(config), "--out", str(tool_dir)]) == 0
    assert SegmentationTool.from_pretrained(str(tool_dir)).image_size == 128
    assert main(["export-sam2", "--tool", str(tool_dir), "--out", str(back), "--base-checkpoint", str(pt)]) == 0
    original = torch.load(pt, weights_only=True)["model"]
    exported = torch.load(back, weights_only=True)["model"]
    assert list(exported) == list(original)  # Meta's key order, video keys included
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key


def test_export_without_base_writes_the_image_model_only(meta_pt, tmp_path):
    pt, config = meta_pt
    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", str(config), "--out", str(tmp_path / "t")]) == 0
    assert main(["export-sam2", "--tool", str(tmp_path / "t"), "--out", str(tmp_path / "img.pt")]) == 0
    exported = torch.load(tmp_path / "img.pt", weights_only=True)["model"]
    assert set(torch.load(pt, weights_only=True)["model"]) - set(exported) == set(VIDEO)


def test_convert_errors_exit_2_with_one_line(meta_pt, tmp_path, capsys):
    pt, config = meta_pt
    out = str(tmp_path / "out")

    assert (
        main(["convert-sam2", "--checkpoint", str(tmp_path / "nope.pt"), "--config", "sam2.1_hiera_t", "--out", out])
        == 2
    )
    assert _error(capsys) == f"verl-grto: error: checkpoint {tmp_path / 'nope.pt'} does not exist"

    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", "sam2.1_hiera_xl", "--out", out]) == 2
    err = _error(capsys)
    assert "unknown SAM2 config 'sam2.1_hiera_xl'" in err and all(name in err for name in META_CONFIG_NAMES)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert main(["convert-sam2", "--checkpoint", str(junk), "--config", str(config), "--out", out]) == 2
    assert "not a readable torch checkpoint" in _error(capsys)

    other = tmp_path / "other.pt"
    torch.save({"model": {"backbone.layer.weight": torch.zeros(2)}}, other)  # a torch file of another model
    assert main(["convert-sam2", "--checkpoint", str(other), "--config", str(config), "--out", out]) == 2
    assert "no transformers counterpart" in _error(capsys)

    torch.save({"epoch": 3}, other)
    assert main(["convert-sam2", "--checkpoint", str(other), "--config", str(config), "--out", out]) == 2
    assert "is not a Meta SAM2 checkpoint" in _error(capsys)

    # a real Meta layout, but the tiny shapes do not fit hiera_t (cheap: the model is built on the meta device)
    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", "sam2.1_hiera_t", "--out", out]) == 2
    assert "does not fit --config sam2.1_hiera_t" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_export_errors_exit_2_with_one_line(meta_pt, tmp_path, capsys):
    pt, config = meta_pt
    out = str(tmp_path / "x.pt")
    assert main(["export-sam2", "--tool", str(tmp_path / "missing"), "--out", out]) == 2
    assert _error(capsys) == f"verl-grto: error: tool {tmp_path / 'missing'} does not exist"

    assert main(["export-sam2", "--tool", str(tmp_path), "--out", out]) == 2
    assert "no config.json" in _error(capsys)

    tool_dir = tmp_path / "tool"
    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", str(config), "--out", str(tool_dir)]) == 0
    capsys.readouterr()
    assert (
        main(["export-sam2", "--tool", str(tool_dir), "--out", out, "--base-checkpoint", str(tmp_path / "b.pt")]) == 2
    )
    assert _error(capsys) == f"verl-grto: error: base checkpoint {tmp_path / 'b.pt'} does not exist"

    mismatched = tmp_path / "mismatched.pt"
    state = torch.load(pt, weights_only=True)["model"]
    state["no_mem_embed"] = torch.zeros(1, 1, 7)
    torch.save({"model": state}, mismatched)
    assert main(["export-sam2", "--tool", str(tool_dir), "--out", out, "--base-checkpoint", str(mismatched)]) == 2
    assert "shape mismatch with the base checkpoint" in _error(capsys)


@pytest.mark.sam2
def test_cli_round_trip_of_a_meta_model_loads_strictly_into_meta(meta_yaml, tmp_path):  # noqa: F811
    """With Meta's own (tiny) model: the exported file is one Meta's strict loader accepts, unchanged."""
    meta = meta_yaml("sam2.1_hiera_t", tuple(TINY_OVERRIDES))
    randomize_(meta, seed=7)
    pt, config = tmp_path / "meta.pt", tmp_path / "config.json"
    torch.save({"model": meta.state_dict()}, pt)
    tiny_hf_config().save_pretrained(tmp_path)
    assert main(["convert-sam2", "--checkpoint", str(pt), "--config", str(config), "--out", str(tmp_path / "t")]) == 0
    back = tmp_path / "back.pt"
    assert main(["export-sam2", "--tool", str(tmp_path / "t"), "--out", str(back), "--base-checkpoint", str(pt)]) == 0
    exported = torch.load(back, weights_only=True)["model"]
    meta.load_state_dict(exported, strict=True)
    assert all(torch.equal(exported[k], v) for k, v in torch.load(pt, weights_only=True)["model"].items())
