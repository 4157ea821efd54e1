"""The element-wise ops, fused: LLaMA's RMSNorm (+ the residual add before it), rotary embedding in
place on the fused qkv rows and SwiGLU on the fused gate_up rows; the vision side's exact GELU.

CPU float32/bfloat16 tensors outside autograd go to one C++ pass each (``csrc/rms_norm_cpu.cpp``,
``rotary_cpu.cpp``, ``activation_cpu.cpp``: 2-10x fewer memory passes than torch's op-by-op
versions); CUDA tensors to the Triton kernels of ``kernels/elementwise.py`` (one launch per op
instead of 4-8); everything else (CPU float16, autograd, ``torch.compile`` tracing) runs the
torch twins below, which define the results: the C++ ops round every intermediate to the tensor dtype
where the twins do, so bfloat16 results are equal up to reduction order (RMSNorm) and float32
within a few ulp.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ._backend import cpp, on_cuda, plain, triton_kernels

_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _backend(*tensors: torch.Tensor) -> str | None:
    """Where a fused op runs: "triton" (CUDA), "cpp" (CPU float32/bfloat16) or None (the torch
    twin: other dtypes, autograd, tracing). Layout conditions are the caller's."""
    t = tensors[0]
    if not plain(*tensors):
        return None
    if on_cuda(t):
        return "triton"
    return "cpp" if t.device.type == "cpu" and t.dtype in _CPP_DTYPES else None


# --- torch twins (the definition) ---------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d] rotated by cos/sin [N, d] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- ops ------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] -> RMSNorm(x) * weight [N, H] (statistics in float32)."""
    fits = x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype
    backend = _backend(x, weight) if fits else None
    if backend == "triton":
        return triton_kernels("elementwise").rms_norm(x, weight, eps)
    if backend == "cpp":
        out = torch.empty(x.shape, dtype=x.dtype)
        cpp().rms_norm(x, weight.contiguous(), out, float(eps))
        return out
    return rms_norm_ref(x, weight, eps)


CPP_LAYER_NORM_MIN = 1 << 16  # elements: smaller inputs run torch's layer_norm (see layer_norm)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               upcast: bool = False) -> torch.Tensor:
    """LayerNorm over the last dim with statistics and affine in float32, rounded once to x's dtype
    (= ``F.layer_norm(x.float(), weight.float(), bias.float(), eps).to(x.dtype)`` and torch's own
    bfloat16 op, up to the statistics' reduction order). CPU float32/bfloat16 with weight and bias
    of x's dtype and at least :data:`CPP_LAYER_NORM_MIN` elements: the C++ op
    (``csrc/layer_norm_cpu.cpp``; bfloat16, 2 threads: [4112, 256] 226 vs 295 us for torch's,
    [4112, 1408] 930 vs 1253 us; below 256 x 256 torch's call costs less); elsewhere torch's op,
    on float32 copies with ``upcast``."""
    w = x.shape[-1]
    if (x.dim() >= 2 and x.stride(-1) == 1 and weight.dtype == bias.dtype == x.dtype
            and x.numel() >= CPP_LAYER_NORM_MIN
            and weight.shape == bias.shape == (w,) and _backend(x, weight, bias) == "cpp"):
        x2 = x.reshape(-1, w)
        out = torch.empty(x2.shape, dtype=x.dtype)
        cpp().layer_norm(x2, weight.contiguous(), bias.contiguous(), out, float(eps))
        return out.view(x.shape)
    if upcast:
        return F.layer_norm(x.float(), (w,), weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, (w,), weight, bias, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) * weight, residual + x). ``residual`` must be a contiguous [N, H]
    tensor the caller owns: the fused paths update it in place and return it as the new residual."""
    fits = (x.dim() == 2 and x.stride(-1) == 1 and residual.is_contiguous() and residual.shape == x.shape
            and residual.dtype == x.dtype == weight.dtype)
    backend = _backend(x, residual, weight) if fits else None
    if backend == "triton":
        return triton_kernels("elementwise").rms_norm(x, weight, eps, residual=residual), residual
    if backend == "cpp":
        out = torch.empty(x.shape, dtype=x.dtype)
        cpp().add_rms_norm_(x, residual, weight.contiguous(), out, float(eps))
        return out, residual
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual


def rotary_qk_(qkv: torch.Tensor, num_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``num_heads`` heads (q then k of a fused qkv projection) of each row of
    qkv [N, >= num_heads * head_dim] in place by cos/sin [N, head_dim]; returns qkv."""
    fits = qkv.dim() == 2 and qkv.stride(-1) == 1 and cos.dtype == qkv.dtype
    backend = _backend(qkv) if fits else None
    if backend == "triton":
        return triton_kernels("elementwise").rotary_(qkv, num_heads, head_dim, cos, sin)
    if backend == "cpp":
        cpp().rotary_embedding_(qkv, num_heads, head_dim, cos.contiguous(), sin.contiguous())
        return qkv
    n, w = qkv.shape[0], num_heads * head_dim
    rotated = rotate_ref(qkv[:, :w].reshape(n, num_heads, head_dim), cos, sin)
    if qkv.requires_grad and torch.is_grad_enabled():
        return torch.cat([rotated.reshape(n, w), qkv[:, w:]], dim=-1)
    qkv[:, :w] = rotated.reshape(n, w)
    return qkv


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] = [gate | up] -> silu(gate) * up [N, I]."""
    backend = _backend(x) if x.dim() == 2 and x.stride(-1) == 1 else None
    if backend == "triton":
        return triton_kernels("elementwise").silu_and_mul(x)
    if backend == "cpp":
        out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype)
        cpp().silu_and_mul(x, out)
        return out
    return silu_and_mul_ref(x)


@lru_cache(maxsize=None)
def gelu_table(dtype: torch.dtype) -> torch.Tensor:
    """``F.gelu`` (exact) of every value of a 16-bit ``dtype``, indexed by bit pattern, plus one
    padding entry (the C++ lookup reads 4 bytes per entry): [65536 + 1] of ``dtype``."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    return torch.cat([F.gelu(every), torch.zeros(1, dtype=dtype)])


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x, in place where it can. A contiguous CPU bfloat16 tensor outside
    autograd is rewritten through :func:`gelu_table` (``csrc/activation_cpu.cpp``, one gathered
    lookup per value: torch's own result bit for bit, in place, and faster than torch's bfloat16
    GELU and than oneDNN's GELU post-op: ``benchmarks/kernels.py``); anything else returns
    ``F.gelu(x)``."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous() and plain(x):
        cpp().lookup16_(x, gelu_table(x.dtype))
        return x
    return F.gelu(x)

