"""LLaMA's element-wise ops fused for CUDA: RMSNorm (optionally after the residual add), rotary
embedding in place on fused qkv rows, SwiGLU on fused gate_up rows. One program per row.

Layouts (row-major 2-D views with explicit row strides; the last dim contiguous):
  rms_norm:      x [N, H] (stride_x), weight [H], residual [N, H] (stride_r, updated in place
                 to residual + x when ADD), out [N, H] (stride_o):
                 out = T(weight * T(h * rsqrt(mean(h^2) + eps))), h = float(residual + x or x)
  rotary:        qkv [N, >= heads * d] (stride_q), cos/sin [N, d]: the first `heads` heads of
                 each row rotated in place (rotate-half), each product rounded to T as torch does
  silu_and_mul:  x [N, 2I] = [gate | up] (stride_x) -> out [N, I]: T(T(silu(gate)) * up)
Constraints: float16/bfloat16/float32; H, d, I any size (masked to the next power of two);
statistics and products in float32, rounded to the tensor dtype T where the torch twins
(``stllm_engine.ops.elementwise``: rms_norm_ref, rotate_ref, silu_and_mul_ref) round.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check, check_float, check_same_device, interpreting, next_pow2


@triton.jit
def _rms_norm_kernel(X, R, W, Out, n_cols, stride_x, stride_r, stride_o, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # torch's add rounds to the dtype
        tl.store(R + row * stride_r + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = (h * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(QKV, Cos, Sin, n_heads, stride_q, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    ok_i = i < HALF
    ok = (heads[:, None] < n_heads) & ok_i[None, :]
    c1 = tl.load(Cos + row * 2 * HALF + i, mask=ok_i, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + row * 2 * HALF + HALF + i, mask=ok_i, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + row * 2 * HALF + i, mask=ok_i, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + row * 2 * HALF + HALF + i, mask=ok_i, other=0.0).to(tl.float32)
    base = QKV + row * stride_q + heads[:, None] * (2 * HALF) + i[None, :]
    x1r = tl.load(base, mask=ok, other=0.0)
    x2r = tl.load(base + HALF, mask=ok, other=0.0)
    dt = x1r.dtype
    x1, x2 = x1r.to(tl.float32), x2r.to(tl.float32)
    a = (x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)
    b = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(base, a.to(dt), mask=ok)
    tl.store(base + HALF, b.to(dt), mask=ok)


@triton.jit
def _silu_mul_kernel(X, Out, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (s * u.to(tl.float32)).to(g.dtype), mask=ok)


def _rows_ok(name: str, t: torch.Tensor) -> None:
    check(t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1),
          f"{name} must be 2-D with a contiguous last dim, got shape {tuple(t.shape)} strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x [N, H]) * weight -> new [N, H]; with ``residual`` [N, H], that tensor becomes
    residual + x (in place) and is what gets normalised."""
    _rows_ok("x", x)
    check_float("x", x)
    check(weight.dim() == 1 and weight.shape[0] == x.shape[1] and weight.dtype == x.dtype,
          f"weight must be [{x.shape[1]}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    named = [("x", x), ("weight", weight)]
    if residual is not None:
        _rows_ok("residual", residual)
        check(residual.shape == x.shape and residual.dtype == x.dtype,
              f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
        named.append(("residual", residual))
    check_same_device(*named)
    N, H = x.shape
    out = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    r = residual if residual is not None else x
    _rms_norm_kernel[(N,)](x, r, weight.contiguous(), out, H, x.stride(0), r.stride(0), out.stride(0),
                           float(eps), ADD=residual is not None, BLOCK=next_pow2(H),
                           num_warps=1 if interpreting() else min(16, max(1, next_pow2(H) // 256)))
    return out


def rotary_(qkv: torch.Tensor, num_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``num_heads`` heads of each row of qkv in place; returns qkv."""
    _rows_ok("qkv", qkv)
    check_float("qkv", qkv)
    check(head_dim > 0 and head_dim % 2 == 0, f"head_dim must be positive and even, got {head_dim}")
    check(0 <= num_heads and num_heads * head_dim <= qkv.shape[1],
          f"num_heads * head_dim = {num_heads * head_dim} exceeds the row width {qkv.shape[1]}")
    check(cos.shape == sin.shape == (qkv.shape[0], head_dim) and cos.dtype == sin.dtype == qkv.dtype,
          f"cos/sin must be [{qkv.shape[0]}, {head_dim}] of {qkv.dtype}, got {tuple(cos.shape)} {cos.dtype}")
    check_same_device(("qkv", qkv), ("cos", cos), ("sin", sin))
    N = qkv.shape[0]
    if N == 0 or num_heads == 0:
        return qkv
    half = head_dim // 2
    _rotary_kernel[(N,)](qkv, cos.contiguous(), sin.contiguous(), num_heads, qkv.stride(0), HALF=half,
                         BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(half),
                         num_warps=1 if interpreting() else 4)
    return qkv


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] = [gate | up] -> silu(gate) * up [N, I]."""
    _rows_ok("x", x)
    check_float("x", x)
    check(x.shape[1] % 2 == 0, f"x must hold [gate | up] (an even width), got {tuple(x.shape)}")
    check_same_device(("x", x))
    N, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((N, I), dtype=x.dtype, device=x.device)
    if N == 0 or I == 0:
        return out
    block = min(next_pow2(I), 128 if interpreting() else 1024)
    _silu_mul_kernel[(N, triton.cdiv(I, block))](x, out, I, x.stride(0), out.stride(0), BLOCK=block,
                                                 num_warps=1 if interpreting() else 4)
    return out
