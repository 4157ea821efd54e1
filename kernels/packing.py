"""Masked token packing / unpacking and ragged packing (no padding in the LLM).

pack_by_mask: x [B, L, D], keep [B, L] bool -> packed [N, D] (kept rows in (b, l) order),
cu_seqlens int32 [B+1], src_index int64 [N] with src_index = b * L + l. Index bookkeeping uses
torch (nonzero / cumsum); the data movement is a row gather/scatter: the Triton one
(``gather_rows.py``, autograd included) unless the caller passes its own, as the op layer does for
CPU tensors (its C++ gather), so this one implementation serves every backend. Importing this
module does not import triton.
"""
from __future__ import annotations

import torch

from ._utils import check


def _triton_rows():
    from .gather_rows import gather_rows, scatter_rows

    return gather_rows, scatter_rows


def pack_by_mask(x: torch.Tensor, keep: torch.Tensor, gather_rows=None):
    """x [B, L, D], keep [B, L] bool -> (packed [N, D], cu_seqlens [B+1] int32, src_index [N] int64).

    ``gather_rows(x [M, D], index [N]) -> [N, D]``: the row gather to use (default: Triton's)."""
    check(x.dim() == 3, f"pack_by_mask: x must be [B, L, D], got shape {tuple(x.shape)}")
    check(keep.dtype == torch.bool, f"pack_by_mask: keep must be bool, got {keep.dtype}")
    check(tuple(keep.shape) == tuple(x.shape[:2]),
          f"pack_by_mask: keep shape {tuple(keep.shape)} does not match x's [B, L] {tuple(x.shape[:2])}")
    check(keep.device == x.device, f"pack_by_mask: keep on {keep.device}, x on {x.device}")
    B, L, D = x.shape
    src_index = torch.nonzero(keep.reshape(-1), as_tuple=False).reshape(-1)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(keep.sum(dim=1), 0)
    gather_rows = gather_rows or _triton_rows()[0]
    packed = gather_rows(x.reshape(B * L, D), src_index)
    return packed, cu_seqlens, src_index


def unpack(packed: torch.Tensor, src_index: torch.Tensor, B: int, L: int, scatter_rows=None) -> torch.Tensor:
    """packed [N, D], src_index [N] (from pack_by_mask) -> [B, L, D], zeros at dropped positions.

    ``scatter_rows(src, index, num_rows)``: the row scatter to use (default: Triton's)."""
    check(packed.dim() == 2, f"unpack: packed must be [N, D], got shape {tuple(packed.shape)}")
    scatter_rows = scatter_rows or _triton_rows()[1]
    return scatter_rows(packed, src_index, B * L).view(B, L, packed.shape[1])


def pack_ragged(seqs: list[torch.Tensor]):
    """list of [Li, D] (same D, dtype, device) -> (packed [N, D], cu_seqlens [B+1] int32)."""
    check(len(seqs) > 0, "pack_ragged: need at least one sequence")
    first = seqs[0]
    for i, s in enumerate(seqs):
        check(s.dim() == 2 and s.shape[1] == first.shape[1],
              f"pack_ragged: sequence {i} has shape {tuple(s.shape)}, expected [L, {first.shape[1]}]")
        check(s.dtype == first.dtype and s.device == first.device,
              f"pack_ragged: sequence {i} is {s.dtype} on {s.device}, "
              f"expected {first.dtype} on {first.device}")
    lens = torch.tensor([0] + [s.shape[0] for s in seqs], dtype=torch.int64)
    cu_seqlens = torch.cumsum(lens, 0).to(dtype=torch.int32, device=first.device)
    return torch.cat(seqs, 0), cu_seqlens
