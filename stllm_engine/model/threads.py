"""CPU intra-op thread policy of the engine's model passes.

On a CPU every torch op (and the C++ kernels, through ``at::parallel_for``) splits work over
torch's OpenMP pool and ends in a barrier. When the machine is oversubscribed (more runnable
threads than cores), a barrier waits until the OS schedules every pool thread again: measured on
the 2-core bench host under load, one decode GEMV pass ran 13x slower and prefill 1.4-2.5x slower
on 2 threads than on 1. On an idle machine the extra threads help (decode ~2-3x there).

The opt-in ``auto`` policy therefore runs every model pass on 1 thread while the machine is busy
(1-minute load average above the core count + 0.5; it counts as idle again below core count - 0.5,
so the engine's own threads do not make it flip) and leaves torch's setting alone otherwise.
``STLLM_CPU_THREADS`` (read when a policy is built) chooses: ``"torch"`` (the default: never
change torch's setting, so timings do not depend on other processes' load), ``"auto"``, ``N`` (every pass on N threads) or ``"D,P"`` (decode steps on D threads,
prefill and vision/Q-Former passes on P). CUDA passes are never affected.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

ENV = "STLLM_CPU_THREADS"


_BUSY = {"state": False, "checked": -1e9}


def machine_busy(now: float | None = None) -> bool:
    """Whether the CPU is oversubscribed (load average vs cores, with hysteresis; re-read once a
    second). False where the load average is unavailable."""
    now = time.monotonic() if now is None else now
    if now - _BUSY["checked"] >= 1.0:
        _BUSY["checked"] = now
        try:
            load = os.getloadavg()[0]
        except OSError:
            return False
        cores = os.cpu_count() or 1
        if load > cores + 0.5:
            _BUSY["state"] = True
        elif load < cores - 0.5:
            _BUSY["state"] = False
    return _BUSY["state"]


@dataclass(frozen=True)
class ThreadPolicy:
    """Threads for decode steps and for prefill/vision passes on the CPU (None: torch's setting);
    ``only_when_busy``: apply them only while :func:`machine_busy`."""

    decode: int | None = 1
    prefill: int | None = 1
    only_when_busy: bool = True

    def __post_init__(self) -> None:
        for name in ("decode", "prefill"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ThreadPolicy.{name} must be a positive int or None, got {v!r}")

    @classmethod
    def from_env(cls, value: str | None = None) -> "ThreadPolicy":
        """Parse ``STLLM_CPU_THREADS`` (or ``value``): auto | torch | N | D,P."""
        raw = (os.environ.get(ENV, "") if value is None else value).strip().lower()
        if raw in ("", "torch"):
            return cls(decode=None, prefill=None, only_when_busy=False)
        if raw == "auto":
            return cls()
        parts = raw.split(",")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (1, 2) or min(nums) < 1:
            raise ValueError(f"{ENV}={raw!r}: expected 'auto', 'torch', a thread count N or 'D,P'")
        return cls(decode=nums[0], prefill=nums[-1], only_when_busy=False)

    def threads(self, decode: bool) -> int | None:
        """Threads for a decode (True) or prefill/vision (False) pass now; None: leave torch's."""
        if self.only_when_busy and not machine_busy():
            return None
        return self.decode if decode else self.prefill


@contextmanager
def cpu_threads(n: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body with torch's intra-op pool at ``n`` threads (CPU only; None: unchanged)."""
    if n is None or torch.device(device).type != "cpu" or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
