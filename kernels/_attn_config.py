"""Tile sizes / launch parameters of the attention kernels (GPU tuned like public Triton FA;
tiny tiles under the interpreter so CPU tests are fast)."""
from __future__ import annotations

import torch

from ._utils import interpreting, next_pow2


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact fp32 dots ("ieee"); half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages for the flash / paged-prefill kernels."""
    block_d = max(16, next_pow2(head_dim))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if block_d <= 64:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    elif block_d <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:          # twice the shared memory a tile
        cfg["BLOCK_N"] //= 2
        cfg["num_stages"] = 2
    return dict(cfg, BLOCK_D=block_d)


def decode_config(head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """BLOCK_N, BLOCK_G (query heads of one kv head, padded for tl.dot), BLOCK_D, warps, stages."""
    block_d = max(16, next_pow2(head_dim))
    block_g = max(16, next_pow2(group))
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=1, num_stages=1)
    block_n = 64 if block_d <= 128 and dtype != torch.float32 else 32
    return dict(BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=4, num_stages=3)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
