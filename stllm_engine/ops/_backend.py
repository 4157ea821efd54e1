"""Backend choice of the dispatch point: Triton launchers on CUDA, the C++ core on CPU.

Imports are lazy: importing ``stllm_engine.ops`` imports neither triton nor the extension.
``STLLM_OPS_BACKEND=triton`` (read at import) sends CPU tensors to the Triton launchers as well:
with ``TRITON_INTERPRET=1`` that exercises the CUDA dispatch on a machine without a GPU.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_C_MODULE: ModuleType | None = None
_FORCE_TRITON = os.environ.get("STLLM_OPS_BACKEND", "").lower() == "triton"


def on_cuda(t: torch.Tensor) -> bool:
    """True when ``t`` goes to the Triton kernels: it lives on a CUDA device (or STLLM_OPS_BACKEND=triton)."""
    return _FORCE_TRITON or t.device.type == "cuda"


def cpp() -> ModuleType:
    """``stllm_engine._C`` (torch is imported first, as the extension needs)."""
    global _C_MODULE
    if _C_MODULE is None:
        _C_MODULE = importlib.import_module("stllm_engine._C")
    return _C_MODULE


def triton_kernels(module: str) -> ModuleType:
    """``stllm_engine.kernels.<module>`` (e.g. "paged_attention")."""
    return importlib.import_module(f"stllm_engine.kernels.{module}")


def plain(*tensors: torch.Tensor) -> bool:
    """Outside autograd and tracing: a fused kernel (or one without a derivative) may run."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) when cond is false (argument validation, as the Triton launchers)."""
    if not cond:
        raise ValueError(msg)


def check_cpu(op: str, *named: tuple[str, torch.Tensor]) -> None:
    """All tensors on the CPU (the C++ path); names the offending argument otherwise."""
    for name, t in named:
        check(t.device.type == "cpu",
              f"{op}: {name} is on {t.device}, but the other inputs are on the CPU")


_CPU_ATTENTION_CHOICES = ("auto", "torch")


def cpu_attention_backend() -> str:
    """``STLLM_CPU_ATTENTION`` (read per call, so a benchmark can compare both in one process):
    ``auto`` (default) runs bfloat16 prefill attention on the C++ AMX kernel where the CPU has AMX
    tiles; ``torch`` keeps torch's SDPA everywhere."""
    value = os.environ.get("STLLM_CPU_ATTENTION", "auto").strip().lower() or "auto"
    check(value in _CPU_ATTENTION_CHOICES,
          f"STLLM_CPU_ATTENTION={value!r}: expected one of {', '.join(_CPU_ATTENTION_CHOICES)}")
    return value


_CUDA_ATTENTION_CHOICES = ("auto", "triton")


def cuda_attention_backend() -> str:
    """``STLLM_CUDA_ATTENTION`` (read per call): ``auto`` (default) runs attention over batches of
    equal-length sequences (the ViT's frames) on torch's SDPA, which picks cuDNN / FlashAttention-2
    kernels for any head dim (the ViT-g's 88 included), and everything else (packed causal
    prefill, paged attention) on the Triton kernels; ``triton`` keeps every attention on Triton."""
    value = os.environ.get("STLLM_CUDA_ATTENTION", "auto").strip().lower() or "auto"
    check(value in _CUDA_ATTENTION_CHOICES,
          f"STLLM_CUDA_ATTENTION={value!r}: expected one of {', '.join(_CUDA_ATTENTION_CHOICES)}")
    return value


_AMX: bool | None = None


def amx_attention() -> bool:
    """True when the extension's AMX-BF16 flash attention can run here (CPU tiles + OS permission)."""
    global _AMX
    if _AMX is None:
        _AMX = bool(cpp().amx_attention_available())
    return _AMX
