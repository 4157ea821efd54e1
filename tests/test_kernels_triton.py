"""Triton row gather/scatter, token packing and varlen flash attention vs their torch twins.

Runs the kernels on CPU through the Triton interpreter (float32/float16; tiny shapes), or compiled
on the GPU with ``STLLM_TEST_TRITON_COMPILED=1`` (bfloat16 too; see ``attention_checks``).
"""
import pytest
import torch

from attention_checks import DTYPES, assert_fa_close, gen, randn
from stllm_engine.kernels import reference as ref
from stllm_engine.kernels.flash_attention import varlen_attention
from stllm_engine.kernels.gather_rows import gather_rows, scatter_rows
from stllm_engine.kernels.packing import pack_by_mask, pack_ragged, unpack


# ---------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64])
@pytest.mark.parametrize("M,D,N", [(1, 1, 1), (37, 5, 20), (64, 130, 64), (9, 88, 0)])
def test_gather_scatter_match_torch(dtype, M, D, N):
    x = (randn(M, D, seed=1) * 10).to(dtype)
    index = torch.randperm(M, generator=gen(2))[:N]
    out = gather_rows(x, index)
    assert out.shape == (N, D) and out.dtype == dtype
    assert torch.equal(out, ref.gather_rows(x, index))
    src = (randn(N, D, seed=3) * 10).to(dtype)
    sc = scatter_rows(src, index, M)
    assert torch.equal(sc, ref.scatter_rows(src, index, M))
    untouched = torch.ones(M, dtype=torch.bool)
    untouched[index] = False
    assert torch.all(sc[untouched] == 0)


