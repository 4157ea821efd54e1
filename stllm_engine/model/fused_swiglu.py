"""The CPU prefill's SwiGLU fused into its gate_up GEMM on AMX tiles (``csrc/amx_swiglu_cpu.cpp``).

Unfused, a prefill's MLP writes the [rows, 2I] gate_up output to memory and reads it back for
``silu(gate) * up``; the fused kernel keeps a block's gate and up accumulators in tiles side by side
and writes only the [rows, I] result, rounded as the unfused path rounds (gate and up to bfloat16,
then ``T(T(silu(gate)) * up)``). bench-cpu, [608 x 1024] -> 2 x 2816, 2 threads, over 8 layers'
weights in turn (cold, as in a prefill; ``benchmarks/kernels.py``): 5.52 ms (oneDNN GEMM + the C++
SwiGLU) -> 4.20 ms; a 2048-row chunk: 17.2 -> 14.4 ms. A whole bench-cpu prefill (interleaved):
123.9 -> 114.4 ms. ST-LLM-7B's [608 x 4096] -> 2 x 11008 (inputs wider than 1024 run the kernel
k chunk by chunk): 85.6 -> 67.0 ms.

:func:`pack_swiglu` packs each LLaMA MLP's gate_up weight once for the kernel (bfloat16 CPU models
where it runs) and decides at load whether prefills use it: ``STLLM_CPU_FUSED_SWIGLU=auto`` (the
default) times both paths over the first layers' weights at the model's typical prefill row count,
``1`` always, ``0`` never. The packed copy sits beside oneDNN's (decode steps keep that one); it is
made only while the plain weight is still loaded and the copy fits in memory
(:func:`~stllm_engine.model.packed_linear.keep_plain_copies`). :func:`swiglu` is the MLP's entry:
inputs of more than :data:`MIN_ROWS` rows (:data:`MIN_ROWS_WIDE` for wide models; CPU, bfloat16,
outside autograd) take the fused kernel.
"""
from __future__ import annotations

import os

import torch

from stllm_engine.model.packed_linear import (calibration_fixed, interleaved_medians, keep_plain_copies,
                                              llm_prefill_rows)

ENV = "STLLM_CPU_FUSED_SWIGLU"  # auto (default) | 1 | 0
MIN_ROWS = 32  # decode-sized inputs keep oneDNN's packed GEMM (the fused kernel works on 32-row blocks)
# Inputs wider than WIDE_FEATURES stream a larger weight per row: there the kernel is even with the
# unfused path at 96 rows and 13% slower at 33 (ST-LLM-7B, [rows, 4096] -> 2 x 11008: 15.1 vs
# 13.2 ms), so they take it from MIN_ROWS_WIDE rows on.
WIDE_FEATURES, MIN_ROWS_WIDE = 1024, 96
CALIBRATION_LAYERS = 4  # timed in turn, so their weights come from memory as in a prefill


def mode() -> str:
    """``STLLM_CPU_FUSED_SWIGLU`` as auto, 1 or 0 (a bad value raises, naming it)."""
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw not in ("auto", "0", "1"):
        raise ValueError(f"{ENV} must be auto, 0 or 1, got {raw!r}")
    return raw


def available() -> bool:
    """The extension's AMX SwiGLU kernel runs here (AMX-BF16 tiles + OS permission)."""
    from stllm_engine.ops._backend import cpp

    return bool(cpp().amx_swiglu_available())


def swiglu(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``mlp.gate_up_proj(x)`` through the fused kernel, or None where it
    does not apply (not packed or not chosen, a decode-sized or non-CPU / non-bfloat16 input,
    autograd)."""
    packed = getattr(mlp, "swiglu_packed", None)
    if (packed is None or x.dim() != 2
            or x.shape[0] <= (MIN_ROWS if x.shape[1] <= WIDE_FEATURES else MIN_ROWS_WIDE)
            or x.dtype != torch.bfloat16 or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    from stllm_engine.ops._backend import cpp

    return cpp().amx_swiglu(x, packed, x.shape[1], mlp.intermediate_size)


def describe(model) -> str:
    """The CPU prefill MLP's first half, for reports: fused on AMX, or GEMM + separate SwiGLU."""
    layers = getattr(getattr(model, "llm", None), "layers", None) or []
    fused = any(getattr(layer.mlp, "swiglu_packed", None) is not None for layer in layers)
    return "amx gate_up+swiglu" if fused else "gate_up gemm + swiglu"


def _plain_weight(lin) -> torch.Tensor | None:
    w = getattr(lin, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


@torch.no_grad()
def pack_swiglu(model) -> int:
    """Pack the gate_up weight of every LLaMA MLP of an STLLMModel for the fused kernel
    (``LlamaMLP.swiglu_packed``) where the timing chooses it (see the module doc); returns how many
    MLPs use the fused kernel (0: not a
    bfloat16 CPU model, no AMX, ``STLLM_CPU_FUSED_SWIGLU=0``, already packed, plain weights already
    freed, no room, or the timing chose the unfused path, whose packed copies are then freed)."""
    layers = list(model.llm.layers)
    weights = [_plain_weight(layer.mlp.gate_up_proj) for layer in layers]
    if mode() == "0" or not layers or any(layer.mlp.swiglu_packed is not None for layer in layers):
        return 0
    if any(w is None or w.device.type != "cpu" or w.dtype != torch.bfloat16 for w in weights) or not available():
        return 0
    if not keep_plain_copies(sum(w.numel() * w.element_size() for w in weights)):
        return 0
    from stllm_engine.ops._backend import cpp

    for layer, w in zip(layers, weights):
        layer.mlp.swiglu_packed = cpp().amx_swiglu_pack(w.detach().contiguous())
    use = mode() == "1" or _fused_is_faster([layer.mlp for layer in layers[:CALIBRATION_LAYERS]],
                                            llm_prefill_rows(model.config))
    if not use:  # the packed copies go (their memory would only sit there)
        for layer in layers:
            layer.mlp.swiglu_packed = None
    return len(layers) if use else 0


def _fused_is_faster(mlps, rows: int, repeats: int = 3) -> bool:
    """Whether the fused kernel beats gate_up + SwiGLU over ``mlps`` in turn at ``rows`` rows
    (median of ``repeats`` interleaved rounds after a warm-up)."""
    from stllm_engine.ops import elementwise as ew

    if calibration_fixed():  # (STLLM_CPU_CALIBRATION=fixed: the unfused path, nothing timed)
        return False
    x = (torch.randn(rows, mlps[0].gate_up_proj.in_features) * 0.5).to(torch.bfloat16)

    def unfused():
        for mlp in mlps:
            ew.silu_and_mul(mlp.gate_up_proj(x))

    def fused():
        for mlp in mlps:
            swiglu(mlp, x)

    t_unfused, t_fused = interleaved_medians([unfused, fused], repeats)
    return t_fused < t_unfused
