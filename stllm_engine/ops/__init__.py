"""The one dispatch point of the engine's tensor ops (INTERFACES.md "Ops").

CUDA tensors go to the Triton launchers of ``stllm_engine.kernels``; CPU tensors to the C++ core
(``stllm_engine._C``) or to torch where torch is already best (``varlen_attention`` = SDPA).
While ``torch.compile`` traces, the ops go through ``torch.ops.stllm.*`` (``library.py``).
"""
import torch

from . import attention as _attention
from . import kv_cache as _kv_cache
from . import library
from . import packing as _packing
from .packing import pack_ragged

__all__ = ["gather_rows", "scatter_rows", "pack_by_mask", "unpack", "pack_ragged", "varlen_attention",
           "write_kv_cache", "paged_prefill_attention", "paged_decode_attention", "library"]

_compiling = torch.compiler.is_compiling
varlen_attention = _attention.varlen_attention


def gather_rows(x, index):
    """x [M, D], index [N] int64 -> x[index] [N, D]; differentiable (backward: index_add into x)."""
    if _compiling():
        return library.gather_rows(x, index)
    return _packing.gather_rows(x, index)


def scatter_rows(src, index, num_rows):
    """src [N, D], index [N] int64 (unique) -> [num_rows, D], zeros elsewhere; differentiable."""
    if _compiling():
        return library.scatter_rows(src, index, num_rows)
    return _packing.scatter_rows(src, index, num_rows)


def pack_by_mask(x, keep):
    """x [B, L, D], keep [B, L] bool -> (packed [N, D], cu_seqlens [B+1] int32, src_index [N] int64)."""
    return _packing.pack_by_mask(x, keep)


def unpack(packed, src_index, B, L):
    """packed [N, D], src_index [N] -> [B, L, D] with zeros at dropped positions (differentiable)."""
    return _packing.unpack(packed, src_index, B, L)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """k/v [N, Hk, d] into the paged caches at slot_mapping [N] int64 (in place; slot < 0 skipped)."""
    if _compiling():
        return library.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return _kv_cache.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """q [B, Hq, d] over the paged cache -> [B, Hq, d]."""
    if _compiling():
        return library.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return _attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None,
                            max_seqlen_q=None):
    """q [N, Hq, d], causal, each sequence's queries are the last qlen_b of its context -> [N, Hq, d].
    ``max_seqlen_q``: the longest chunk, if known (on CUDA it is otherwise read back from the GPU)."""
    if _compiling():
        return library.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                               context_lens, scale)
    return _attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                              context_lens, scale, max_seqlen_q)
