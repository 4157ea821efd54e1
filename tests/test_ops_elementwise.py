"""The fused CPU element-wise ops (C++) against their torch twins: RMSNorm with and without the
residual add, in-place rotary on fused qkv rows, SwiGLU, the table-lookup GELU; plus the dispatch
rules (in-place residual, autograd and float16 falling back to the twins) and LlamaModel's
``out_rows`` trim."""
from __future__ import annotations

import pytest
import torch

from stllm_engine.ops import elementwise as ew
from stllm_engine.model.llama import rotary_cos_sin

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 7, 33, 593]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # fp32: a few ulp (summation order, FMA contraction, exp_approx); bf16: a float-ulp difference
    # before a rounding can flip it, and RMSNorm rounds twice (h, then weight * h): <= 2 bf16 ulp
    rtol, atol = (2e-6, 1e-6) if dtype == torch.float32 else (2 ** -6, 1e-3)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [64, 88, 1000])
def test_rms_norm_and_fused_add(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = (3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    _close(ew.rms_norm(x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6), dtype)
    want_res = res + x
    want = ew.rms_norm_ref(want_res, w, 1e-5)
    res_in = res.clone()
    out, new_res = ew.add_rms_norm(x, res_in, w, 1e-5)
    assert new_res.data_ptr() == res_in.data_ptr(), "CPU path updates the residual in place"
    assert torch.equal(new_res, want_res)  # one rounding, as torch's add
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 88), (5, 40), (3, 17), (593, 1024), (4112, 256), (3, 33, 768),
                                   (2, 1408)])
