"""The CPU platform: what verl asks of a platform, answered for host-only processes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from verl_grto.platform.cpu import CPU_DEVICE_MODULE, PlatformCPU


def test_platform_contract():
    p = PlatformCPU()
    assert p.device_name == "cpu"
    assert p.current_device() == "cpu"  # FSDP device_id must not be an accelerator index
    assert p.communication_backend_name() == "gloo"
    assert p.ray_resource_name() == "GPU"  # verl's resource pools ask Ray for GPUs: logical ones
    assert p.ray_resource_options(1) == {"num_gpus": 1}
    assert p.is_available() and p.device_count() == 1
    with p.nvtx_range("x"):
        pass


def test_device_module_stands_in_for_torch_cuda():
    dm = CPU_DEVICE_MODULE
    free, total = dm.mem_get_info()
    assert 0 < free <= total
    assert dm.get_device_name() == "CPU"  # verl/utils/flops_counter.py needs a string
    state = dm.get_rng_state()
    a = torch.rand(3)
    dm.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    dm.empty_cache()
    dm.synchronize()  # falls through to torch.cpu
    assert dm.memory_allocated() > 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU host detects cuda first")
def test_verl_detects_cpu_platform_in_fresh_process():
    code = (
        "import verl; from verl.utils.device import get_device_name, get_nccl_backend;"
        "print(get_device_name(), get_nccl_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "cpu gloo"


def test_fsdp_engines_resolve_on_cpu():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
