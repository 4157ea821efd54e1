"""Write new tokens' K/V into the paged KV cache (in place).

Layout: k/v [N, Hk, d] (explicit token/head strides, last dim contiguous); k_cache/v_cache
[num_blocks, block_size, Hk, d] with explicit strides (written in place, never copied);
slot_mapping int64 [N]: slot = block_id * block_size + offset; slot < 0 skips the token, and so does
a slot past the pool (>= num_blocks * block_size): checked on the device, no host sync, no stray write.
Grid: (N,); one program copies one token's Hk x d values of k and of v (cast to the cache dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check, check_float, check_same_device, interpreting, next_pow2


@triton.jit
def _write_kv_kernel(
    K, V, KCache, VCache, SlotMapping, block_size, num_slots,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + tok).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    blk = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + tok * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(V + tok * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(KCache + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :], k.to(KCache.dtype.element_ty), mask=ok)
    tl.store(VCache + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch
             + offs_d[None, :], v.to(VCache.dtype.element_ty), mask=ok)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Caches must be [num_blocks, block_size, Hk, d] of one shape with a contiguous last dim."""
    check(k_cache.dim() == 4, f"k_cache must be [num_blocks, block_size, Hk, d], got {tuple(k_cache.shape)}")
    check(k_cache.shape == v_cache.shape,
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
          "k_cache/v_cache must have a contiguous last (head-dim) dimension")


def check_query_cache(op: str, rows: str, q: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> None:
    """q [*, Hq, d] against caches [num_blocks, block_size, Hk, d]: cache layout, head dim, GQA, dtype."""
    check_cache(k_cache, v_cache)
    check(q.dim() == 3, f"{op}: q must be [{rows}, Hq, d], got {tuple(q.shape)}")
    Hq, d, Hk = q.shape[1], q.shape[2], k_cache.shape[2]
    check(k_cache.shape[3] == d, f"{op}: head dim of q ({d}) and cache ({k_cache.shape[3]}) differ")
    check(Hk > 0 and Hq % Hk == 0, f"{op}: Hq={Hq} is not a multiple of Hk={Hk}")
    check(q.dtype == k_cache.dtype == v_cache.dtype,
          f"{op}: dtypes differ: q {q.dtype}, cache {k_cache.dtype}/{v_cache.dtype}")
    check_float("q", q)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k/v [N, Hk, d] -> caches at slot_mapping [N] int64 (slot < 0 skipped), in place."""
    check_cache(k_cache, v_cache)
    check(k.dim() == 3 and k.shape == v.shape,
          f"write_kv_cache: k/v must be one [N, Hk, d] shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    check(tuple(k.shape[1:]) == tuple(k_cache.shape[2:]),
          f"write_kv_cache: k heads/dim {tuple(k.shape[1:])} do not match the cache's "
          f"{tuple(k_cache.shape[2:])}")
    check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0],
          f"write_kv_cache: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    check(slot_mapping.dtype in (torch.int64, torch.int32),
          f"write_kv_cache: slot_mapping must be int64, got {slot_mapping.dtype}")
    check_same_device(("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                      ("slot_mapping", slot_mapping))
    N, Hk, d = k.shape
    if N == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    block_h, block_d = next_pow2(Hk), next_pow2(d)
    warps = 1 if interpreting() else (4 if block_h * block_d <= 4096 else 8)
    _write_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k_cache.shape[1],
        k_cache.shape[0] * k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=Hk, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
