"""The C++ AMX flash attention (csrc/flash_attention_amx_cpu.cpp) against a float32 oracle, and
its dispatch from ``ops.varlen_attention``.

The oracle is plain softmax attention in float32 over the same bfloat16 inputs; the kernel's error
must stay within torch's own bfloat16 SDPA error on the same inputs (plus a margin of one bf16
rounding), so it is as accurate as the path it replaces.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stllm_engine import ops
from stllm_engine.ops import _backend

C = _backend.cpp()
AMX = bool(C.amx_attention_available())
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16 tiles")


def cu(lengths: list[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def oracle(q, k, v, lq, lk, causal, scale, dtype=torch.float32):
    """Per sequence softmax(q k^T * scale) v in ``dtype``; bottom-right causal; rows with no visible
    key are zero."""
    Hq, Hk = q.shape[1], k.shape[1]
    outs, cq, ck = [], 0, 0
    for nq, nk in zip(lq, lk):
        qb = q[cq:cq + nq].to(dtype).transpose(0, 1)
        kb = k[ck:ck + nk].to(dtype).transpose(0, 1).repeat_interleave(Hq // Hk, 0)
        vb = v[ck:ck + nk].to(dtype).transpose(0, 1).repeat_interleave(Hq // Hk, 0)
        s = (qb @ kb.transpose(1, 2)).float() * scale
        if causal:
            seen = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
            s = s.masked_fill(~seen, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append((p.to(dtype) @ vb).float().transpose(0, 1))
        cq, ck = cq + nq, ck + nk
    return torch.cat(outs, 0)


def sdpa_bf16(q, k, v, lq, lk, causal, scale):
    """torch's bfloat16 SDPA per sequence (the path the kernel replaces), for its error level."""
    Hq, Hk = q.shape[1], k.shape[1]
    outs, cq, ck = [], 0, 0
    for nq, nk in zip(lq, lk):
        qb = q[cq:cq + nq].transpose(0, 1)[None]
        kb = k[ck:ck + nk].transpose(0, 1).repeat_interleave(Hq // Hk, 0)[None]
        vb = v[ck:ck + nk].transpose(0, 1).repeat_interleave(Hq // Hk, 0)[None]
        if nq and (nk == 0 or (causal and nk < nq)):  # rows SDPA cannot take: the bf16 oracle
            ref = oracle(q[cq:cq + nq], k[ck:ck + nk], v[ck:ck + nk], [nq], [nk], causal, scale,
                         torch.bfloat16)
            outs.append(ref)
        elif nq:
            mask = None
            if causal:
                mask = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
            outs.append(o[0].transpose(0, 1).float())
        cq, ck = cq + nq, ck + nk
    return torch.cat(outs, 0)


def make(lq, lk, Hq, Hk, d, fused=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused:  # views of one [N, Hq + 2 Hk, d] tensor, as the model's fused qkv projection
        assert lq == lk
        qkv = torch.randn(sum(lq), Hq + 2 * Hk, d, generator=g).to(torch.bfloat16)
        return qkv[:, :Hq], qkv[:, Hq:Hq + Hk], qkv[:, Hq + Hk:]
    q = torch.randn(sum(lq), Hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(sum(lk), Hk, d, generator=g).to(torch.bfloat16)
    v = torch.randn(sum(lk), Hk, d, generator=g).to(torch.bfloat16)
    return q, k, v


CASES = [
    # (query lengths, key lengths, Hq, Hk, head dim, causal)
    ([257] * 3, [257] * 3, 4, 4, 64, False),      # ViT frames
    ([593], [593], 16, 16, 64, True),             # an LLM prompt
    ([1], [1], 2, 2, 64, True),                   # length 1
    ([1], [1], 2, 2, 64, False),
    ([40, 70], [100, 70], 4, 2, 88, True),        # ragged, GQA, a cached prefix, head dim 88
    ([600], [1300], 2, 1, 128, True),             # > 512 keys: several softmax blocks
    ([17], [33], 3, 3, 64, False),
    ([5, 0, 9], [5, 3, 0], 2, 2, 32, False),      # empty sequences, no keys
    ([50], [20], 2, 2, 64, True),                 # more queries than keys: the first 30 see none
    ([33], [33], 1, 1, 256, True),                # the largest head dim
    ([31, 32, 33], [31, 32, 33], 2, 2, 2, True),  # head dim 2, lengths around the 32-row block
    ([1100], [1100], 2, 2, 64, False),            # 3 key blocks, non-causal
    ([700], [700], 2, 1, 64, True),               # causal over two key blocks, GQA (Q held in tiles)
    ([16, 17, 48], [16, 40, 48], 2, 2, 48, True),  # 16 / 17-row blocks around one tile row, D 48 -> 64
    ([49], [257], 3, 3, 40, False),               # a 17-row last block, 257 keys (a 16-key tail)
]


@needs_amx
@pytest.mark.parametrize("lq,lk,Hq,Hk,d,causal", CASES)
def test_amx_matches_oracle(lq, lk, Hq, Hk, d, causal):
    q, k, v = make(lq, lk, Hq, Hk, d)
    scale = 1.0 / math.sqrt(d)
    out = C.flash_attention_amx(q, k, v, cu(lq), cu(lk), causal, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = oracle(q, k, v, lq, lk, causal, scale)
    err = (out.float() - ref).abs().max().item() if ref.numel() else 0.0
    torch_err = (sdpa_bf16(q, k, v, lq, lk, causal, scale) - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= torch_err + 4e-3, (err, torch_err)
    assert err < 2e-2


@needs_amx
@pytest.mark.parametrize("causal", [False, True])
def test_amx_large_scores_and_the_callers_float_mode(causal):
    """Scores spread wide enough that most exp2 terms fall below 2^-126 (the kernel flushes them
    to zero instead of computing denormals) stay as accurate as torch's, and the calling thread's
    MXCSR (flush-to-zero / denormals-are-zero) is as it was afterwards: a denormal still survives."""
    lens = [257, 70]
    q, k, v = make(lens, lens, 4, 4, 64)
    scale = 16.0 / math.sqrt(64)
    out = C.flash_attention_amx(q, k, v, cu(lens), cu(lens), causal, scale)
    ref = oracle(q, k, v, lens, lens, causal, scale)
    torch_err = (sdpa_bf16(q, k, v, lens, lens, causal, scale) - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= torch_err + 4e-3
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0


@needs_amx
def test_amx_rows_without_keys_are_zero():
    lq, lk = [50], [20]
    q, k, v = make(lq, lk, 2, 2, 64)
    out = C.flash_attention_amx(q, k, v, cu(lq), cu(lk), True, 0.125)
    assert torch.equal(out[:30], torch.zeros_like(out[:30]))
    assert out[30:].abs().sum() > 0
    q, k, v = make([5, 0, 9], [5, 3, 0], 2, 2, 32)
    out = C.flash_attention_amx(q, k, v, cu([5, 0, 9]), cu([5, 3, 0]), False, 0.2)
    assert torch.equal(out[5:], torch.zeros_like(out[5:]))


@needs_amx
@pytest.mark.parametrize("causal", [False, True])
def test_amx_strided_views_and_determinism(causal):
    """q/k/v as views of one fused qkv tensor (token stride != heads * d), and the same result on
    every call whatever thread ran which block."""
    lens = [257, 100]
    q, k, v = make(lens, lens, 4, 2, 64, fused=True)
    assert not q.is_contiguous()
    out = C.flash_attention_amx(q, k, v, cu(lens), cu(lens), causal, 0.125)
    again = C.flash_attention_amx(q.contiguous(), k.contiguous(), v.contiguous(), cu(lens), cu(lens), causal, 0.125)
    assert torch.equal(out, again)
    ref = oracle(q, k, v, lens, lens, causal, 0.125)
    assert (out.float() - ref).abs().max().item() < 2e-2


@needs_amx
def test_amx_bad_input_names_the_problem():
    q, k, v = make([8], [8], 4, 2, 64)
    with pytest.raises(RuntimeError, match="BFloat16"):
        C.flash_attention_amx(q.float(), k, v, cu([8]), cu([8]), False, 0.1)
    with pytest.raises(RuntimeError, match="not a multiple"):
        C.flash_attention_amx(q[:, :3], k, v, cu([8]), cu([8]), False, 0.1)
    with pytest.raises(RuntimeError, match="head dim"):
        C.flash_attention_amx(q[..., :63], k[..., :63], v[..., :63], cu([8]), cu([8]), False, 0.1)
    with pytest.raises(RuntimeError, match="row counts"):
        C.flash_attention_amx(q, k, v, cu([7]), cu([8]), False, 0.1)
    with pytest.raises(RuntimeError, match="must not decrease"):
        C.flash_attention_amx(q, k, v, torch.tensor([0, 9, 8], dtype=torch.int32),
                              torch.tensor([0, 4, 8], dtype=torch.int32), False, 0.1)


def test_varlen_dispatch(monkeypatch):
    """bf16 varlen attention runs the AMX kernel where the CPU has it (bit-equal to calling it),
    torch SDPA with STLLM_CPU_ATTENTION=torch; both agree with the oracle."""
    lens = [257, 257]
    q, k, v = make(lens, lens, 4, 4, 64)
    c = cu(lens)
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "torch")
    via_torch = ops.varlen_attention(q, k, v, c, c, 257, 257, causal=False)
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "auto")
    via_auto = ops.varlen_attention(q, k, v, c, c, 257, 257, causal=False)
    if AMX:
        assert torch.equal(via_auto, C.flash_attention_amx(q, k, v, c, c, False, 0.125))
        assert not torch.equal(via_auto, via_torch)  # a different kernel really ran
    else:
        assert torch.equal(via_auto, via_torch)
        with pytest.raises(RuntimeError, match="AMX"):
            C.flash_attention_amx(q, k, v, c, c, False, 0.125)
    ref = oracle(q, k, v, lens, lens, False, 0.125)
    for out in (via_torch, via_auto):
        assert (out.float() - ref).abs().max().item() < 2e-2


def test_varlen_dispatch_keeps_torch_for_autograd_and_other_dtypes(monkeypatch):
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "auto")
    lens = [40]
    q, k, v = make(lens, lens, 2, 2, 64)
    c = cu(lens)
    qg = q.clone().requires_grad_(True)
    out = ops.varlen_attention(qg, k, v, c, c, 40, 40, causal=True)
    out.float().sum().backward()  # the AMX kernel has no derivative: autograd must keep torch's
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    out32 = ops.varlen_attention(q.float(), k.float(), v.float(), c, c, 40, 40, causal=True)
    assert out32.dtype == torch.float32
    assert (out32 - oracle(q, k, v, lens, lens, True, 0.125)).abs().max().item() < 1e-4


def test_cpu_prefill_attention_kernel_names_what_runs(monkeypatch):
    from stllm_engine.ops.attention import cpu_prefill_attention_kernel

    monkeypatch.setenv("STLLM_CPU_ATTENTION", "auto")
    assert cpu_prefill_attention_kernel(torch.bfloat16) == ("amx" if AMX else "torch-sdpa")
    assert cpu_prefill_attention_kernel(torch.float32) == "torch-sdpa"
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "torch")
    assert cpu_prefill_attention_kernel(torch.bfloat16) == "torch-sdpa"


def test_bad_cpu_attention_setting(monkeypatch):
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "fast")
    q, k, v = make([4], [4], 2, 2, 64)
    with pytest.raises(ValueError, match="STLLM_CPU_ATTENTION"):
        ops.varlen_attention(q, k, v, cu([4]), cu([4]), 4, 4, causal=True)


def paged_cache(ctx: list[int], Hk: int, d: int, block_size: int, seed: int = 0):
    """Caches [num_blocks, block_size, Hk, d] holding each sequence's ctx[b] K/V rows in shuffled,
    non-contiguous blocks (spare blocks of noise between them, -1 past each table's used columns),
    the block tables, and the same rows gathered per sequence ([sum(ctx), Hk, d])."""
    g = torch.Generator().manual_seed(seed)
    used = [-(-n // block_size) for n in ctx]
    nblocks = sum(used) + 3
    kc = torch.randn(nblocks, block_size, Hk, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(nblocks, block_size, Hk, d, generator=g).to(torch.bfloat16)
    order = torch.randperm(nblocks, generator=g).tolist()
    table = torch.full((len(ctx), max(used) + 1), -1, dtype=torch.int32)
    rows = []
    for b, n in enumerate(ctx):
        blocks = [order.pop() for _ in range(used[b])]
        table[b, :used[b]] = torch.tensor(blocks, dtype=torch.int32)
        slots = (torch.tensor(blocks)[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        rows.append(slots)
    slots = torch.cat(rows)
    k = kc.reshape(-1, Hk, d)[slots]
    v = vc.reshape(-1, Hk, d)[slots]
    return kc, vc, table, k, v


PAGED_CASES = [
    # (query rows per sequence, context per sequence, Hq, Hk, d, block_size)
    ([16], [16], 2, 2, 64, 16),                      # a whole prompt of one block
    ([1, 17, 40], [1, 60, 700], 4, 2, 64, 16),       # ragged chunks over ragged prefixes, GQA, two key blocks
    ([33, 20], [33, 257], 2, 2, 88, 8),              # head dim 88 (padded to 96), contexts off the block size
    ([50], [20], 2, 2, 64, 16),                      # more queries than keys: the first 30 see none
    ([24, 0, 9], [24, 5, 9], 2, 1, 128, 16),         # a sequence with no queries, head dim 128
]


@needs_amx
@pytest.mark.parametrize("lq,ctx,Hq,Hk,d,block_size", PAGED_CASES)
def test_amx_paged_equals_the_kernel_over_gathered_rows(lq, ctx, Hq, Hk, d, block_size):
    """Packing K/V straight from shuffled cache blocks gives bit-for-bit what the varlen kernel gives
    over the same rows gathered, and both stay within torch's bf16 error of the oracle."""
    kc, vc, table, k, v = paged_cache(ctx, Hk, d, block_size)
    q = torch.randn(sum(lq), Hq, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    cl = torch.tensor(ctx, dtype=torch.int32)
    out = C.flash_attention_amx_paged(q, kc, vc, table, cu(lq), cl, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.equal(out, C.flash_attention_amx(q, k, v, cu(lq), cu(ctx), True, scale))
    ref = oracle(q, k, v, lq, ctx, True, scale)
    torch_err = (sdpa_bf16(q, k, v, lq, ctx, True, scale) - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= torch_err + 4e-3


@needs_amx
def test_amx_paged_bad_input_names_the_problem():
    kc, vc, table, _, _ = paged_cache([20, 40], 2, 64, 16)
    q = torch.randn(24, 4, 64).to(torch.bfloat16)
    cl = torch.tensor([20, 40], dtype=torch.int32)
    cq = cu([8, 16])
    with pytest.raises(RuntimeError, match="outside"):
        bad = table.clone()
        bad[1, 0] = kc.shape[0]
        C.flash_attention_amx_paged(q, kc, vc, bad, cq, cl, 0.125)
    with pytest.raises(RuntimeError, match="needs 5 blocks but block_tables has 4 columns"):
        C.flash_attention_amx_paged(q, kc, vc, table, cq, torch.tensor([20, 70], dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match="BFloat16"):
        C.flash_attention_amx_paged(q, kc.float(), vc.float(), table, cq, cl, 0.125)
    with pytest.raises(RuntimeError, match="end at 24"):
        C.flash_attention_amx_paged(q, kc, vc, table, cu([8, 15]), cl, 0.125)
    with pytest.raises(RuntimeError, match="not a multiple"):
        C.flash_attention_amx_paged(q[:, :3], kc, vc, table, cq, cl, 0.125)


def test_paged_prefill_dispatch(monkeypatch):
    """bf16 chunks of >= 16 queries over a cached prefix: the AMX kernel reads the cache blocks
    directly where the CPU has it (no gathered copy is made), the gather path with
    STLLM_CPU_ATTENTION=torch; both agree with the oracle and with the C++ paged kernel's rows."""
    from stllm_engine.ops import attention

    lq, ctx = [70, 4], [300, 50]  # a long chunk (flash path either way) and a short one (C++ paged kernel)
    kc, vc, table, k, v = paged_cache(ctx, 2, 64, 16)
    q = torch.randn(sum(lq), 4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cl = torch.tensor(ctx, dtype=torch.int32)
    calls = []
    real_gather = attention._paged_prefill_gather
    monkeypatch.setattr(attention, "_paged_prefill_gather", lambda *a: calls.append(1) or real_gather(*a))
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "auto")
    via_auto = ops.paged_prefill_attention(q, kc, vc, table, cu(lq), cl)
    assert calls == ([] if AMX else [1])
    monkeypatch.setenv("STLLM_CPU_ATTENTION", "torch")
    via_torch = ops.paged_prefill_attention(q, kc, vc, table, cu(lq), cl)
    assert len(calls) == (1 if AMX else 2)
    if AMX:
        want = C.flash_attention_amx_paged(q[:70], kc, vc, table[:1], cu([70]), cl[:1], 0.125)
        assert torch.equal(via_auto[:70], want)
    ref = oracle(q, k, v, lq, ctx, True, 0.125)
    for out in (via_auto, via_torch):
        assert (out.float() - ref).abs().max().item() < 2e-2
