"""Shared by the benchmark scripts: the peak memory a call needs on top of what was already allocated.

On CUDA, the caching allocator's peak; on a Linux CPU, the process's resident-set high-water mark (the kernel's
counter, reset through /proc/self/clear_refs) after freed memory is handed back to the system with `malloc_trim`.
Both count what the call itself allocates (activations, KV cache, gradients), not the weights already in memory.
"""

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _resident_gib(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError(f"{field} not in {_STATUS}")


def peak_memory_supported(device: str) -> bool:
    return device == "cuda" or (_STATUS.exists() and os.access(_CLEAR_REFS, os.W_OK))


def peak_memory_gib(fn, device: str = "cpu") -> float:
    """GiB that `fn()` needs at its peak beyond the memory allocated before it ran."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    before = _resident_gib("VmRSS")
    _CLEAR_REFS.write_text("5")  # reset the high-water mark to the current resident size
    fn()
    return _resident_gib("VmHWM") - before
