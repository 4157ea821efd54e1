"""CPU decode steps of the LLaMA decoder in one call to the compiled core.

A decode step moves one token a sequence through every layer: ~15 small calls a layer whose
arithmetic is tiny next to the weight reads, so on the CPU the Python between them (module calls,
argument checks, dispatch) was ~3.5-4.5 ms of a bench-cpu bf16 step (forward + LM head, context
600: 18.3 ms through the Python loop, 14.7 ms compiled; ``benchmarks/decode_step.py``). ``llama_decode``
(``csrc/llama_decode_cpu.cpp``) chains the same kernels in C++, in the same order, on the same
weights (oneDNN-packed where :class:`PackedLinear` would use the packed copy), so its result is
bit-identical to the Python loop of :class:`~stllm_engine.model.llama.LlamaModel`, which stays
the definition (and the path for CUDA, float16, autograd and larger batches).
``STLLM_CPU_COMPILED_DECODE=0`` turns it off (A/B measurements).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn

from stllm_engine.model.packed_linear import MAX_PACKED_ROWS, PackedLinear
from stllm_engine.ops._backend import cpp

ENV = "STLLM_CPU_COMPILED_DECODE"
_DTYPES = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    raw = os.environ.get(ENV, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "on", "off", "yes", "no"):
        raise ValueError(f"{ENV} must be 0 or 1, got {raw!r}")
    return raw in ("1", "true", "on", "yes")


class DecodePlan(NamedTuple):
    """Everything ``llama_decode`` takes besides the step's inputs, gathered from the layers."""

    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    packed: list[bool]
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float


def plan_for(llm, embeds: torch.Tensor, ctx, max_rows: int) -> DecodePlan | None:
    """The plan when this pass is a CPU decode step the compiled loop runs (every row one
    sequence's new token over a bound cache, float32/bfloat16 outside autograd, at most
    ``max_rows`` rows: the rows the Python loop runs unpadded), else None."""
    if (ctx.is_prefill or ctx.slot_mapping is None or embeds.device.type != "cpu"
            or embeds.dtype not in _DTYPES or not 0 < embeds.shape[0] <= max_rows
            or torch.is_grad_enabled() or torch.compiler.is_compiling() or not enabled()):
        return None
    return _cached_plan(llm, embeds.shape[0], embeds.dtype)


def _linears(layer) -> tuple[nn.Module, ...]:
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


def _cached_plan(llm, rows: int, dtype: torch.dtype) -> DecodePlan | None:
    """The plan for ``rows`` rows, or None when a layer does not fit (no cache bound, biases,
    other dtypes). Built once per cache binding and per packing choice (which depends on the row
    count only up to MAX_PACKED_ROWS + 1)."""
    first = llm.layers[0].self_attn.k_cache
    cache = llm.__dict__.setdefault("_cpu_decode_plans", {})
    if cache.get("owner") is not first:
        cache.clear()
        cache["owner"] = first
    key = (min(rows, MAX_PACKED_ROWS + 1), dtype)
    if key not in cache:
        cache[key] = _build(llm, rows, dtype)
    return cache[key]


def _build(llm, rows: int, dtype: torch.dtype) -> DecodePlan | None:
    norms, weights, flags, kcs, vcs = [], [], [], [], []
    for layer in llm.layers:
        attn = layer.self_attn
        if attn.k_cache is None or attn.k_cache.dtype != dtype:
            return None
        norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for lin in _linears(layer):
            weight_dtype = lin.dtype if isinstance(lin, PackedLinear) else lin.weight.dtype  # packed: plain may be freed
            if lin.bias is not None or weight_dtype != dtype:
                return None
            packed = isinstance(lin, PackedLinear) and lin.packed_for(rows, dtype)
            weights.append(lin.packed if packed else lin.weight)
            flags.append(packed)
        kcs.append(attn.k_cache)
        vcs.append(attn.v_cache)
    norms.append(llm.norm.weight)
    if any(w.dtype != dtype for w in norms) or len({layer.input_layernorm.eps for layer in llm.layers}
                                                   | {layer.post_attention_layernorm.eps for layer in llm.layers}
                                                   | {llm.norm.eps}) != 1:
        return None
    attn = llm.layers[0].self_attn
    return DecodePlan([w.detach() for w in norms], [w.detach() for w in weights], flags, kcs, vcs,
                      attn.num_heads, attn.num_kv_heads, attn.head_dim, float(llm.norm.eps), float(attn.scale))


def run(plan: DecodePlan, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
    """Final-normed hidden states [B, H] of a decode step (``plan`` from :func:`plan_for`)."""
    return cpp().llama_decode(embeds, cos.contiguous(), sin.contiguous(), plan.norms, plan.weights, plan.packed,
                              plan.k_caches, plan.v_caches, ctx.slot_mapping.to(torch.int64).contiguous(),
                              ctx.block_tables.to(torch.int32).contiguous(),
                              ctx.context_lens.to(torch.int32).contiguous(),
                              plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.eps, plan.scale)
