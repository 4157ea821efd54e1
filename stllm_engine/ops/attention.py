"""Attention ops: Triton on CUDA; on CPU the C++ paged kernels, and for varlen (prefill) attention
the C++ AMX flash kernel in bfloat16 where the CPU has AMX tiles, torch SDPA otherwise.

GQA everywhere: query head h reads kv head h // (Hq // Hk). Causal masks align the last query
with the last key (flash-attn); a query with no visible key gets zeros.

CPU ``paged_prefill_attention``, per sequence of the call: chunks shorter than
:func:`gather_min_queries` (decodes mixed into a prefill pass, small chunks) use the C++ kernel
straight from the cache, which reads a sequence's context once per query; longer ones (a chat turn
over its cached history, chunked-prefill chunks) run a flash kernel, several times faster per query
there: in bf16 on an AMX CPU the AMX kernel packing their K/V straight from the cache blocks
(``flash_attention_amx_paged``: no gathered copy, which cost ~8% of a 32k-token chunked prefill),
else a gather of their K/V rows and torch SDPA. A call holding both kinds runs each group through
its own path.
"""
from __future__ import annotations

import math
from itertools import accumulate

import torch
import torch.nn.functional as F

from ._backend import (amx_attention, check, check_cpu, cpp, cpu_attention_backend, cuda_attention_backend, on_cuda,
                       plain, triton_kernels)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q [B, Lq, Hq, d], k/v [B, Lk, Hk, d] with Lq <= Lk when causal -> [B, Lq, Hq, d]."""
    Lq, Hq, Lk, Hk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hq != Hk:
        kh, vh = kh.repeat_interleave(Hq // Hk, dim=1), vh.repeat_interleave(Hq // Hk, dim=1)
    if causal and Lq != Lk and plain(q, k, v) and not q.is_cuda:  # (a CPU flash kernel)
        return _prefix_causal(qh, kh, vh, Lk - Lq, scale).transpose(1, 2)
    mask = None
    if causal and Lq != Lk:  # bottom-right alignment: query i sees keys j <= i + Lk - Lq
        i = torch.arange(Lq, device=q.device)[:, None]
        mask = torch.arange(Lk, device=q.device)[None, :] <= i + (Lk - Lq)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                         is_causal=causal and Lq == Lk, scale=scale)
    return out.transpose(1, 2)


def _prefix_causal(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of qh [B, H, Lq, d] over kh/vh [B, H, prefix + Lq, d] (a chunk
    after ``prefix`` cached positions): the prefix keys (all visible, no mask) and the chunk's own
    keys (plain causal) run as two flash calls whose results merge by their log-sum-exp. One masked
    call cost the whole Lq x Lk score matrix plus the mask: bench-cpu, 8k-token prompt in 2048-token
    chunks, prefill 3.9 -> 2.9 s (one 8.7k-token pass: 2.8 s)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, lse1 = flash(qh, kh[:, :, :prefix], vh[:, :, :prefix], 0.0, False, scale=scale)
    o2, lse2 = flash(qh, kh[:, :, prefix:], vh[:, :, prefix:], 0.0, True, scale=scale)
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp_().unsqueeze(-1), (lse2 - m).exp_().unsqueeze(-1)
    out = o1.float().mul_(w1).add_(o2.float().mul_(w2)).div_(w1 + w2)
    return out.to(qh.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     scale: float | None = None, uniform: bool = False) -> torch.Tensor:
    """q [N, Hq, d], k/v [Nk, Hk, d], cu_seqlens_q/k int32 [B+1] -> [N, Hq, d] (differentiable).

    ``uniform``: the caller promises every sequence has ``max_seqlen_q`` queries and
    ``max_seqlen_k`` keys (video frames), so CUDA can run one dense batched call without reading
    ``cu_seqlens`` back: torch SDPA unless ``STLLM_CUDA_ATTENTION=triton``
    (:func:`cuda_attention_kernel`); elsewhere it changes nothing.

    CPU: bfloat16 outside autograd on an AMX CPU -> one call of the C++ AMX flash kernel for the
    whole batch (``csrc/flash_attention_amx_cpu.cpp``; ``STLLM_CPU_ATTENTION=torch`` turns it off);
    else torch SDPA, one call for equal-length batches (e.g. vision frames), else per sequence."""
    if on_cuda(q):
        if uniform and cuda_attention_kernel(uniform=True) == "torch-sdpa":
            B, Lq, Lk = cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
            check(B * Lq == q.shape[0] and B * Lk == k.shape[0] and (not causal or Lq <= Lk),
                  f"varlen_attention(uniform=True): {B} sequences of {Lq}/{Lk} rows do not make "
                  f"q {tuple(q.shape)} / k {tuple(k.shape)}")
            return _dense_sdpa(q, k, v, B, Lq, Lk, causal, _resolve_scale(q, scale))
        return triton_kernels("flash_attention").varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    check(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and k.shape[2] == q.shape[2],
          f"varlen_attention: q/k/v must be [tokens, heads, d] with one d and k == v shapes, got "
          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    Hq, Hk = q.shape[1], k.shape[1]
    check(Hk > 0 and Hq % Hk == 0, f"varlen_attention: Hq={Hq} is not a multiple of Hk={Hk}")
    check(cu_seqlens_q.numel() == cu_seqlens_k.numel() and cu_seqlens_q.numel() >= 2,
          f"varlen_attention: cu_seqlens_q/k must both be [B+1], got {tuple(cu_seqlens_q.shape)}, "
          f"{tuple(cu_seqlens_k.shape)}")
    check_cpu("varlen_attention", ("k", k), ("v", v))
    scale = _resolve_scale(q, scale)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, cu in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        check(cu[0] == 0 and all(a <= b for a, b in zip(cu, cu[1:])),
              f"varlen_attention: {name} must start at 0 and must not decrease, got {cu[:8]}"
              + (" ..." if len(cu) > 8 else ""))
    check(cq[-1] == q.shape[0] and ck[-1] == k.shape[0],
          f"varlen_attention: cu_seqlens end at {cq[-1]}/{ck[-1]} but q/k have {q.shape[0]}/{k.shape[0]} rows")
    if _amx_applies(q, k, v):
        return cpp().flash_attention_amx(q, k, v, cu_seqlens_q.to(torch.int32).contiguous(),
                                         cu_seqlens_k.to(torch.int32).contiguous(), bool(causal), scale)
    B = len(cq) - 1
    lq = {cq[b + 1] - cq[b] for b in range(B)}
    lk = {ck[b + 1] - ck[b] for b in range(B)}
    if len(lq) == 1 and len(lk) == 1:
        Lq, Lk = lq.pop(), lk.pop()
        if Lq > 0 and Lk > 0 and (not causal or Lq <= Lk):
            return _dense_sdpa(q, k, v, B, Lq, Lk, causal, scale)
    outs = []
    for b in range(B):
        qb, kb, vb = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        nq, nk = qb.shape[0], kb.shape[0]
        blind = max(0, nq - nk) if causal else (nq if nk == 0 else 0)  # queries with no visible key
        if blind:
            outs.append(qb.new_zeros(blind, Hq, qb.shape[2]))
        if nq > blind:
            outs.append(_sdpa(qb[blind:].unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), causal, scale)[0])
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, B: int, Lq: int, Lk: int, causal: bool,
                scale: float) -> torch.Tensor:
    """B equal-length sequences of packed q [B * Lq, Hq, d], k/v [B * Lk, Hk, d] as one batched
    SDPA call -> [B * Lq, Hq, d]."""
    out = _sdpa(q.view(B, Lq, q.shape[1], -1), k.view(B, Lk, k.shape[1], -1), v.view(B, Lk, v.shape[1], -1),
                causal, scale)
    return out.reshape(q.shape)


def cuda_attention_kernel(uniform: bool) -> str:
    """The kernel CUDA varlen attention runs: "torch-sdpa" for ``uniform`` batches (the ViT's
    frames) unless ``STLLM_CUDA_ATTENTION=triton``, else "triton" (for reports)."""
    return "torch-sdpa" if uniform and cuda_attention_backend() == "auto" else "triton"


def cpu_prefill_attention_kernel(dtype: torch.dtype) -> str:
    """The kernel CPU varlen (prefill) attention of ``dtype`` runs here outside autograd: "amx"
    (the C++ AMX kernel) or "torch-sdpa" (for benchmark reports)."""
    amx = dtype == torch.bfloat16 and cpu_attention_backend() == "auto" and amx_attention()
    return "amx" if amx else "torch-sdpa"


def _amx_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The AMX kernel's domain: what :func:`cpu_prefill_attention_kernel` sends there (bfloat16,
    an AMX CPU, ``STLLM_CPU_ATTENTION`` not ``torch``), with k/v of q's dtype, contiguous rows of an
    even head dim <= 256, and no autograd. Its speed against torch's flash kernel at the engine's
    shapes: ``benchmarks/results/attention-cpu-2core.json`` (``benchmarks/attention_cpu.py``)."""
    d = q.shape[-1]
    return (k.dtype == v.dtype == q.dtype and d % 2 == 0 and d <= 256
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and plain(q, k, v)
            and cpu_prefill_attention_kernel(q.dtype) == "amx")


