"""CPU path of stllm_engine.ops (C++ kernels + torch) against the pure-torch twins."""
import pytest
import torch

from stllm_engine import ops
from stllm_engine.kernels import reference as ref

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
CTX = [1, 15, 16, 17, 100]          # around block boundaries, ragged


def make_cache(ctx_lens, Hk, d, bs, dtype, seed=0, spare_cols=2):
    """Random caches with a randomly permuted block table; unused table entries hold garbage."""
    g = torch.Generator().manual_seed(seed)
    need = [(c + bs - 1) // bs for c in ctx_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, bs, Hk, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hk, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(need) + spare_cols
    table = torch.full((len(ctx_lens), width), -12345, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].int()
        at += n
    return k_cache, v_cache, table, torch.tensor(ctx_lens, dtype=torch.int32), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 88, 128])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("bs", [8, 16])
def test_paged_decode_matches_twin(dtype, d, Hq, Hk, bs):
    k_cache, v_cache, table, lens, g = make_cache(CTX, Hk, d, bs, dtype)
    q = torch.randn(len(CTX), Hq, d, generator=g).to(dtype)
    out = ops.paged_decode_attention(q, k_cache, v_cache, table, lens)
    want = ref.paged_decode_attention(q, k_cache, v_cache, table, lens)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 88, 128])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("bs", [8, 16])
def test_paged_prefill_matches_twin(dtype, d, Hq, Hk, bs):
    qlens = [1, 15, 3, 17, 40]      # full prefill (1, 15, 17) and chunks after a cached prefix
    k_cache, v_cache, table, lens, g = make_cache(CTX, Hk, d, bs, dtype, seed=1)
    cu = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, d, generator=g).to(dtype)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens)
    want = ref.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


def test_paged_float16_and_scale():
    k_cache, v_cache, table, lens, g = make_cache(CTX, 2, 64, 16, torch.float16)
    q = torch.randn(len(CTX), 6, 64, generator=g).half()
    out = ops.paged_decode_attention(q, k_cache, v_cache, table, lens, scale=0.3)
    want = ref.paged_decode_attention(q, k_cache, v_cache, table, lens, scale=0.3)
    torch.testing.assert_close(out.float(), want.float(), **TOL[torch.float16])


def test_paged_edge_cases_give_zeros_like_twin():
    ctx = [0, 5, 3]                             # empty context; more queries than keys
    k_cache, v_cache, table, lens, g = make_cache(ctx, 2, 32, 8, torch.float32)
    q = torch.randn(3, 4, 32, generator=g)
    out = ops.paged_decode_attention(q, k_cache, v_cache, table, lens)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref.paged_decode_attention(q, k_cache, v_cache, table, lens))
    cu = torch.tensor([0, 0, 5, 10], dtype=torch.int32)     # qlen 0, 5 of 5, 5 of 3
    q = torch.randn(10, 4, 32, generator=g)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens)
    torch.testing.assert_close(out, ref.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens))
    assert torch.equal(out[5:7], torch.zeros_like(out[5:7]))


def test_paged_matches_long_single_sequence_and_int64_tables():
    k_cache, v_cache, table, lens, g = make_cache([1000], 1, 88, 16, torch.float32)
    q = torch.randn(1, 3, 88, generator=g)
    out = ops.paged_decode_attention(q, k_cache, v_cache, table.long(), lens.long())
    torch.testing.assert_close(out, ref.paged_decode_attention(q, k_cache, v_cache, table, lens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("prefill", [False, True])
def test_paged_threads_agree(prefill):
    """The multi-threaded path (big enough to split) gives bit-identical results to one thread."""
    ctx = [300, 17, 250, 1, 129, 64]
    k_cache, v_cache, table, lens, g = make_cache(ctx, 4, 64, 16, torch.float32, seed=5)
    if prefill:
        cu = torch.tensor([0] + [min(c, 40) for c in ctx]).cumsum(0).int()
        q = torch.randn(int(cu[-1]), 8, 64, generator=g)
        run = lambda: ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens)  # noqa: E731
        want = ref.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens)
    else:
        q = torch.randn(len(ctx), 8, 64, generator=g)
        run = lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, lens)  # noqa: E731
        want = ref.paged_decode_attention(q, k_cache, v_cache, table, lens)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    torch.testing.assert_close(many, want, **TOL[torch.float32])


