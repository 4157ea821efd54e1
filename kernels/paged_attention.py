"""Paged decode attention with split-K (flash-decoding), one new query token a sequence.

Layout: q [B, Hq, d] (last dim contiguous); k_cache/v_cache [num_blocks, block_size, Hk, d] with
explicit strides; block_tables int32 [B, max_blocks]; context_lens int32 [B] (the query is the last
of its sequence's context_lens[b] positions and sees all of them). Any block size, any head dim
(padded to BLOCK_D = next_pow2(d)), GQA (Hq % Hk == 0).
Stage 1, grid (B, Hk, num_splits): program (b, kh, s) takes the GROUP query heads of kv head kh
together (padded to BLOCK_G rows for tl.dot) over context positions [s*P, min((s+1)*P, ctx)),
P = partition size; with one split it writes the output directly, else its partial max m, sum l
and unnormalised acc (float32). Stage 2, grid (B, Hq): merges the valid partials.
The number of splits comes from the block-table width (an upper bound of the context, so no
host sync) and the SM count: enough programs to fill the GPU at batch 1 with a 32k context.
Also re-exports write_kv_cache and paged_prefill_attention (the other paged kernels).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_config import decode_config, dot_precision, sm_count
from ._utils import check, check_same_device, interpreting, next_pow2
from .kv_cache import check_query_cache, write_kv_cache  # noqa: F401  (re-export)
from .online_softmax import finalize, online_softmax_step, paged_slots
from .paged_prefill import paged_prefill_attention  # noqa: F401  (re-export)


@triton.jit
def _paged_decode_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, O, PartM, PartL, PartAcc,
    qk_scale, block_size, part_size,                 # part_size: tokens a split, multiple of BLOCK_N
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    ctx = tl.load(ContextLens + b).to(tl.int64)
    start = s * part_size
    if SPLIT:
        if start >= ctx:                             # the merge ignores splits past the context
            return
    end = tl.minimum(start + part_size, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < GROUP
    heads = kh * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    bt_row = BlockTables + b * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_ok = pos < end
        blk, off = paged_slots(bt_row, pos, n_ok, block_size)
        k_off = blk * stride_kb + off * stride_ks + kh * stride_kh
        v_off = blk * stride_vb + off * stride_vs + kh * stride_vh
        kT = tl.load(KCache + k_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        v = tl.load(VCache + v_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, PREC)

    if SPLIT:
        num_splits = tl.num_programs(2)
        row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + s     # [B, Hq, S] flat
        tl.store(PartM + row, m_i, mask=g_ok)
        tl.store(PartL + row, l_i, mask=g_ok)
        tl.store(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])
    else:
        out = finalize(acc, l_i)
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    PartM, PartL, PartAcc, ContextLens, O, part_size, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ctx = tl.load(ContextLens + b).to(tl.int64)
    n_valid = tl.minimum((ctx + part_size - 1) // part_size, num_splits)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_valid
    row = (b * tl.num_programs(1) + h) * num_splits + offs_s
    m = tl.load(PartM + row, mask=s_ok, other=float("-inf"))
    l = tl.load(PartL + row, mask=s_ok, other=0.0)
    acc = tl.load(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)                              # 0 for empty / invalid splits
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def choose_num_splits(batch: int, kv_heads: int, max_context: int, block_n: int,
                      device: torch.device) -> int:
    """Splits of the context so that batch * kv_heads * splits programs fill the device, with
    at least 4 key tiles a split (at most 128 splits)."""
    if interpreting():
        return max(1, min(4, triton.cdiv(max_context, 2 * block_n)))
    want = triton.cdiv(2 * sm_count(device), max(1, batch * kv_heads))
    return max(1, min(want, triton.cdiv(max_context, 4 * block_n), 128))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, *, num_splits: int | None = None) -> torch.Tensor:
    """q [B, Hq, d] -> [B, Hq, d]; num_splits None picks split-K from the block-table width."""
    check_query_cache("paged_decode_attention", "B", q, k_cache, v_cache)
    B, Hq, d = q.shape
    Hk = k_cache.shape[2]
    check(block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == B,
          f"paged_decode_attention: block_tables must be int32 [{B}, max_blocks], "
          f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    check(context_lens.dtype == torch.int32 and tuple(context_lens.shape) == (B,),
          f"paged_decode_attention: context_lens must be int32 [{B}], "
          f"got {context_lens.dtype} {tuple(context_lens.shape)}")
    check_same_device(("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                      ("block_tables", block_tables), ("context_lens", context_lens))
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens = context_lens.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = decode_config(d, Hq // Hk, q.dtype)
    block_n = cfg["BLOCK_N"]
    max_context = max(1, block_tables.shape[1] * k_cache.shape[1])
    splits = num_splits if num_splits is not None else choose_num_splits(B, Hk, max_context, block_n, q.device)
    check(splits >= 1, f"paged_decode_attention: num_splits must be >= 1, got {splits}")
    part_size = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    if num_splits is None:
        splits = triton.cdiv(max_context, part_size)
    split = splits > 1
    f32 = dict(dtype=torch.float32, device=q.device)
    part_m = torch.empty(B, Hq, splits, **f32) if split else out
    part_l = torch.empty(B, Hq, splits, **f32) if split else out
    part_acc = torch.empty(B, Hq, splits, cfg["BLOCK_D"], **f32) if split else out
    _paged_decode_kernel[(B, Hk, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_acc,
        scale * 1.4426950408889634, k_cache.shape[1], part_size,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hk, HEAD_DIM=d, SPLIT=split, PREC=dot_precision(q.dtype), **cfg)
    if split:
        _merge_splits_kernel[(B, Hq)](
            part_m, part_l, part_acc, context_lens, out, part_size, splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_S=next_pow2(splits), BLOCK_D=cfg["BLOCK_D"],
            num_warps=1 if interpreting() else 4)
    return out
