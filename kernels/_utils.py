"""Small helpers shared by the launchers: interpreter detection, argument checks."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) when cond is false (argument validation in launchers)."""
    if not cond:
        raise ValueError(msg)


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {n: t.device for n, t in named}
    check(len(set(devices.values())) == 1, f"tensors must be on one device, got {devices}")
    dev = next(iter(devices.values()))
    check(dev.type == "cuda" or interpreting(),
          f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {dev}")


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"{name} must be float16/bfloat16/float32, got {t.dtype}")
