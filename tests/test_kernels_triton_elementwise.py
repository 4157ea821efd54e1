"""Triton fused element-wise kernels (RMSNorm +/- residual add, in-place rotary on qkv rows,
SwiGLU) vs their torch twins, through the interpreter (float32/float16; small shapes) or compiled
on the GPU (``STLLM_TEST_TRITON_COMPILED=1``, bfloat16 too), and the op layer's dispatch to them
(STLLM_OPS_BACKEND=triton sends CPU tensors there)."""
import pytest
import torch

from attention_checks import DTYPES, gen
from stllm_engine.kernels import elementwise as k
from stllm_engine.model.llama import rotary_cos_sin
from stllm_engine.ops import elementwise as ew


def _close(got, want, dtype):
    # fp32: reduction order; fp16/bf16: a float-ulp difference before a rounding can flip it (2 ulp)
    tol = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 64), (5, 88), (2, 300)])
def test_rms_norm(dtype, rows, hidden):
    g = gen(rows * hidden)
    x = torch.randn(rows, 2 * hidden, generator=g).to(dtype)[:, :hidden]  # strided rows
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    _close(k.rms_norm(x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6), dtype)
    want_res = res + x
    got_res = res.clone()
    out = k.rms_norm(x, w, 1e-5, residual=got_res)
    assert torch.equal(got_res, want_res)
    _close(out, ew.rms_norm_ref(want_res, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,head_dim,q_heads,kv_heads", [(1, 2, 1, 1), (4, 64, 4, 2), (3, 88, 2, 1), (2, 16, 3, 3)])
def test_rotary_in_place(dtype, rows, head_dim, q_heads, kv_heads):
    g = gen(rows + head_dim)
    heads = q_heads + kv_heads
    qkv = torch.randn(rows, (heads + kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = rotary_cos_sin(torch.randint(0, 2000, (rows,), generator=g), head_dim, 10000.0, dtype)
    want = qkv.clone()
    w = heads * head_dim
    want[:, :w] = ew.rotate_ref(qkv[:, :w].reshape(rows, heads, head_dim), cos, sin).reshape(rows, w)
    got = qkv.clone()
    assert k.rotary_(got, heads, head_dim, cos, sin) is got
    assert torch.equal(got[:, w:], qkv[:, w:])
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1), (3, 172), (2, 300)])
def test_silu_and_mul(dtype, rows, inter):
    x = (3 * torch.randn(rows, 2 * inter, generator=gen(inter))).to(dtype)
    _close(k.silu_and_mul(x), ew.silu_and_mul_ref(x), dtype)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight must be"):
        k.rms_norm(torch.randn(2, 4), torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match="exceeds the row width"):
        k.rotary_(torch.randn(2, 8), 3, 4, torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="even width"):
        k.silu_and_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        k.silu_and_mul(torch.ones(2, 4, dtype=torch.int32))


def test_op_layer_dispatches_to_triton(monkeypatch):
    from stllm_engine.ops import _backend

    monkeypatch.setattr(_backend, "_FORCE_TRITON", True)
    calls = []
    real = _backend.triton_kernels
    monkeypatch.setattr(ew, "triton_kernels", lambda m: calls.append(m) or real(m))
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    res = torch.randn(3, 16)
    _close(ew.rms_norm(x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6), torch.float32)
    out, new_res = ew.add_rms_norm(x, res.clone(), w, 1e-6)
    _close(out, ew.rms_norm_ref(res + x, w, 1e-6), torch.float32)
    gu = torch.randn(3, 8)
    _close(ew.silu_and_mul(gu), ew.silu_and_mul_ref(gu), torch.float32)
    qkv = torch.randn(3, 3 * 16)
    cos, sin = rotary_cos_sin(torch.arange(3), 8, 10000.0, torch.float32)
    want = ew.rotate_ref(qkv[:, :32].reshape(3, 4, 8), cos, sin).reshape(3, 32)
    _close(ew.rotary_qk_(qkv, 4, 8, cos, sin)[:, :32], want, torch.float32)
    assert calls == ["elementwise"] * 4
