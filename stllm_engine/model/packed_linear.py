"""CPU linear layers with weights pre-packed once in oneDNN's blocked layout.

``F.linear`` on the CPU re-packs (reorders) the weight inside every call for small row counts
(MKL/oneDNN GEMMs block the weight before multiplying). A decode step reads every weight once,
so that per-call packing roughly doubles the memory traffic of batched decode steps (measured on
the bench-cpu LLM at 1 thread: 8 rows 103 -> 62 ms fp32, bf16 30 -> 22 ms). Only decode-sized
inputs (<= ``MAX_PACKED_ROWS`` rows, fp32 from 2 rows) take the packed path: a single fp32 row and
prefill-sized GEMMs were as fast or faster through ``F.linear`` (bench-cpu prefill, 2 threads:
572 vs 519 ms fp32, 173 vs 166 ms bf16).
:class:`PackedLinear` packs the weight at load time (``torch.ops.mkldnn._reorder_linear_weight``)
and multiplies with ``torch.ops.mkldnn._linear_pointwise``, keeping the plain ``weight`` (shared,
not copied) for everything else: other devices, autograd, state dicts.

``pack_linears(model)`` swaps the LLM's projections and the LM head in place; it does nothing
off the CPU, without oneDNN, or with ``STLLM_CPU_PACKED=0``. Packing keeps a second copy of those
weights in memory.

:class:`PackedLinearGELU` (``pack_vision_mlps``) fuses the vision MLP's ``fc1`` bias and exact
GELU into the oneDNN GEMM (a post-op on the float32 accumulator) for float32 weights, where the
result equals ``F.gelu(F.linear(x, w, b))`` to float32 rounding (bit-identical at the ViT's
shapes measured; other GEMM blockings differ by ~1e-7 relative) and skips the separate bias copy
and GELU pass: [4112, 256] x [256, 1117] + GELU 30.1 -> 17.7 ms (bench-cpu ViT, 16 frames,
1 thread). In bfloat16 the fused post-op rounds once instead of twice, so it is not used there.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ENV = "STLLM_CPU_PACKED"
MAX_PACKED_ROWS = 32  # above this (prefill) plain F.linear's MKL/oneDNN GEMM was as fast or faster
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(weight: torch.Tensor) -> bool:
    """oneDNN packing applies: CPU weight of a supported dtype, oneDNN built in, not disabled."""
    return (weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off"))


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` (same ``weight``/``bias`` objects) with a oneDNN-packed copy
    of the weight used for CPU inference of the same dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def _plain_inference(self, x: torch.Tensor) -> bool:
        """CPU input of the weight's dtype outside autograd: the packed weight may be used."""
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def _packed(self, x: torch.Tensor, attr: str, algorithm: str) -> torch.Tensor:
        """oneDNN GEMM with the packed weight (+ bias, + post-op ``attr``) over x's rows."""
        x2 = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, attr, [], algorithm)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (not self._plain_inference(x) or rows > MAX_PACKED_ROWS or rows == 0
                or (rows == 1 and x.dtype == torch.float32)):  # fp32 GEMV: MKL is as fast
            return F.linear(x, self.weight, self.bias)
        return self._packed(x, "none", "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def pack_linears(model) -> int:
    """Swap the LLM projections (qkv, o, gate_up, down) and ``lm_head`` of an STLLMModel for
    :class:`PackedLinear` where packing applies; returns how many were swapped (0: nothing to do,
    e.g. CUDA, or already packed)."""
    if type(model.lm_head) is not nn.Linear or not packing_available(model.lm_head.weight):
        return 0
    swapped = 0
    for layer in model.llm.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            lin = getattr(parent, name)
            if type(lin) is nn.Linear:
                setattr(parent, name, PackedLinear(lin))
                swapped += 1
    model.lm_head = PackedLinear(model.lm_head)
    return swapped + 1


class PackedLinearGELU(PackedLinear):
    """``gelu(linear(x))`` (exact erf GELU) with bias + GELU fused into a oneDNN GEMM on CPU
    float32 inference (any row count); plain torch otherwise. Same ``weight``/``bias`` objects
    and names as the ``nn.Linear`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plain_inference(x) or x.dtype != torch.float32 or x.numel() == 0:
            return F.gelu(F.linear(x, self.weight, self.bias))
        return self._packed(x, "gelu", "none")

    def extra_repr(self) -> str:
        return super().extra_repr() + "+gelu"


def pack_vision_mlps(model) -> int:
    """Swap every vision-side MLP ``fc1`` (ViT blocks, BT-Adapter) of an STLLMModel for
    :class:`PackedLinearGELU` where it is exact (CPU float32, oneDNN); returns how many."""
    from stllm_engine.model.vision import EVAMlp

    swapped = 0
    for mod in model.visual_encoder.modules():
        if isinstance(mod, EVAMlp) and type(mod.fc1) is nn.Linear and mod.fc1.weight.dtype == torch.float32 \
                and packing_available(mod.fc1.weight):
            mod.fc1 = PackedLinearGELU(mod.fc1)
            mod.gelu_fused = True
            swapped += 1
    return swapped