def test_cpp_boundary_checks():
    from stllm_engine import _C
    k_cache, v_cache, table, lens, g = make_cache([20, 5], 2, 16, 8, torch.float32)
    q = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="k_cache must be contiguous"):
        _C.paged_decode_attention(q, k_cache.transpose(0, 1), v_cache, table, lens)
    with pytest.raises(RuntimeError, match="block_tables must be Int"):
        _C.paged_decode_attention(q, k_cache, v_cache, table.long(), lens)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _C.paged_decode_attention(q.half(), k_cache, v_cache, table, lens)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), table, lens)
    with pytest.raises(RuntimeError, match="context_lens has 1 entries"):
        _C.paged_decode_attention(q, k_cache, v_cache, table, lens[:1])
    with pytest.raises(RuntimeError, match="share a dtype"):
        _C.write_kv_cache(torch.ones(1, 2, 16).half(), torch.ones(1, 2, 16).half(), k_cache, v_cache,
                          torch.tensor([0]))
    with pytest.raises(RuntimeError, match="slot_mapping must be Long"):
        _C.write_kv_cache(torch.ones(1, 2, 16), torch.ones(1, 2, 16), k_cache, v_cache, torch.tensor([0]).int())


def test_paged_errors_name_the_problem():
    k_cache, v_cache, table, lens, g = make_cache([20, 5], 2, 16, 8, torch.float32)
    q = torch.randn(2, 4, 16)
    bad = table.clone()
    bad[0, 1] = k_cache.shape[0]
    with pytest.raises(IndexError, match=r"block_tables\[0, 1\]"):
        ops.paged_decode_attention(q, k_cache, v_cache, bad, lens)
    with pytest.raises(RuntimeError, match="needs .* blocks"):
        ops.paged_decode_attention(q, k_cache, v_cache, table[:, :2], torch.tensor([40, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        ops.paged_decode_attention(torch.randn(2, 3, 16), k_cache, v_cache, table, lens)
    with pytest.raises(RuntimeError, match="head dim"):
        ops.paged_decode_attention(torch.randn(2, 4, 8), k_cache, v_cache, table, lens)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        ops.paged_prefill_attention(q, k_cache, v_cache, table, torch.tensor([0, 1, 3], dtype=torch.int32), lens)


@pytest.mark.parametrize("name,value", [("block_tables", 2 ** 32 + 1), ("block_tables", -2 ** 32),
                                        ("context_lens", 2 ** 32 + 2), ("cu_seqlens_q", 2 ** 32 + 1)])
def test_int64_tables_past_int32_are_refused_not_wrapped(name, value):
    """An int64 block id of 2**32 + 1 cast to int32 would read block 1 (and a length of 2**32 + 2
    would be 2): refused before the cast."""
    k_cache, v_cache, table, lens, g = make_cache([20, 5], 2, 16, 8, torch.float32)
    args = dict(block_tables=table.long(), context_lens=lens.long(), cu_seqlens_q=torch.tensor([0, 1, 2]))
    args[name] = args[name].clone()
    args[name][-1 if name != "block_tables" else 0] = value
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=f"{name} holds {value}, outside int32"):
        if name == "cu_seqlens_q":
            ops.paged_prefill_attention(q, k_cache, v_cache, args["block_tables"], args["cu_seqlens_q"],
                                        args["context_lens"])
        else:
            ops.paged_decode_attention(q, k_cache, v_cache, args["block_tables"], args["context_lens"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu_q,cu_k", [([0, 5, 3, 6], [0, 2, 4, 6]), ([0, 2, 4, 6], [0, 5, 3, 6]),
                                       ([2, 6], [0, 6]), ([0, 6], [1, 6])])
def test_varlen_attention_refuses_cu_seqlens_that_go_down_or_start_late(dtype, cu_q, cu_k):
    """Before: 8 output rows for 6 queries, or a sequence's rows silently zero, or torch's own
    head-size error; the bf16 (AMX) path already refused these."""
    q, k, v = (torch.randn(6, 2, 16).to(dtype) for _ in range(3))
    with pytest.raises(ValueError, match="must start at 0 and must not decrease"):
        ops.varlen_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                             6, 6, causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hk,d,bs,num_blocks,N", [(1, 64, 8, 6, 37), (2, 88, 16, 6, 37), (4, 128, 16, 6, 37),
                                                   (2, 128, 16, 160, 2048)])   # > 1 MiB: threaded
