"""Paged KV cache write: Triton on CUDA, the C++ core on CPU (in place, slot < 0 skipped)."""
from __future__ import annotations

import torch

from ._backend import check, check_cpu, cpp, on_cuda, triton_kernels


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """Each token's [Hk, d] values contiguous (any token stride), as the C++ kernel needs."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k/v [N, Hk, d] -> k_cache/v_cache [num_blocks, block_size, Hk, d] at slot_mapping [N] int64
    (slot = block_id * block_size + offset; slot < 0 skipped). Casts k/v to the cache dtype."""
    if on_cuda(k_cache):
        return triton_kernels("kv_cache").write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    check(k.dim() == 3 and k.shape == v.shape,
          f"write_kv_cache: k/v must be one [N, Hk, d] shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0],
          f"write_kv_cache: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    check(slot_mapping.dtype in (torch.int64, torch.int32),
          f"write_kv_cache: slot_mapping must be int64, got {slot_mapping.dtype}")
    check_cpu("write_kv_cache", ("k", k), ("v", v), ("v_cache", v_cache), ("slot_mapping", slot_mapping))
    k, v = _token_rows(k.to(k_cache.dtype)), _token_rows(v.to(v_cache.dtype))
    if k.shape[0] == 0:
        return None
    cpp().write_kv_cache(k, v, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous())
    return None
