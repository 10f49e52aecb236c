"""A CPU platform for verl's platform registry.

verl 0.9.1 ships CUDA, NPU and ROCm platforms only; on a machine without an
accelerator its detection falls back to "nvidia" and the first NCCL call fails.
This platform lets verl's unmodified Ray / FSDP2 orchestration run on CPU
processes: one "device" per worker, gloo for collectives.

Ray resources: verl's ResourcePoolManager always asks Ray for GPUs
(``single_controller/ray/base.py`` create_resource_pool / _check_resource_available),
so the CPU platform reports its resource as ``"GPU"`` and CPU recipes start Ray
with *logical* GPUs (``+ray_kwargs.ray_init.num_gpus=N``): one logical GPU is
one CPU worker slot, nothing more.

Memory: ``empty_cache()``, which verl calls where a GPU run hands cached blocks back to the device
(the weight sync of every step), hands the C heap's free pages back to the OS here
(:func:`release_free_heap`); :func:`start_heap_trimmer` does the same every 30 s in every
process of a CPU run. Why: glibc raises its mmap threshold after the first large free, so later
tensors of a few MB come from the heap, and freeing them keeps the pages (measured: 423 MiB of freed
1.4 MB tensors stayed resident until ``malloc_trim``; docs/benchmarks.md, "Main job memory").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
import types
from typing import Any

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase

#: Seconds between two heap trims of :func:`start_heap_trimmer` (0 turns the trimmer off).
HEAP_TRIM_ENV = "VERL_GRTO_HEAP_TRIM_S"
DEFAULT_HEAP_TRIM_S = 30.0


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


#: glibc's ``mallopt`` parameter for the arena cap (malloc.h: ``M_ARENA_MAX``), what ``MALLOC_ARENA_MAX`` sets.
_M_ARENA_MAX = -8


def cap_malloc_arenas(count: int) -> bool:
    """``MALLOC_ARENA_MAX`` for a process that is already running (glibc reads the variable only at start):
    threads that allocate get at most ``count`` arenas from now on. Returns False where there is no glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or count < 1:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def release_free_heap() -> bool:
    """Give the pages the C heap holds free back to the OS (``malloc_trim(0)``, all arenas); a few ms.

    Returns whether anything was released (False also where there is no glibc). Live memory is untouched.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


_trimmer: threading.Thread | None = None


def start_heap_trimmer(interval_s: float | None = None) -> threading.Thread | None:
    """Run :func:`release_free_heap` every ``interval_s`` seconds in a daemon thread, once per process.

    ``interval_s`` defaults to ``$VERL_GRTO_HEAP_TRIM_S``, 30 s: each trim hands back pages that a busy
    process then faults in again (every 5 s, the main job's 32 GRTO steps took 173-192 s against 151-163 s
    without a trimmer, single runs of a machine whose stages vary by ~15%: docs/benchmarks.md). 0, or a C
    library without ``malloc_trim``, starts nothing. Returns the thread (the running one when called again)."""
    global _trimmer
    if _trimmer is not None and _trimmer.is_alive():
        return _trimmer
    if interval_s is None:
        raw = os.environ.get(HEAP_TRIM_ENV, str(DEFAULT_HEAP_TRIM_S))
        try:
            interval_s = float(raw)
        except ValueError:
            raise ValueError(f"{HEAP_TRIM_ENV} must be a number of seconds (0 = off), got {raw!r}") from None
    if interval_s <= 0 or _malloc_trim() is None:
        return None
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            release_free_heap()

    _trimmer = threading.Thread(target=run, name="verl-grto-heap-trim", daemon=True)
    _trimmer.stop = stop  # type: ignore[attr-defined]
    _trimmer.start()
    return _trimmer


class _CpuDeviceModule(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` where verl calls ``get_torch_device().<fn>``.

    ``torch.cpu`` lacks the memory, RNG and IPC calls verl makes (empty_cache,
    mem_get_info, get_rng_state, ...). They get CPU meanings here: host memory
    for mem_get_info, the global CPU generator for the RNG, the C heap's free
    pages back to the OS for empty_cache, no-ops for the others.
    """

    def __getattr__(self, name: str) -> Any:  # anything not defined below: torch.cpu's
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        # FSDP/FSDP2 take ``device_id=get_device_id()``; an int 0 would name an
        # accelerator ("Cannot access accelerator device"), the string "cpu" does not.
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        # verl/utils/flops_counter.py looks the name up in a table and needs a str.
        return "CPU"

    @staticmethod
    def empty_cache() -> None:
        release_free_heap()

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return int(psutil.Process().memory_info().rss)

    memory_reserved = memory_allocated
    max_memory_allocated = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


CPU_DEVICE_MODULE = _CpuDeviceModule()


class PlatformCPU(PlatformBase):
    """verl platform for processes that only have CPUs (tests, debugging, the tiny demo)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.SimpleNamespace:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Registered after cuda/npu/rocm, so auto-detection reaches it only when
        # none of them is present; VERL_PLATFORM=cpu forces it on any machine.
        return True

    def current_device(self) -> str:  # type: ignore[override]
        return CPU_DEVICE_MODULE.current_device()

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        release_free_heap()

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for actors holding (logical) GPUs; it means nothing on CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None

    def get_device_uuid(self, device_id: int) -> str:
        return f"cpu-{os.getpid()}-{device_id}"