def test_layer_norm_matches_torch(dtype, shape, monkeypatch):
    """The C++ LayerNorm (forced for every size) against torch's on float32 copies (the
    definition: one rounding at the end) and torch's own op in the dtype; an offset mean checks
    the two-pass variance; widths off the 16/32-lane steps check the vector tails."""
    monkeypatch.setattr(ew, "CPP_LAYER_NORM_MIN", 0)
    g = torch.Generator().manual_seed(shape[-1])
    x = (40 + 3 * torch.randn(*shape, generator=g)).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    got = ew.layer_norm(x, w, b, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    want = torch.nn.functional.layer_norm(x.float(), shape[-1:], w.float(), b.float(), 1e-6)
    # float32: the mean of values near 40 carries ~1e-7 relative error from the summation order,
    # which x - mean turns into ~1e-5 of a unit-variance output; bfloat16: a flipped last bit
    tol = dict(rtol=1e-5, atol=3e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **tol)
    torch.testing.assert_close(got.float(), torch.nn.functional.layer_norm(x, shape[-1:], w, b, 1e-6).float(), **tol)


def test_layer_norm_strided_rows_and_fallbacks(monkeypatch):
    monkeypatch.setattr(ew, "CPP_LAYER_NORM_MIN", 0)
    x = torch.randn(9, 2 * 96)[:, :96]  # row stride 192: the kernel reads it in place
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    want = torch.nn.functional.layer_norm(x, (96,), w, b, 1e-5)
    _close(ew.layer_norm(x, w, b, 1e-5), want, torch.float32)
    # float16 (no C++ path) and mixed dtypes (float32 weights, bfloat16 x) go to torch
    h = x.half()
    torch.testing.assert_close(ew.layer_norm(h, w.half(), b.half(), 1e-5).float(), want, rtol=1e-2, atol=1e-2)
    xb = x.bfloat16()
    up = ew.layer_norm(xb, w, b, 1e-5, upcast=True)
    assert up.dtype == torch.bfloat16
    _close(up, torch.nn.functional.layer_norm(xb.float(), (96,), w, b, 1e-5).bfloat16(), torch.bfloat16)
    # autograd goes to torch and keeps the graph
    xg = x.clone().requires_grad_()
    ew.layer_norm(xg, w, b, 1e-5).sum().backward()
    assert xg.grad is not None


def test_rms_norm_strided_rows():
    x = torch.randn(9, 2 * 96)[:, :96]  # row stride 192
    w = torch.rand(96) + 0.5
    _close(ew.rms_norm(x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("head_dim,q_heads,kv_heads", [(64, 4, 4), (88, 2, 1), (128, 4, 2), (16, 3, 1)])
def test_rotary_in_place_on_qkv(dtype, rows, head_dim, q_heads, kv_heads):
    g = torch.Generator().manual_seed(rows + head_dim)
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(rows, width, generator=g).to(dtype)
    positions = torch.randint(0, 4000, (rows,), generator=g)
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    heads = q_heads + kv_heads
    want = qkv.clone()
    want[:, :heads * head_dim] = ew.rotate_ref(qkv[:, :heads * head_dim].reshape(rows, heads, head_dim),
                                               cos, sin).reshape(rows, -1)
    got = qkv.clone()
    assert ew.rotary_qk_(got, heads, head_dim, cos, sin) is got
    assert torch.equal(got[:, heads * head_dim:], qkv[:, heads * head_dim:]), "v must be untouched"
    if dtype == torch.bfloat16:  # every product and sum rounded where torch rounds: the same bits
        assert torch.equal(got, want)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [1, 172, 2816])
def test_silu_and_mul(dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    x = (4 * torch.randn(rows, 2 * inter, generator=g)).to(dtype)
    x[0, 0] = -100.0  # exp overflow side: silu -> -0
    x[-1, 0] = 100.0
    got, want = ew.silu_and_mul(x), ew.silu_and_mul_ref(x)
    _close(got, want, dtype)
    if dtype == torch.bfloat16:  # exp within ~2 float ulp, then two bf16 roundings: rarely a bf16 ulp
        assert (got != want).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [6, 16, 37])  # the 16-wide vector path, its tail, both
def test_silu_and_mul_specials(dtype, inter):
    """Infinities and NaN as torch gives them (silu(-inf) = NaN, silu(inf) = inf), on the vector
    path and its scalar tail."""
    specials = [-float("inf"), float("inf"), float("nan"), -100.0, 100.0, 0.5]
    gate = torch.tensor((specials * 7)[:inter])
    x = torch.cat([gate, torch.linspace(-3, 3, inter)]).view(1, -1).to(dtype)
    got, want = ew.silu_and_mul(x), ew.silu_and_mul_ref(x)
    assert torch.equal(got.isnan(), want.isnan())
    _close(got.nan_to_num(), want.nan_to_num(), dtype)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns, except that a NaN may be any NaN (torch's own scalar and vector GELU
    paths give NaNs of different signs)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("shape", [(1,), (15,), (16,), (17,), (4112, 1117), (33, 88), (0, 5)])
def test_gelu_table_is_torch_bit_for_bit(shape):
    """bfloat16 GELU through the lookup table: torch's ``F.gelu`` bit for bit (+-inf, -0 and
    subnormals included; NaN stays NaN), in place; lengths around the 16-wide gather and its
    scalar tail."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (4 * torch.randn(shape, generator=g)).bfloat16()
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -1e-40, 12.0, -12.0])
    flat = x.view(-1)
    flat[: min(flat.numel(), len(specials))] = specials[: flat.numel()].bfloat16()
    want = torch.nn.functional.gelu(x)
    got = x.clone()
    assert ew.gelu_(got) is got  # in place
    _same_bits(got, want)


def test_gelu_every_bfloat16_value():
    """All 65536 bit patterns, in a scrambled order (so the gather reads all over the table)."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    perm = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(0))
    x = every[perm].view(torch.bfloat16)
    _same_bits(ew.gelu_(x.clone()), torch.nn.functional.gelu(x))


def test_gelu_falls_back_out_of_place():
    """float32/float16, non-contiguous and autograd inputs: ``F.gelu`` (a new tensor)."""
    for x in (torch.randn(4, 6), torch.randn(4, 6).half(), torch.randn(6, 4).bfloat16().t()):
        got = ew.gelu_(x)
        assert got.data_ptr() != x.data_ptr()
        assert torch.equal(got, torch.nn.functional.gelu(x))
    x = torch.randn(3, 5, requires_grad=True)
    ew.gelu_(x.bfloat16()).float().sum().backward()
    assert x.grad is not None


def test_fallbacks_autograd_and_float16():
    x = torch.randn(5, 32, requires_grad=True)
    w = torch.ones(32)
    ew.rms_norm(x, w, 1e-6).sum().backward()  # the twin runs under autograd
    assert x.grad is not None and torch.isfinite(x.grad).all()
    h = torch.randn(5, 64).half()
    torch.testing.assert_close(ew.silu_and_mul(h), ew.silu_and_mul_ref(h))
    res = torch.randn(5, 64).half()
    out, new_res = ew.add_rms_norm(h, res.clone(), torch.ones(64).half(), 1e-6)
    torch.testing.assert_close(new_res, res + h)


def test_cpp_rejects_bad_shapes():
    from stllm_engine._C import lookup16_, rms_norm, rotary_embedding_, silu_and_mul

    with pytest.raises(RuntimeError, match="weight has 3 entries"):
        rms_norm(torch.randn(2, 4), torch.ones(3), torch.empty(2, 4), 1e-6)
    with pytest.raises(RuntimeError, match="exceeds the row width"):
        rotary_embedding_(torch.randn(2, 8), 3, 4, torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="even width"):
        silu_and_mul(torch.randn(2, 5), torch.empty(2, 2))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        silu_and_mul(torch.randn(2, 4).half(), torch.empty(2, 2).half())
    table = ew.gelu_table(torch.bfloat16)
    with pytest.raises(RuntimeError, match="16-bit dtype"):
        lookup16_(torch.randn(4), table)
    with pytest.raises(RuntimeError, match="65536 \\+ 1 entries"):
        lookup16_(torch.randn(4).bfloat16(), table[:-1])
    with pytest.raises(RuntimeError, match="65536 \\+ 1 entries"):
        lookup16_(torch.randn(4).half(), table)
    with pytest.raises(RuntimeError, match="contiguous"):
        lookup16_(torch.randn(4, 4).bfloat16().t(), table)
