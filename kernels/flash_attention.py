"""Fused variable-length flash attention forward (packed sequences, no padding).

Layout: q [N, Hq, d], k/v [Nk, Hk, d] (last dim contiguous, explicit token/head strides); sequence b
owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
Constraints: Hq % Hk == 0 (GQA: query head h reads kv head h // (Hq // Hk)); any head dim d (padded
to BLOCK_D = next_pow2(d) with masks); float32/float16/bfloat16; float32 accumulation.
Causal masking is bottom-right aligned (flash-attn): query i of a sequence sees keys
j <= i + (klen - qlen); a query that sees no key outputs zeros.
Grid: (cdiv(max_seqlen_q, BLOCK_M), Hq, B); q-blocks past a sequence's end exit at once. Each
program runs the key tiles that are fully visible without masks, then the diagonal / tail tiles
with masks; fully masked causal tiles are never visited. Online softmax in exp2 units.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_config import dot_precision, prefill_config
from ._utils import check, check_float, check_same_device
from .online_softmax import finalize, online_softmax_step


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, O, CuSeqQ, CuSeqK,
    qk_scale,                                        # softmax scale * log2(e)
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)          # longest causal rows first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CuSeqQ + b).to(tl.int64)
    q_len = tl.load(CuSeqQ + b + 1).to(tl.int64) - q_start
    k_start = tl.load(CuSeqK + b).to(tl.int64)
    k_len = tl.load(CuSeqK + b + 1).to(tl.int64) - k_start
    row0 = start_m.to(tl.int64) * BLOCK_M
    if row0 >= q_len:
        return

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len
    kh = (h // GROUP).to(tl.int64)

    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + h.to(tl.int64) * stride_qh
                + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    kT_ptrs = K + k_start * stride_kn + kh * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + k_start * stride_vn + kh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    if CAUSAL:
        diag = k_len - q_len                                     # row i sees keys <= i + diag
        full_end = tl.minimum(row0 + diag + 1, k_len)
        hi = tl.minimum(tl.minimum(row0 + BLOCK_M, q_len) + diag, k_len)
    else:
        diag = k_len
        full_end = k_len
        hi = k_len
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # tiles every row of this block sees completely: no masks but the head-dim padding
    for start_n in range(0, full_end, BLOCK_N):
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, PREC)
    # diagonal and tail tiles: sequence-end and causal masks
    for start_n in range(full_end, hi, BLOCK_N):
        n_ok = (start_n + offs_n) < k_len
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(visible, qk, float("-inf"))
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, PREC)

    out = finalize(acc, l_i)
    tl.store(O + (q_start + offs_m)[:, None] * stride_on + h.to(tl.int64) * stride_oh
             + offs_d[None, :], out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     scale: float | None = None) -> torch.Tensor:
    """q [N, Hq, d], k/v [Nk, Hk, d], cu_seqlens_q/k int32 [B+1] -> out [N, Hq, d] (q's dtype).
    max_seqlen_q must be >= every query length (it sizes the grid); scale defaults to d**-0.5."""
    check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
          f"varlen_attention: q/k/v must be [tokens, heads, d], got {tuple(q.shape)}, "
          f"{tuple(k.shape)}, {tuple(v.shape)}")
    check(k.shape == v.shape, f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    N, Hq, d = q.shape
    Hk = k.shape[1]
    check(k.shape[2] == d, f"varlen_attention: head dim of q ({d}) and k ({k.shape[2]}) differ")
    check(Hk > 0 and Hq % Hk == 0, f"varlen_attention: Hq={Hq} is not a multiple of Hk={Hk}")
    check(q.dtype == k.dtype == v.dtype, f"varlen_attention: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check_float("q", q)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check(cu.dtype == torch.int32 and cu.dim() == 1 and cu.numel() >= 2,
              f"varlen_attention: {name} must be int32 [B+1], got {cu.dtype} {tuple(cu.shape)}")
    check(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
          f"varlen_attention: cu_seqlens_q has {cu_seqlens_q.numel()} entries, "
          f"cu_seqlens_k {cu_seqlens_k.numel()}")
    check_same_device(("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                      ("cu_seqlens_k", cu_seqlens_k))
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out = torch.empty_like(q)
    B = cu_q.numel() - 1
    if N == 0 or max_seqlen_q <= 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = prefill_config(d, q.dtype)
    grid = (triton.cdiv(int(max_seqlen_q), cfg["BLOCK_M"]), Hq, B)
    _varlen_fwd_kernel[grid](
        q, k, v, out, cu_q, cu_k, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hk, HEAD_DIM=d, CAUSAL=bool(causal), PREC=dot_precision(q.dtype), **cfg)
    return out
