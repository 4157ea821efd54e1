"""Row gather/scatter and token packing: Triton on CUDA, the C++ core on CPU, autograd on both.

gather_rows(x [M, D], index [N]) -> x[index]; its backward sums into x's rows (CPU: scatter_rows,
which sums a repeated index; CUDA: index_add); scatter_rows' backward is gather_rows.
pack_by_mask keeps rows of x [B, L, D] where keep [B, L] is True, in (b, l) order.
"""
from __future__ import annotations

import torch

from ._backend import check, check_cpu, cpp, on_cuda, triton_kernels


def _check_index(op: str, index: torch.Tensor) -> torch.Tensor:
    check(index.dim() == 1, f"{op}: index must be 1-D, got shape {tuple(index.shape)}")
    check(index.dtype in (torch.int64, torch.int32), f"{op}: index must be int64, got {index.dtype}")
    return index.to(torch.int64).contiguous()


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


class _GatherRowsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return cpp().gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _ScatterRowsCPU.apply(_rows_contiguous(grad), index, ctx.num_rows), None


class _ScatterRowsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, num_rows):
        ctx.save_for_backward(index)
        return cpp().scatter_rows(src, index, num_rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _GatherRowsCPU.apply(_rows_contiguous(grad), index), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [M, D], index [N] int64 -> x[index] [N, D]; differentiable in x (a repeated index's
    gradients add up)."""
    if on_cuda(x):
        return triton_kernels("gather_rows").gather_rows(x, index)
    check(x.dim() == 2, f"gather_rows: x must be [M, D], got shape {tuple(x.shape)}")
    check_cpu("gather_rows", ("index", index))
    index = _check_index("gather_rows", index)
    return _GatherRowsCPU.apply(_rows_contiguous(x), index)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """src [N, D], index [N] int64 -> [num_rows, D]: row index[i] = src[i], zeros elsewhere.

    Indices should be unique (the CPU path sums repeated ones; the CUDA kernel does not)."""
    if on_cuda(src):
        return triton_kernels("gather_rows").scatter_rows(src, index, num_rows)
    check(src.dim() == 2, f"scatter_rows: src must be [N, D], got shape {tuple(src.shape)}")
    check_cpu("scatter_rows", ("index", index))
    index = _check_index("scatter_rows", index)
    check(index.shape[0] == src.shape[0],
          f"scatter_rows: index has {index.shape[0]} entries but src has {src.shape[0]} rows")
    return _ScatterRowsCPU.apply(_rows_contiguous(src), index, int(num_rows))


def pack_by_mask(x: torch.Tensor, keep: torch.Tensor):
    """x [B, L, D], keep [B, L] bool -> (packed [N, D], cu_seqlens [B+1] int32, src_index [N] int64).

    src_index = b * L + l of each kept row (kept order preserved). One implementation
    (``kernels/packing.py``) for every device, moving rows with this layer's gather."""
    return _packing().pack_by_mask(x, keep, gather_rows=gather_rows)


def unpack(packed: torch.Tensor, src_index: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Inverse of pack_by_mask: packed [N, D] -> [B, L, D], zeros at dropped positions."""
    return _packing().unpack(packed, src_index, B, L, scatter_rows=scatter_rows)


def pack_ragged(seqs: list[torch.Tensor]):
    """list of [Li, D] (same D, dtype, device) -> (packed [N, D], cu_seqlens [B+1] int32)."""
    return _packing().pack_ragged(seqs)


def _packing():
    return triton_kernels("packing")  # index bookkeeping only: imports no triton