def test_write_kv_cache_matches_twin(dtype, Hk, d, bs, num_blocks, N):
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(num_blocks, bs, Hk, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hk, d, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:N]
    slots[::5] = -1                                             # skipped
    kv = torch.randn(N, 3 * Hk, d, generator=g).to(dtype)       # k, v: strided views of a fused tensor
    k, v = kv[:, :Hk], kv[:, Hk:2 * Hk]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.write_kv_cache(k, v, want_k, want_v, slots)
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_cache_errors():
    k_cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(IndexError, match="slot_mapping"):
        ops.write_kv_cache(torch.ones(1, 1, 8), torch.ones(1, 1, 8), k_cache, k_cache.clone(),
                           torch.tensor([8]))
    with pytest.raises(RuntimeError, match="Hk, d"):
        ops.write_kv_cache(torch.ones(1, 2, 8), torch.ones(1, 2, 8), k_cache, k_cache.clone(),
                           torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("M,D,N", [(1, 1, 0), (5, 3, 9), (64, 88, 40), (1500, 256, 3000)])
def test_gather_rows_matches_indexing(dtype, M, D, N):
    g = torch.Generator().manual_seed(M + N)
    x = (torch.randn(M, 2 * D, generator=g) * 100).to(dtype)[:, ::2] if D > 1 else torch.ones(M, D, dtype=dtype)
    index = torch.randint(0, M, (N,), generator=g)
    assert torch.equal(ops.gather_rows(x, index), x[index])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_rows_unique_and_repeated(dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(7, 5, generator=g).to(dtype)
    index = torch.randperm(12, generator=g)[:7]
    assert torch.equal(ops.scatter_rows(src, index, 12), ref.scatter_rows(src, index, 12))
    rep = torch.tensor([1, 1, 0, 3, 1, 0, 2])
    want = torch.zeros(4, 5).index_add(0, rep, src.float()).to(dtype)
    torch.testing.assert_close(ops.scatter_rows(src, rep, 4), want, **TOL[dtype])


def test_gather_scatter_errors():
    with pytest.raises(IndexError, match=r"index\[1\] = 5"):
        ops.gather_rows(torch.zeros(5, 2), torch.tensor([0, 5]))
    with pytest.raises(IndexError, match="out of range"):
        ops.scatter_rows(torch.zeros(2, 2), torch.tensor([0, -1]), 3)
    with pytest.raises(ValueError, match="index has 1 entries"):
        ops.scatter_rows(torch.zeros(2, 2), torch.tensor([0]), 3)


def test_gather_scatter_autograd_equals_indexing():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    index = torch.tensor([5, 0, 5, 2, 5])                      # repeats: backward accumulates
    w = torch.randn(5, 4, generator=g)
    (ops.gather_rows(x, index) * w).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (x2[index] * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    src = torch.randn(3, 4, generator=g, requires_grad=True)
    uidx = torch.tensor([4, 0, 2])
    w2 = torch.randn(6, 4, generator=g)
    (ops.scatter_rows(src, uidx, 6) * w2).sum().backward()
    torch.testing.assert_close(src.grad, w2[uidx])


@pytest.mark.parametrize("B,L,D", [(1, 1, 1), (3, 17, 8), (2, 64, 88)])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_pack_unpack_round_trip_and_grads(B, L, D, p):
    g = torch.Generator().manual_seed(B * L)
    x = torch.randn(B, L, D, generator=g, requires_grad=True)
    keep = torch.rand(B, L, generator=g) < p
    packed, cu, src_index = ops.pack_by_mask(x, keep)
    want_packed, want_cu, want_idx = ref.pack_by_mask(x.detach(), keep)
    assert torch.equal(cu, want_cu) and cu.dtype == torch.int32
    assert torch.equal(src_index, want_idx)
    assert torch.equal(packed, x.detach()[keep])
    back = ops.unpack(packed, src_index, B, L)
    assert torch.equal(back, torch.where(keep[..., None], x.detach(), torch.zeros(())))
    w = torch.randn(B, L, D, generator=g)
    (back * w).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    torch.zeros(B, L, D).masked_scatter(keep[..., None].expand(B, L, D), x2[keep]).mul(w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert torch.equal(x.grad, torch.where(keep[..., None], w, torch.zeros(())))


def test_pack_ragged():
    seqs = [torch.randn(n, 6) for n in (3, 0, 5)]
    packed, cu = ops.pack_ragged(seqs)
    assert cu.tolist() == [0, 3, 3, 8] and torch.equal(packed, torch.cat(seqs))
    with pytest.raises(ValueError, match="sequence 1"):
        ops.pack_ragged([torch.randn(2, 6), torch.randn(2, 5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (6, 2)])
@pytest.mark.parametrize("lens_q,lens_k", [([5, 5, 5], [5, 5, 5]), ([1, 7, 16], [1, 7, 16]),
                                           ([2, 3], [9, 3]), ([4, 1], [2, 6]), ([40, 1], [300, 17])])
def test_varlen_attention_matches_twin(dtype, causal, Hq, Hk, lens_q, lens_k):
    g = torch.Generator().manual_seed(7)
    d = 88
    cq = torch.tensor([0] + lens_q).cumsum(0).int()
    ck = torch.tensor([0] + lens_k).cumsum(0).int()
    q = torch.randn(int(cq[-1]), Hq, d, generator=g).to(dtype)
    k = torch.randn(int(ck[-1]), Hk, d, generator=g).to(dtype)
    v = torch.randn(int(ck[-1]), Hk, d, generator=g).to(dtype)
    out = ops.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), causal)
    want = ref.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), causal)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


def test_varlen_attention_is_differentiable():
    q, k, v = (torch.randn(9, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    ops.varlen_attention(q, k, v, cu, cu, 5, 5, True).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen_attention_chunk_after_prefix_grads_match_inference():
    """Queries after a prefix (Lq < Lk, causal): inference merges two flash calls by log-sum-exp,
    autograd takes the masked call; both give the twin's values."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 2, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(20, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    cq, ck = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 20], dtype=torch.int32)
    want = ref.varlen_attention(q.detach(), k.detach(), v.detach(), cq, ck, 6, 20, True)
    with torch.no_grad():
        torch.testing.assert_close(ops.varlen_attention(q, k, v, cq, ck, 6, 20, True), want, atol=1e-5, rtol=1e-5)
    out = ops.varlen_attention(q, k, v, cq, ck, 6, 20, True)
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_ops_trace_under_torch_compile():
    k_cache, v_cache, table, lens, g = make_cache([9, 20], 2, 16, 8, torch.float32)
    q = torch.randn(2, 4, 16, generator=g)
    k_new, slots = torch.randn(2, 2, 16, generator=g), torch.tensor([3, -1])

    def step(q, k_new, k_cache, v_cache):
        ops.write_kv_cache(k_new, k_new, k_cache, v_cache, slots)
        return ops.paged_decode_attention(q, k_cache, v_cache, table, lens)

    kc2, vc2 = k_cache.clone(), v_cache.clone()
    got = torch.compile(step, backend="eager", fullgraph=True)(q, k_new, k_cache, v_cache)
    want = step(q, k_new, kc2, vc2)
    torch.testing.assert_close(got, want)
    assert torch.equal(k_cache, kc2)


_TRITON_SCRIPT = r"""
import torch
from stllm_engine import ops
from stllm_engine.kernels import reference as ref
g = torch.Generator().manual_seed(0)
Hq, Hk, d, bs = 4, 2, 16, 8
k_cache, v_cache = torch.zeros(6, bs, Hk, d), torch.zeros(6, bs, Hk, d)
k, v = torch.randn(20, Hk, d, generator=g), torch.randn(20, Hk, d, generator=g)
table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
pos = [torch.arange(11), torch.arange(9)]                   # token positions of the two sequences
slots = torch.cat([table[i].long()[p // bs] * bs + p % bs for i, p in enumerate(pos)])
ops.write_kv_cache(k, v, k_cache, v_cache, slots)
kc, vc = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
ref.write_kv_cache(k, v, kc, vc, slots)
assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
lens = torch.tensor([11, 9], dtype=torch.int32)
q = torch.randn(2, Hq, d, generator=g)
torch.testing.assert_close(ops.paged_decode_attention(q, k_cache, v_cache, table, lens),
                           ref.paged_decode_attention(q, k_cache, v_cache, table, lens), atol=1e-4, rtol=1e-4)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
q = torch.randn(7, Hq, d, generator=g)
torch.testing.assert_close(ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens),
                           ref.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens), atol=1e-4, rtol=1e-4)
ck = torch.tensor([0, 11, 20], dtype=torch.int32)
q = torch.randn(20, Hq, d, generator=g)
torch.testing.assert_close(ops.varlen_attention(q, k, v, ck, ck, 11, 11, True),
                           ref.varlen_attention(q, k, v, ck, ck, 11, 11, True), atol=1e-4, rtol=1e-4)
x = torch.randn(2, 5, 8, generator=g)
keep = torch.rand(2, 5, generator=g) < 0.6
packed, cu, idx = ops.pack_by_mask(x, keep)
assert torch.equal(packed, x[keep]) and torch.equal(ops.unpack(packed, idx, 2, 5)[keep], x[keep])
print("TRITON-DISPATCH-OK")
"""


def test_triton_dispatch_under_interpreter():
    """The CUDA branch of every op (Triton launchers, run by the interpreter on CPU tensors)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1", STLLM_OPS_BACKEND="triton")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "TRITON-DISPATCH-OK" in res.stdout, res.stderr[-3000:]
