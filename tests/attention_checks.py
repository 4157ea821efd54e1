"""Helpers shared by the Triton kernel tests: seeded inputs and flash-attention's error rule."""
import torch

EPS = {torch.float32: 2e-5, torch.float16: 2e-3}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def assert_fa_close(out, ref32, same_dtype):
    """flash-attention's rule: |out - ref32| <= 2 * |torch_same_dtype - ref32| + eps."""
    err = (out.float() - ref32.float()).abs().max().item()
    base = (same_dtype.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + EPS[out.dtype], f"max error {err} vs torch {out.dtype} error {base}"
