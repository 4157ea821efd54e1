"""glibc malloc tuning for CPU serving (``stllm_engine/engine/cpu_malloc.py``): the setting's
parsing, and that after tuning a freed multi-MB activation's pages are reused instead of faulted
in again (the effect it exists for)."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from stllm_engine.engine import cpu_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_mode_parsing(monkeypatch):
    monkeypatch.delenv(cpu_malloc.ENV, raising=False)
    assert cpu_malloc.malloc_mode() == "tuned"
    monkeypatch.setenv(cpu_malloc.ENV, " Default ")
    assert cpu_malloc.malloc_mode() == "default"
    assert cpu_malloc.tune_malloc() == "default"
    monkeypatch.setenv(cpu_malloc.ENV, "jemalloc")
    with pytest.raises(ValueError, match="STLLM_CPU_MALLOC must be one of"):
        cpu_malloc.tune_malloc()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
# 48 MB is above glibc's adaptive 32 MiB mmap maximum: with the defaults every pass maps it anew
# (36,867 faults in 3 passes, measured); 8 MB is below it (the defaults also reuse it in a loop)
@pytest.mark.parametrize("mb", [8, 48])
def test_tuned_heap_reuses_freed_activation_pages(monkeypatch, mb):
    monkeypatch.delenv(cpu_malloc.ENV, raising=False)
    assert cpu_malloc.tune_malloc() == "tuned"
    n = mb << 20

    def activation():  # allocate, touch every page, free: one pass's temporary
        torch.empty(n, dtype=torch.uint8).fill_(1)

    for _ in range(12):  # the first passes map pages (glibc's aligned blocks settle in a few)
        activation()
    pages = n // 4096
    faults = sum(_faults_of(activation) for _ in range(3))
    assert faults < pages // 10, f"{faults} page faults in 3 re-allocations of {mb} MB ({pages} pages each)"
