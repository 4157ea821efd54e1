"""Helpers shared by the Triton kernel tests: where they run, seeded inputs, flash-attention's
error rule.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (float32/float16: the
interpreter computes bfloat16 wrongly). With ``STLLM_TEST_TRITON_COMPILED=1`` on a CUDA machine they
run compiled on the GPU: ``conftest.py`` makes CUDA the default device inside the test_kernels_triton
modules, so every tensor they build (and every generator from :func:`gen`) lives there, and bfloat16
joins the dtypes.
"""
import os

import torch

COMPILED = os.environ.get("STLLM_TEST_TRITON_COMPILED") == "1"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if COMPILED else [])
EPS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def gen(seed=0):
    """A seeded generator on the current default device (CPU, or CUDA for compiled runs)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def assert_fa_close(out, ref32, same_dtype):
    """flash-attention's rule: |out - ref32| <= 2 * |torch_same_dtype - ref32| + eps."""
    err = (out.float() - ref32.float()).abs().max().item()
    base = (same_dtype.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + EPS[out.dtype], f"max error {err} vs torch {out.dtype} error {base}"
