"""Runs tests/isolated_fsdp_recipe_workers.py in a child pytest: verl's FSDP engines built for the
full-size FSDP recipes (Qwen2.5-VL-7B, single- and multi-turn; Qwen3-VL-8B) with the tool mixed into their worker, on CPU.

A child because the worker initialises ``torch.distributed`` and verl's device meshes in its process,
which the other tests of this session must not inherit."""

from __future__ import annotations

from child_pytest import run_child_pytest


def test_the_fsdp_recipes_build_their_workers_on_cpu() -> None:
    assert run_child_pytest("tests/isolated_fsdp_recipe_workers.py").startswith("6 passed")
