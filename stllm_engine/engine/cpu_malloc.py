"""glibc malloc settings for CPU serving: freed activation memory stays mapped between passes.

A CPU pass allocates its activations fresh (GEMM outputs of several MB: the ViT's fc1 output is
9 MB, a prefill's gate_up 7 MB at bench-cpu, 50 MB at ST-LLM-7B's ViT-g) and frees them at the
end. glibc's defaults give large blocks back to the kernel (``mmap`` above a threshold that adapts
up to 32 MiB, and a heap top trimmed above twice that), so the next pass touches fresh pages again:
measured 5,000-11,000 page faults a ViT + prefill at bench-cpu, at ~2 us each on this VM (a
fresh 40 MB mapping: 2.0-2.1 us a page). :func:`tune_malloc` sets fixed thresholds with
``mallopt`` so blocks under ``MMAP_THRESHOLD`` come from the heap and the heap is trimmed only
above ``TRIM_THRESHOLD``: after the first request the passes reuse mapped memory (0 faults).
The cost is that the process keeps its peak activation memory (up to ``TRIM_THRESHOLD`` of free
heap) instead of returning it between requests: bench-cpu bf16, after 16 single 720p answers and a
batch of 8, 1628 / 1633 MB resident vs 1510 / 1546 MB with glibc's defaults (1350 MB after load).

The settings are process-wide (glibc has one allocator per process). ``LLMEngine`` applies them
once it is built on the CPU, after its weights were loaded and packed (weights keep the default
placement: the large ones stay separate mappings, freed memory of dropped plain copies goes back).
``STLLM_CPU_MALLOC=default`` leaves glibc untouched; elsewhere than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV = "STLLM_CPU_MALLOC"  # "tuned" (default) | "default"
MODES = ("tuned", "default")
MMAP_THRESHOLD = 256 << 20  # blocks below come from the heap (glibc's adaptive maximum: 32 MiB)
TRIM_THRESHOLD = 1 << 30  # free heap top kept mapped up to this
TOP_PAD = 64 << 20  # the heap grows in steps this large (fewer brk calls)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h


def malloc_mode() -> str:
    """``STLLM_CPU_MALLOC`` as one of :data:`MODES` (a bad value raises, naming it)."""
    mode = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES}, got {mode!r}")
    return mode


def tune_malloc() -> str:
    """Apply the settings of the module doc unless ``STLLM_CPU_MALLOC=default``; returns what
    holds now: "tuned", "default" or "unavailable" (not glibc, or ``mallopt`` refused)."""
    if malloc_mode() == "default":
        return "default"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unavailable"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return "tuned" if ok else "unavailable"
