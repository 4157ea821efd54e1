"""Triton paged KV-cache write, split-K paged decode and paged prefill vs their torch twins.

Caches are filled with random data everywhere and block tables are random permutations, so a kernel
that reads an unowned slot or a position past the context gives a wrong answer.
"""
import pytest
import torch

from attention_checks import DTYPES, assert_fa_close, gen, randn
from stllm_engine.kernels import reference as ref
from stllm_engine.kernels.flash_attention import varlen_attention
from stllm_engine.kernels.paged_attention import (
    choose_num_splits, paged_decode_attention, paged_prefill_attention, write_kv_cache)

HEADS = [(4, 1, 16), (4, 2, 88), (2, 2, 64), (2, 2, 128)]      # Hq, Hk, d


def paged(ctx_lens, Hk, d, block_size, dtype, seed=0, spare=3):
    """Random caches + a randomly permuted block table (unused entries -1) for ctx_lens."""
    need = [max(1, -(-c // block_size)) for c in ctx_lens]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen(seed)).to(torch.int32)
    table = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    k_cache = randn(num_blocks, block_size, Hk, d, dtype=dtype, seed=seed + 1)
    v_cache = randn(num_blocks, block_size, Hk, d, dtype=dtype, seed=seed + 2)
    return k_cache, v_cache, table, torch.tensor(ctx_lens, dtype=torch.int32)


def slots_for(table, block_size, positions):
    """slot ids of (sequence, position) pairs."""
    return torch.tensor([int(table[b, p // block_size]) * block_size + p % block_size
                         for b, p in positions], dtype=torch.int64)


# ---------------------------------------------------------------- write_kv_cache
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("Hk,d", [(1, 16), (2, 88), (3, 5)])
def test_write_kv_cache_matches_reference(dtype, block_size, Hk, d):
    ctx = [3, 21, 16]
    k_cache, v_cache, table, _ = paged(ctx, Hk, d, block_size, dtype, seed=40)
    positions = [(b, p) for b, c in enumerate(ctx) for p in range(c)]
    slots = slots_for(table, block_size, positions)
    slots[::5] = -1                                             # skipped tokens
    kv = randn(len(positions), 2 * Hk, d, dtype=dtype, seed=41)
    k, v = kv[:, :Hk], kv[:, Hk:]                               # strided views
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots)
    ref.write_kv_cache(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, Hk, d)[written], k[slots >= 0])


def test_write_kv_cache_skips_slots_past_the_pool():
    """A slot >= num_blocks * block_size is skipped on the device instead of writing out of bounds."""
    num_blocks, block_size, Hk, d = 3, 4, 2, 16
    k_cache = torch.zeros(num_blocks, block_size, Hk, d)
    v_cache = torch.zeros_like(k_cache)
    k = randn(3, Hk, d, dtype=torch.float32, seed=7)
    v = randn(3, Hk, d, dtype=torch.float32, seed=8)
    slots = torch.tensor([5, num_blocks * block_size, num_blocks * block_size + 100])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, Hk, d), v_cache.view(-1, Hk, d)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_v[5], v[0])
    assert int((flat_k != 0).any(-1).any(-1).sum()) == 1  # only slot 5 was written


def test_write_kv_cache_rejects_bad_arguments():
    k_cache, v_cache, table, _ = paged([4], 2, 16, 8, torch.float32)
    k = randn(4, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, k, k_cache, v_cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not match"):
        write_kv_cache(randn(4, 1, 16), randn(4, 1, 16), k_cache, v_cache,
                       torch.zeros(4, dtype=torch.int64))


# ---------------------------------------------------------------- paged decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("Hq,Hk,d", HEADS)
def test_paged_decode_matches_reference(dtype, num_splits, block_size, Hq, Hk, d):
    ctx = [1, 16, 37, 70]
    k_cache, v_cache, table, lens = paged(ctx, Hk, d, block_size, dtype, seed=50)
    q = randn(len(ctx), Hq, d, dtype=dtype, seed=51)
    out = paged_decode_attention(q, k_cache, v_cache, table, lens, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    ref32 = ref.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens)
    same = ref.paged_decode_attention(q, k_cache, v_cache, table, lens, upcast=False)
    assert_fa_close(out, ref32, same)


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_paged_decode_long_context_and_scale(num_splits):
    k_cache, v_cache, table, lens = paged([300, 45], 2, 16, 16, torch.float32, seed=52)
    q = randn(2, 4, 16, seed=53)
    out = paged_decode_attention(q, k_cache, v_cache, table, lens, scale=0.2, num_splits=num_splits)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, table, lens, scale=0.2)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_paged_decode_empty_context_gives_zeros():
    k_cache, v_cache, table, _ = paged([5, 9], 1, 16, 8, torch.float32, seed=54)
    lens = torch.tensor([0, 9], dtype=torch.int32)
    q = randn(2, 2, 16, seed=55)
    for splits in (1, 2):
        out = paged_decode_attention(q, k_cache, v_cache, table, lens, num_splits=splits)
        assert torch.all(out[0] == 0)
        assert torch.allclose(out[1], ref.paged_decode_attention(q, k_cache, v_cache, table, lens)[1],
                              atol=1e-5)


def test_num_splits_grow_with_context():
    assert choose_num_splits(1, 1, 16, 16, torch.device("cpu")) == 1
    assert choose_num_splits(1, 1, 300, 16, torch.device("cpu")) > 1


# ---------------------------------------------------------------- paged prefill
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("Hq,Hk,d", HEADS)
def test_paged_prefill_matches_reference(dtype, block_size, Hq, Hk, d):
    # (new query tokens, context length): single token, chunk after a prefix, full prefill
    pairs = [(1, 1), (10, 37), (33, 33), (5, 70), (3, 17)]
    k_cache, v_cache, table, lens = paged([c for _, c in pairs], Hk, d, block_size, dtype, seed=60)
    cu_q = torch.tensor([0] + [n for n, _ in pairs]).cumsum(0).to(torch.int32)
    q = randn(int(cu_q[-1]), Hq, d, dtype=dtype, seed=61)
    out = paged_prefill_attention(q, k_cache, v_cache, table, cu_q, lens)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    ref32 = ref.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), table, cu_q, lens)
    same = ref.paged_prefill_attention(q, k_cache, v_cache, table, cu_q, lens, upcast=False)
    assert_fa_close(out, ref32, same)


