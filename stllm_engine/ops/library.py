"""``torch.ops.stllm.*``: the ops registered with ``torch.library`` (custom op + fake impl), so
``torch.compile`` traces them as single nodes. Eager calls skip this layer; the public functions
route here only while compiling (``torch.compiler.is_compiling()``)."""
from typing import Optional

import torch

from . import attention, kv_cache, packing


@torch.library.custom_op("stllm::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return packing.gather_rows(x, index)


@gather_rows.register_fake
def _(x, index):
    return x.new_empty(index.shape[0], x.shape[1])


@torch.library.custom_op("stllm::scatter_rows", mutates_args=())
def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    return packing.scatter_rows(src, index, num_rows)


@scatter_rows.register_fake
def _(src, index, num_rows):
    return src.new_empty(num_rows, src.shape[1])


def _save_index(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_rows = inputs[0].shape[0]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    # a repeated index sums its rows (index_add), which the CUDA scatter kernel does not
    return grad.new_zeros(ctx.num_rows, grad.shape[1]).index_add_(0, index.to(torch.int64), grad), None


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_rows(grad.contiguous(), index), None, None


gather_rows.register_autograd(_gather_backward, setup_context=_save_index)
scatter_rows.register_autograd(_scatter_backward, setup_context=_save_index)


@torch.library.custom_op("stllm::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    kv_cache.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@write_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("stllm::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    return attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("stllm::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    return attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                             context_lens, scale)


@paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
