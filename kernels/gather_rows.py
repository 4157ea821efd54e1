"""Row gather / scatter (masked token packing and unpacking), with autograd.

Layout: 2-D row-major views with explicit strides: x [M, D] (stride_xm, stride_xd), out [N, D].
  gather: out[i, :] = x[index[i], :]           (index out of [0, M) -> zeros)
  scatter: out[index[i], :] = src[i, :], zeros elsewhere (index out of [0, M) -> row skipped)
Constraints: index int64 [N]; scatter indices unique (no accumulation); any dtype (pure copy).
Autograd: gather's backward is an ``index_add`` (``gather_rows_grad``: repeated indices add up, which
the scatter kernel does not); scatter's backward is the gather kernel.
Grid: (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D)); offsets in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check, check_same_device, interpreting, next_pow2


@triton.jit
def _copy_rows_kernel(
    Src, Dst, Index,
    n_rows, n_cols, n_indexed,            # rows to copy, row width, rows of the indexed tensor
    stride_sm, stride_sd, stride_dm, stride_dd,
    SCATTER: tl.constexpr,                # False: Dst[i] = Src[Index[i]]; True: Dst[Index[i]] = Src[i]
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < n_rows
    idx = tl.load(Index + rows, mask=row_ok, other=-1).to(tl.int64)
    idx_ok = row_ok & (idx >= 0) & (idx < n_indexed)
    col_ok = cols[None, :] < n_cols
    if SCATTER:
        src_rows = rows
        dst_rows = idx
        store_ok = idx_ok
    else:
        src_rows = idx
        dst_rows = rows
        store_ok = row_ok                 # gather writes zeros for out-of-range indices
    vals = tl.load(Src + src_rows[:, None] * stride_sm + cols[None, :] * stride_sd,
                   mask=idx_ok[:, None] & col_ok, other=0)
    tl.store(Dst + dst_rows[:, None] * stride_dm + cols[None, :] * stride_dd, vals,
             mask=store_ok[:, None] & col_ok)


def _launch(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, n_indexed: int,
            scatter: bool) -> None:
    n, D = index.shape[0], src.shape[1]
    if n == 0 or D == 0:
        return
    if interpreting():
        block_r, block_d, warps = 4, min(next_pow2(D), 128), 1
    else:
        block_d = min(next_pow2(D), 1024)
        block_r = max(1, min(16, 4096 // block_d))
        warps = 4
    grid = (triton.cdiv(n, block_r), triton.cdiv(D, block_d))
    _copy_rows_kernel[grid](src, dst, index, n, D, n_indexed,
                            src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
                            SCATTER=scatter, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)


def _check(name: str, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check(x.dim() == 2, f"{name}: expected a 2-D [rows, D] tensor, got shape {tuple(x.shape)}")
    check(index.dim() == 1, f"{name}: index must be 1-D, got shape {tuple(index.shape)}")
    check(index.dtype in (torch.int64, torch.int32),
          f"{name}: index must be int64 (or int32), got {index.dtype}")
    check_same_device(("x", x), ("index", index))
    return index.contiguous()


def gather_rows_fwd(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Launcher: x [M, D], index [N] -> x[index] [N, D] (no autograd)."""
    index = _check("gather_rows", x, index)
    out = torch.empty(index.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, out, index, x.shape[0], scatter=False)
    return out


def scatter_rows_fwd(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Launcher: src [N, D], index [N] unique -> [num_rows, D] with zeros elsewhere (no autograd)."""
    index = _check("scatter_rows", src, index)
    check(index.shape[0] == src.shape[0],
          f"scatter_rows: index has {index.shape[0]} entries but src has {src.shape[0]} rows")
    out = torch.zeros(num_rows, src.shape[1], dtype=src.dtype, device=src.device)
    _launch(src, out, index, num_rows, scatter=True)
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return gather_rows_fwd(x, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return gather_rows_grad(grad, index, ctx.num_rows), None


def gather_rows_grad(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The gradient of ``x`` in ``gather_rows(x, index)``: ``grad`` [N, D] summed into rows
    [num_rows, D] (``index_add``: a repeated index sums its rows, which the scatter kernel does
    not; out-of-range indices were gathered as zeros and get no gradient)."""
    ok = (index >= 0) & (index < num_rows)  # (no boolean indexing: that would wait for the GPU)
    rows = torch.where(ok[:, None], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad.new_zeros(num_rows, grad.shape[1]).index_add_(0, torch.where(ok, index, 0), rows)


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, num_rows):
        ctx.save_for_backward(index)
        return scatter_rows_fwd(src, index, num_rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return gather_rows_fwd(grad, index), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [M, D], index [N] int64 -> [N, D]; differentiable in x (backward: ``gather_rows_grad``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index)
    return gather_rows_fwd(x, index)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """src [N, D], index [N] int64 unique -> [num_rows, D], zeros elsewhere; differentiable in src."""
    if torch.is_grad_enabled() and src.requires_grad:
        return _ScatterRows.apply(src, index, num_rows)
    return scatter_rows_fwd(src, index, num_rows)