def test_paged_kernels_agree_with_varlen_attention_after_write():
    """Write K/V through the kernel, then prefill (full and chunked) and decode over the cache
    must equal varlen flash attention on the unpaged tensors."""
    lens, Hq, Hk, d, bs = [23, 9], 4, 2, 16, 8
    k_cache, v_cache, table, ctx = paged(lens, Hk, d, bs, torch.float32, seed=70)
    positions = [(b, p) for b, c in enumerate(lens) for p in range(c)]
    k, v, q = randn(32, Hk, d, seed=71), randn(32, Hk, d, seed=72), randn(32, Hq, d, seed=73)
    write_kv_cache(k, v, k_cache, v_cache, slots_for(table, bs, positions))
    cu = torch.tensor([0, 23, 32], dtype=torch.int32)
    full = varlen_attention(q, k, v, cu, cu, 23, 23, True)
    pre = paged_prefill_attention(q, k_cache, v_cache, table, cu, ctx, max_seqlen_q=23)
    assert torch.allclose(pre, full, atol=2e-5)
    # the last 4 tokens of each sequence as a chunk, and the last one as decode
    last4 = torch.cat([torch.arange(19, 23), torch.arange(28, 32)])
    cu4 = torch.tensor([0, 4, 8], dtype=torch.int32)
    chunk = paged_prefill_attention(q[last4], k_cache, v_cache, table, cu4, ctx)
    assert torch.allclose(chunk, full[last4], atol=2e-5)
    dec = paged_decode_attention(q[[22, 31]], k_cache, v_cache, table, ctx, num_splits=2)
    assert torch.allclose(dec, full[[22, 31]], atol=2e-5)


def test_paged_prefill_of_an_empty_batch_is_empty():
    """B = 0 (cu_seqlens_q [0]) gives an empty output, as the CPU path and the decode kernel do."""
    k_cache, v_cache, _, _ = paged([5], 2, 16, 8, torch.float32)
    out = paged_prefill_attention(randn(0, 4, 16), k_cache, v_cache, torch.zeros(0, 1, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 4, 16)


def test_paged_attention_rejects_bad_arguments():
    k_cache, v_cache, table, lens = paged([5], 2, 16, 8, torch.float32)
    q = randn(1, 4, 16)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k_cache, v_cache, table.long(), lens)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k_cache, v_cache, table, lens.long())
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(randn(1, 3, 16), k_cache, v_cache, table, lens)
    with pytest.raises(ValueError, match="Hk=0"):  # not a ZeroDivisionError
        paged_decode_attention(q, k_cache[:, :, :0], v_cache[:, :, :0], table, lens)
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_prefill_attention(q.half(), k_cache, v_cache, table,
                                torch.tensor([0, 1], dtype=torch.int32), lens)