def _paged_args(op: str, q, k_cache, v_cache, block_tables, context_lens):
    """CPU-side normalisation: cache dtype for q, int32 contiguous tables."""
    check(q.dim() == 3 and k_cache.dim() == 4,
          f"{op}: q must be [*, Hq, d] and the caches [num_blocks, block_size, Hk, d], got "
          f"{tuple(q.shape)}, {tuple(k_cache.shape)}")
    check_cpu(op, ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
              ("context_lens", context_lens))
    qc = q.to(k_cache.dtype)
    qc = qc if qc.stride(-1) == 1 else qc.contiguous()
    return qc, _int32(op, "block_tables", block_tables), _int32(op, "context_lens", context_lens)


def _int32(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32 contiguous; a wider integer tensor must fit (a cast would wrap a value
    past int32 onto a valid block id or length)."""
    if t.dtype != torch.int32 and t.numel():
        lo, hi = int(t.min()), int(t.max())
        check(-2 ** 31 <= lo and hi < 2 ** 31, f"{op}: {name} holds {hi if hi >= 2 ** 31 else lo}, "
              "outside int32 (no block id or length can be that large)")
    return t.to(torch.int32).contiguous()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, d] (one token a sequence, at its last position), caches [num_blocks, block_size,
    Hk, d], block_tables int32 [B, max_blocks], context_lens int32 [B] -> [B, Hq, d]."""
    if on_cuda(q):
        return triton_kernels("paged_attention").paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale)
    qc, bt, cl = _paged_args("paged_decode_attention", q, k_cache, v_cache, block_tables, context_lens)
    return cpp().paged_decode_attention(qc, k_cache, v_cache, bt, cl, scale).to(q.dtype)


