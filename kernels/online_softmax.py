"""Shared @triton.jit pieces of the attention kernels: one online-softmax step, paged addressing.

Logits are in log2 units (the softmax scale is pre-multiplied by log2(e)) so exp2 is used.
Masked logits are -inf; a row whose logits so far are all -inf keeps m = -inf, l = 0, acc = 0
(no NaN), and the final normalisation turns it into zeros (flash-attn's convention).
"""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, m_i, l_i, qk, v, PREC: tl.constexpr):
    """acc [M, D] f32, m_i/l_i [M] f32, qk [M, N] f32 (log2 units), v [N, D] -> (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def finalize(acc, l_i):
    """acc / l per row; rows with l == 0 (no visible key) become zeros."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def paged_slots(BlockTableRow, pos, pos_ok, block_size):
    """Paged-cache coordinates (block id, offset in block), both int64, of token positions pos [N]
    of one sequence; BlockTableRow points at the sequence's int32 block table."""
    blk = tl.load(BlockTableRow + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
    return blk, (pos % block_size).to(tl.int64)