def test_gather_non_contiguous_and_repeated_index():
    x = randn(20, 12, seed=4)[:, ::2]                       # row stride 12, column stride 2
    index = torch.tensor([3, 3, 0, 19, 7], dtype=torch.int64)
    assert torch.equal(gather_rows(x, index), x[index])
    assert torch.equal(gather_rows(x, index.int()), x[index])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_autograd_matches_indexing(dtype):
    x = randn(15, 7, dtype=dtype, seed=5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    index = torch.randperm(15, generator=gen(6))[:9]
    g = randn(9, 7, dtype=dtype, seed=7)
    gather_rows(x, index).backward(g)
    x_ref[index].backward(g)
    assert torch.equal(x.grad, x_ref.grad)

    src = randn(9, 7, dtype=dtype, seed=8).requires_grad_()
    src_ref = src.detach().clone().requires_grad_()
    g2 = randn(15, 7, dtype=dtype, seed=9)
    scatter_rows(src, index, 15).backward(g2)
    ref.scatter_rows(src_ref, index, 15).backward(g2)
    assert torch.equal(src.grad, src_ref.grad)
    assert torch.equal(src.grad, g2[index])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_backward_sums_the_rows_of_a_repeated_index(dtype):
    """Row 1 gathered twice gets both gradients (the scatter kernel would keep one), and an
    out-of-range index (gathered as zeros) gives none."""
    x = randn(4, 3, dtype=dtype, seed=10).requires_grad_()
    index = torch.tensor([1, 1, 2, 9, 1], dtype=torch.int64)
    g = randn(5, 3, dtype=dtype, seed=11)
    gather_rows(x, index).backward(g)
    want = torch.zeros(4, 3, dtype=torch.float32)
    for i, r in enumerate(index.tolist()):
        if r < 4:
            want[r] += g[i].float()
    torch.testing.assert_close(x.grad.float(), want, rtol=1e-3, atol=1e-3)


def test_the_compiled_gather_op_backward_sums_repeated_rows():
    """torch.ops.stllm.gather_rows (the op torch.compile traces) has the same backward."""
    import stllm_engine.ops.library  # noqa: F401 - registers torch.ops.stllm

    x = randn(4, 3, seed=12).requires_grad_()
    index = torch.tensor([0, 3, 3, 3], dtype=torch.int64)
    g = randn(4, 3, seed=13)
    torch.ops.stllm.gather_rows(x, index).backward(g)
    assert torch.allclose(x.grad[3], g[1:].sum(0)) and torch.equal(x.grad[0], g[0])
    assert torch.all(x.grad[1:3] == 0)


def test_gather_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        gather_rows(torch.zeros(2, 3, 4), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        gather_rows(torch.zeros(2, 3), torch.zeros(1))
    with pytest.raises(ValueError, match="entries"):
        scatter_rows(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 4)


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D,ratio", [(1, 1, 4, 1.0), (3, 17, 24, 0.5), (4, 33, 88, 0.25), (2, 5, 3, 0.0)])
def test_pack_by_mask_matches_reference_and_round_trips(dtype, B, L, D, ratio):
    x = randn(B, L, D, dtype=dtype, seed=10)
    keep = torch.rand(B, L, generator=gen(11)) < ratio
    if B > 2:
        keep[1] = True                                     # a fully kept row ...
        keep[2] = False                                    # ... and a fully dropped one
    packed, cu, src = pack_by_mask(x, keep)
    packed_r, cu_r, src_r = ref.pack_by_mask(x, keep)
    assert torch.equal(packed, packed_r)
    assert cu.dtype == torch.int32 and torch.equal(cu, cu_r)
    assert src.dtype == torch.int64 and torch.equal(src, src_r)
    assert packed.shape == (int(keep.sum()), D)
    # kept order preserved; position inside the sequence is src % L
    for b in range(B):
        seg = src[cu[b]:cu[b + 1]]
        assert torch.all(seg // L == b)
        assert torch.equal(seg % L, torch.nonzero(keep[b]).reshape(-1))
    back = unpack(packed, src, B, L)
    assert torch.equal(back, x * keep[..., None].to(dtype))


def test_pack_unpack_autograd():
    B, L, D = 3, 11, 6
    x = randn(B, L, D, seed=12).requires_grad_()
    keep = torch.rand(B, L, generator=gen(13)) < 0.6
    packed, cu, src = pack_by_mask(x, keep)
    g = randn(*packed.shape, seed=14)
    packed.backward(g)
    expected = torch.zeros(B * L, D)
    expected[keep.reshape(-1)] = g
    assert torch.equal(x.grad, expected.view(B, L, D))

    p = randn(*packed.shape, seed=15).requires_grad_()
    g2 = randn(B, L, D, seed=16)
    unpack(p, src, B, L).backward(g2)
    assert torch.equal(p.grad, g2[keep])


def test_pack_ragged():
    seqs = [randn(n, 8, seed=20 + n) for n in (5, 1, 12)]
    packed, cu = pack_ragged(seqs)
    packed_r, cu_r = ref.pack_ragged(seqs)
    assert torch.equal(packed, packed_r) and torch.equal(cu, cu_r)
    assert cu.tolist() == [0, 5, 6, 18] and cu.dtype == torch.int32
    with pytest.raises(ValueError, match="sequence 1"):
        pack_ragged([randn(2, 8), randn(2, 7)])
    with pytest.raises(ValueError, match="bool"):
        pack_by_mask(randn(1, 2, 3), torch.ones(1, 2))


# ---------------------------------------------------------------- varlen flash attention
def _cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)


ATTN_CASES = [
    # lens_q, lens_k, Hq, Hk, d
    ([1, 17, 33], None, 2, 2, 16),             # ragged self-attention, length 1, odd lengths
    ([5, 40], None, 4, 2, 64),                 # GQA 4:2
    ([23, 16], None, 4, 1, 88),                # EVA head dim 88, GQA 4:1, exact block multiple
    ([19], None, 2, 2, 128),
    ([3, 20, 1], [40, 10, 7], 4, 2, 16),       # qlen != klen both ways (causal rows with no key)
    ([1], [50], 4, 1, 88),                     # one query over a long context
    ([3, 4], [17, 34], 2, 1, 16),              # diagonal offsets 14 / 30: last key of a tile
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hk,d", ATTN_CASES)
def test_varlen_attention_matches_reference(dtype, causal, lens_q, lens_k, Hq, Hk, d):
    lens_k = lens_k or lens_q
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = randn(sum(lens_q), Hq, d, dtype=dtype, seed=30)
    k = randn(sum(lens_k), Hk, d, dtype=dtype, seed=31)
    v = randn(sum(lens_k), Hk, d, dtype=dtype, seed=32)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal)
    out = varlen_attention(q, k, v, *args)
    assert out.shape == q.shape and out.dtype == dtype
    ref32 = ref.varlen_attention(q.float(), k.float(), v.float(), *args)
    same = ref.varlen_attention(q, k, v, *args, upcast=False)
    assert torch.isfinite(out).all()
    assert_fa_close(out, ref32, same)


def test_varlen_attention_causal_rows_without_keys_are_zero():
    cu_q, cu_k = _cu([6]), _cu([2])
    q, k, v = randn(6, 2, 16, seed=33), randn(2, 2, 16, seed=34), randn(2, 2, 16, seed=35)
    out = varlen_attention(q, k, v, cu_q, cu_k, 6, 2, True)
    assert torch.all(out[:4] == 0)                   # query i sees keys j <= i - 4
    assert torch.allclose(out[5], ref.varlen_attention(q, k, v, cu_q, cu_k, 6, 2, True)[5], atol=1e-5)


def test_varlen_attention_long_sequence_strided_inputs_and_scale():
    n, H, d = 300, 2, 16
    qkv = randn(n, 3 * H, d, seed=36)                # q/k/v as head slices of one projection
    q, k, v = qkv[:, :H], qkv[:, H:2 * H], qkv[:, 2 * H:]
    cu = _cu([n])
    for causal in (False, True):
        out = varlen_attention(q, k, v, cu, cu, n, n, causal, scale=0.3)
        expected = ref.varlen_attention(q, k, v, cu, cu, n, n, causal, scale=0.3)
        assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_varlen_attention_rejects_bad_arguments():
    q, k = randn(4, 3, 16), randn(4, 2, 16)
    cu = _cu([4])
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, k, cu, cu, 4, 4, False)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, q, q, cu.long(), cu, 4, 4, False)
    with pytest.raises(ValueError, match="dtypes differ"):
        varlen_attention(q, q.half(), q.half(), cu, cu, 4, 4, False)
