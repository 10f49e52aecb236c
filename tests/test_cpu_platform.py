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


@pytest.fixture()
def no_background_trim():
    """The process's heap trimmer paused (it would trim between the test's measurements)."""
    from verl_grto.platform import cpu

    running = cpu._trimmer is not None and cpu._trimmer.is_alive()
    if running:
        cpu._trimmer.stop.set()
        cpu._trimmer.join(timeout=30)
    yield
    if running:
        cpu.start_heap_trimmer()


HEAP_PROBE = """
import gc, json, sys
import psutil, torch
from verl_grto.platform import cpu
proc = psutil.Process()
first = torch.randn(64, 24, 480)
del first  # one free of a 2.9 MB mmapped block raises glibc's mmap threshold to it
base = proc.memory_full_info().uss
kept, pins = [], []
for _ in range(100):  # 100 x 1.4 MB, below the threshold now: from the heap, each followed by a small block that stays
    kept.append(torch.randn(64, 24, 240))
    pins.append(bytearray(4096))
sentinel = torch.empty(1 << 18)  # 1 MiB from the heap's top, kept: the freed tensors cannot merge into the top
grown = proc.memory_full_info().uss - base
del kept
gc.collect()
after_free = proc.memory_full_info().uss - base
cpu.CPU_DEVICE_MODULE.empty_cache()
after_trim = proc.memory_full_info().uss - base
print(json.dumps([grown, after_free, after_trim, cpu._malloc_trim() is not None]))
"""


def test_empty_cache_hands_freed_heap_pages_back_to_the_os(tmp_path):
    """What verl's empty_cache means on CPU: tensors of a few MB freed after glibc raised its mmap
    threshold stay resident (the heap keeps them) until the heap is trimmed; empty_cache trims it.
    In a fresh process (no plugin, no trimmer thread): a long test session's heap is in no known state."""
    import json
    import os

    script = tmp_path / "probe.py"
    script.write_text(HEAP_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, after_free, after_trim, has_trim = json.loads(out.stdout.strip().splitlines()[-1])
    if not has_trim:
        pytest.skip("no glibc malloc_trim here")
    assert grown > 100e6
    assert after_free > 0.5 * grown and after_trim < 0.2 * grown, (grown, after_free, after_trim)


def test_empty_cache_calls_malloc_trim(monkeypatch):
    from verl_grto.platform import cpu

    calls = []
    monkeypatch.setattr(cpu, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    CPU_DEVICE_MODULE.empty_cache()
    PlatformCPU().empty_cache()
    assert calls == [0, 0]


def test_heap_trimmer_runs_once_per_process_and_can_be_turned_off(monkeypatch, no_background_trim):
    from verl_grto.platform import cpu

    assert cpu.start_heap_trimmer(0) is None
    monkeypatch.setenv(cpu.HEAP_TRIM_ENV, "soon")
    with pytest.raises(ValueError, match="VERL_GRTO_HEAP_TRIM_S must be a number of seconds"):
        cpu.start_heap_trimmer()
    monkeypatch.delenv(cpu.HEAP_TRIM_ENV)
    thread = cpu.start_heap_trimmer(0.05)
    try:
        assert thread is not None and thread.is_alive() and thread.daemon
        assert cpu.start_heap_trimmer(0.05) is thread
    finally:
        if thread is not None:
            thread.stop.set()
            thread.join(timeout=5)


def test_arena_cap_is_set_through_glibcs_mallopt_in_a_running_process():
    """The in-driver task runner's MALLOC_ARENA_MAX (glibc reads the variable only at start): mallopt
    accepts the cap in a running process (a child, so the test process keeps its allocator), and a count
    below 1 is refused without calling it."""
    import subprocess
    import sys

    code = "from verl_grto.platform.cpu import cap_malloc_arenas as c; print(c(2), c(0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