GATHER_MIN_QUERIES = 64  # torch SDPA after the gather
GATHER_MIN_QUERIES_AMX = 16  # the AMX flash kernel after the gather (bf16)


def gather_min_queries(dtype: torch.dtype) -> int:
    """Chunk length from which a sequence's CPU paged-prefill attention gathers its K/V and runs
    the flash kernel instead of the C++ paged kernel. bench-cpu heads (16 x 64), 2 threads, bf16:
    41 queries over 649 cached tokens 1.97 -> 0.85 ms, 63 over 2000 9.85 -> 2.34 ms, 8 over 649
    0.46 -> 0.71 ms (so 8 stays); fp32 (SDPA) crosses over later: 41 / 649 2.19 vs 1.99 ms."""
    return GATHER_MIN_QUERIES_AMX if cpu_prefill_attention_kernel(dtype) == "amx" else GATHER_MIN_QUERIES


def _paged_prefill_gather(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """CPU: gather each sequence's first context_lens[b] cache rows, then causal varlen SDPA."""
    bs, Hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    cq, cl = cu_seqlens_q.tolist(), context_lens.tolist()
    check(len(cq) == len(cl) + 1 and cq[0] == 0 and cq[-1] == q.shape[0],
          f"paged_prefill_attention: cu_seqlens_q {cq} does not fit {len(cl)} sequences and {q.shape[0]} query rows")
    offs = torch.arange(bs, dtype=torch.int64)
    slots = []
    for b, n in enumerate(cl):
        check(n >= 0, f"paged_prefill_attention: context_lens[{b}] = {n} must be >= 0")
        nblk = -(-n // bs)
        check(nblk <= block_tables.shape[1], f"paged_prefill_attention: context_lens[{b}] = {n} needs {nblk} "
                                             f"blocks but block_tables has {block_tables.shape[1]} columns")
        blocks = block_tables[b, :nblk].to(torch.int64)
        if nblk and (int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]):
            raise IndexError(f"paged_prefill_attention: block_tables[{b}] holds a block outside "
                             f"[0, {k_cache.shape[0]})")
        slots.append((blocks[:, None] * bs + offs).reshape(-1)[:n])
    index = torch.cat(slots)
    k = k_cache.reshape(-1, Hk, d).index_select(0, index)
    v = v_cache.reshape(-1, Hk, d).index_select(0, index)
    cu_k = torch.tensor([0, *accumulate(cl)], dtype=torch.int32)
    lq = [b - a for a, b in zip(cq, cq[1:])]
    out = varlen_attention(q.to(k.dtype), k, v, cu_seqlens_q.to(torch.int32), cu_k, max(lq), max(cl),
                           causal=True, scale=scale)
    return out.to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float | None = None,
                            max_seqlen_q: int | None = None) -> torch.Tensor:
    """q [N, Hq, d]: sequence b's queries are the last qlen_b of its context_lens[b] positions
    (K/V already in the cache); causal -> [N, Hq, d]. ``max_seqlen_q`` (the longest chunk) spares
    the CUDA launcher a read-back from the GPU, i.e. a synchronisation a layer."""
    if on_cuda(q):
        return triton_kernels("paged_prefill").paged_prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q=max_seqlen_q)
    qc, bt, cl = _paged_args("paged_prefill_attention", q, k_cache, v_cache, block_tables, context_lens)
    cu = _int32("paged_prefill_attention", "cu_seqlens_q", cu_seqlens_q)
    lens = (cu[1:] - cu[:-1]).tolist()
    at = gather_min_queries(qc.dtype)
    long = [b for b, n in enumerate(lens) if n >= at]

    def paged(qs, bts, cus, cls):
        return cpp().paged_prefill_attention(qs, k_cache, v_cache, bts, cus, cls, scale)

    def gathered(qs, bts, cus, cls):
        if _amx_applies(qs, k_cache, v_cache):  # packs K/V straight from the cache blocks
            return cpp().flash_attention_amx_paged(qs, k_cache, v_cache, bts, cus, cls, _resolve_scale(qs, scale))
        return _paged_prefill_gather(qs, k_cache, v_cache, bts, cus, cls, scale)

    if not long:
        return paged(qc, bt, cu, cl).to(q.dtype)
    if len(long) == len(lens):
        return gathered(qc, bt, cu, cl).to(q.dtype)
    # both kinds: each group of sequences through its own path, written back to its rows
    check(len(lens) == cl.numel() and int(cu[0]) == 0 and int(cu[-1]) == q.shape[0],
          f"paged_prefill_attention: cu_seqlens_q {cu.tolist()} does not fit {cl.numel()} sequences and "
          f"{q.shape[0]} query rows")
    starts = cu.tolist()
    out = torch.empty_like(qc)
    is_long = set(long)
    for group, run in ((long, gathered), ([b for b in range(len(lens)) if b not in is_long], paged)):
        rows = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in group])
        seqs = torch.tensor(group)
        sub_cu = torch.tensor([0, *accumulate(lens[b] for b in group)], dtype=torch.int32)
        out.index_copy_(0, rows, run(qc.index_select(0, rows), bt.index_select(0, seqs), sub_cu,
                                     cl.index_select(0, seqs)))
    return out.to(q.dtype)
