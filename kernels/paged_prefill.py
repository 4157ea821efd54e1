"""Causal prefill attention reading K/V only from the paged cache (chunked prefill, prefix reuse,
multi-turn).

Layout: q [N, Hq, d] packed by cu_seqlens_q int32 [B+1] (last dim contiguous); k_cache/v_cache
[num_blocks, block_size, Hk, d] with explicit strides; block_tables int32 [B, max_blocks];
context_lens int32 [B]. The queries of sequence b are its last qlen_b of context_lens[b] positions
(their K/V already written), so query i sees cache positions j <= i + context_lens[b] - qlen_b.
Any block size and head dim (padded to BLOCK_D = next_pow2(d)), GQA (Hq % Hk == 0).
Grid: (cdiv(max_seqlen_q, BLOCK_M), Hq, B); blocks past a sequence's queries exit; key tiles fully
visible run without masks, diagonal tiles with masks, fully masked tiles are skipped.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_config import dot_precision, prefill_config
from ._utils import check, check_same_device
from .kv_cache import check_query_cache
from .online_softmax import finalize, online_softmax_step, paged_slots


@triton.jit
def _paged_tile(acc, m_i, l_i, q, KCache, VCache, bt_row, start_n, k_len, offs_m, diag, qk_scale,
                block_size, stride_kb, stride_ks, k_head_off, stride_vb, stride_vs, v_head_off,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of a paged context: load K^T and V, update the
    online softmax; MASKED applies the sequence-end and causal masks."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    pos = start_n + tl.arange(0, BLOCK_N)
    n_ok = pos < k_len
    blk, off = paged_slots(bt_row, pos, n_ok, block_size)
    k_off = blk * stride_kb + off * stride_ks + k_head_off
    v_off = blk * stride_vb + off * stride_vs + v_head_off
    kT = tl.load(KCache + k_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                 other=0.0)
    qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
    if MASKED:
        visible = n_ok[None, :] & (pos[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(visible, qk, float("-inf"))
    v = tl.load(VCache + v_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                other=0.0)
    return online_softmax_step(acc, m_i, l_i, qk, v, PREC)


@triton.jit
def _paged_prefill_kernel(
    Q, KCache, VCache, BlockTables, CuSeqQ, ContextLens, O,
    qk_scale, block_size,
    stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_on, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)          # longest causal rows first
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(CuSeqQ + b).to(tl.int64)
    q_len = tl.load(CuSeqQ + b + 1).to(tl.int64) - q_start
    k_len = tl.load(ContextLens + b).to(tl.int64)
    row0 = start_m.to(tl.int64) * BLOCK_M
    if row0 >= q_len:
        return

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len
    kh = h // GROUP
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    bt_row = BlockTables + b * stride_bt

    diag = k_len - q_len                                         # row i sees keys <= i + diag
    full_end = tl.maximum(tl.minimum(row0 + diag + 1, k_len), 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(tl.minimum(row0 + BLOCK_M, q_len) + diag, k_len), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # tiles every row of this block sees completely: no causal mask
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q, KCache, VCache, bt_row, start_n, k_len, offs_m,
                                    diag, qk_scale, block_size, stride_kb, stride_ks, kh * stride_kh,
                                    stride_vb, stride_vs, kh * stride_vh, HEAD_DIM, False, PREC,
                                    BLOCK_N, BLOCK_D)
    # diagonal and tail tiles
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q, KCache, VCache, bt_row, start_n, k_len, offs_m,
                                    diag, qk_scale, block_size, stride_kb, stride_ks, kh * stride_kh,
                                    stride_vb, stride_vs, kh * stride_vh, HEAD_DIM, True, PREC,
                                    BLOCK_N, BLOCK_D)

    out = finalize(acc, l_i)
    tl.store(O + (q_start + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float | None = None, *,
                            max_seqlen_q: int | None = None) -> torch.Tensor:
    """q [N, Hq, d] -> [N, Hq, d], causal over each sequence's paged context.
    max_seqlen_q: longest query chunk (computed from cu_seqlens_q, a host sync, when None)."""
    check_query_cache("paged_prefill_attention", "N", q, k_cache, v_cache)
    N, Hq, d = q.shape
    Hk = k_cache.shape[2]
    check(cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.dim() == 1 and cu_seqlens_q.numel() >= 1,
          f"paged_prefill_attention: cu_seqlens_q must be int32 [B+1], "
          f"got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    B = cu_seqlens_q.numel() - 1
    check(block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == B,
          f"paged_prefill_attention: block_tables must be int32 [{B}, max_blocks], "
          f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    check(context_lens.dtype == torch.int32 and tuple(context_lens.shape) == (B,),
          f"paged_prefill_attention: context_lens must be int32 [{B}], "
          f"got {context_lens.dtype} {tuple(context_lens.shape)}")
    check_same_device(("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                      ("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q),
                      ("context_lens", context_lens))
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    cu_q, context_lens = cu_seqlens_q.contiguous(), context_lens.contiguous()
    out = torch.empty_like(q)
    if B == 0 or N == 0:
        return out.zero_()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    if max_seqlen_q <= 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = prefill_config(d, q.dtype)
    grid = (triton.cdiv(int(max_seqlen_q), cfg["BLOCK_M"]), Hq, B)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_q, context_lens, out,
        scale * 1.4426950408889634, k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hk, HEAD_DIM=d, PREC=dot_precision(q.dtype), **cfg)
    return out
