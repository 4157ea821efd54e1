"""Pure-torch twins of every Triton kernel in this package (same signatures, plain torch).

Used by the kernel tests as the oracle (the CPU paths of ``stllm_engine.ops`` are the C++ core,
torch SDPA and ``stllm_engine.ops.elementwise``, not these). Attention twins compute
in float32 by default (``upcast=True``) and return the input dtype; ``upcast=False`` keeps the math
in the input dtype (the "torch in the same dtype" baseline of flash-attention's tolerance rule).
Rows with no visible key (causal with qlen > klen, or an empty context) produce zeros, as flash-attn.
"""
from __future__ import annotations

import math

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = x[index[i]]; x [M, D], index [N] int64 -> [N, D]."""
    return x[index]


def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[index[i]] = src[i], zeros elsewhere; src [N, D], index [N] int64 (unique) -> [num_rows, D]."""
    out = src.new_zeros(num_rows, src.shape[1])
    return out.index_copy(0, index, src)


def pack_by_mask(x: torch.Tensor, keep: torch.Tensor):
    """x [B, L, D], keep [B, L] bool -> (packed [N, D], cu_seqlens [B+1] int32, src_index [N] int64)."""
    B, L, D = x.shape
    src_index = torch.nonzero(keep.reshape(-1), as_tuple=False).reshape(-1)
    counts = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    return x.reshape(B * L, D)[src_index], cu_seqlens, src_index


def unpack(packed: torch.Tensor, src_index: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Inverse of pack_by_mask: [N, D] -> [B, L, D] with zeros at dropped positions."""
    return scatter_rows(packed, src_index, B * L).view(B, L, packed.shape[1])


def pack_ragged(seqs: list[torch.Tensor]):
    """list of [Li, D] -> (packed [N, D], cu_seqlens [B+1] int32)."""
    lens = torch.tensor([0] + [s.shape[0] for s in seqs], dtype=torch.int32)
    return torch.cat(seqs, 0), torch.cumsum(lens, 0, dtype=torch.int32).to(seqs[0].device)


def _attend(q, k, v, scale, causal, upcast):
    """q [Lq, Hq, d], k/v [Lk, Hk, d] -> [Lq, Hq, d]; causal is bottom-right aligned."""
    Lq, Hq, d = q.shape
    Lk, Hk, _ = k.shape
    dt = torch.float32 if upcast else q.dtype
    group = Hq // Hk
    qh = q.to(dt).transpose(0, 1)                                      # [Hq, Lq, d]
    kh = k.to(dt).transpose(0, 1).repeat_interleave(group, dim=0)      # [Hq, Lk, d]
    vh = v.to(dt).transpose(0, 1).repeat_interleave(group, dim=0)
    s = torch.matmul(qh, kh.transpose(1, 2)) * scale                    # [Hq, Lq, Lk]
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        visible = j <= i + (Lk - Lq)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)                                   # rows with no visible key
    out = torch.matmul(p, vh).transpose(0, 1)
    return out.to(q.dtype)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal: bool, scale: float | None = None, *, upcast: bool = True):
    """q [N, Hq, d], k/v [Nk, Hk, d], cu_seqlens int32 [B+1] -> [N, Hq, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            out[cq[b]:cq[b + 1]] = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]],
                                           v[ck[b]:ck[b + 1]], scale, causal, upcast)
    return out


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k/v [N, Hk, d] into caches [num_blocks, block_size, Hk, d] at slot_mapping [N]; slot < 0 skipped."""
    bs = k_cache.shape[1]
    ok = slot_mapping >= 0
    slots = slot_mapping[ok]
    k_cache[slots // bs, slots % bs] = k[ok].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[ok].to(v_cache.dtype)


def _gather_context(cache, block_table, ctx_len):
    """The first ctx_len positions of one sequence from a paged cache -> [ctx_len, Hk, d]."""
    bs = cache.shape[1]
    pos = torch.arange(ctx_len, device=cache.device)
    blocks = block_table.long()[pos // bs]
    return cache[blocks, pos % bs]


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None,
                           *, upcast: bool = True):
    """q [B, Hq, d] (one token each, at the last context position) -> [B, Hq, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    for b, n in enumerate(context_lens.tolist()):
        if n > 0:
            kb = _gather_context(k_cache, block_tables[b], n)
            vb = _gather_context(v_cache, block_tables[b], n)
            out[b] = _attend(q[b:b + 1], kb, vb, scale, False, upcast)[0]
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                            scale=None, *, upcast: bool = True):
    """q [N, Hq, d]: sequence b's queries are its last qlen_b of context_lens[b] positions; causal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    cq = cu_seqlens_q.tolist()
    for b, n in enumerate(context_lens.tolist()):
        if cq[b + 1] > cq[b]:
            kb = _gather_context(k_cache, block_tables[b], n)
            vb = _gather_context(v_cache, block_tables[b], n)
            out[cq[b]:cq[b + 1]] = _attend(q[cq[b]:cq[b + 1]], kb, vb, scale, True, upcast)
    return out
