"""CPU performance paths of the engine's model: oneDNN-packed linears and the thread policy.

PackedLinear must compute what ``F.linear`` computes (fp32 within GEMM rounding, bf16 within one
bf16 step), over edge shapes; ``pack_linears`` must swap exactly the LLM projections + LM head and
leave the model's logits unchanged; the thread policy must parse its setting, reject bad ones and
restore torch's thread count.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.engine.sequence import Sequence
from stllm_engine.model import STLLMModel
from stllm_engine.model.packed_linear import PackedLinear, pack_linears, packing_available
from stllm_engine.model.threads import ThreadPolicy, cpu_threads
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

needs_onednn = pytest.mark.skipif(not packing_available(torch.zeros(1)),
                                  reason="oneDNN linear packing is not available in this torch build")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2)}  # (atol, rtol)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 64, 96), (3, 88, 40), (17, 1024, 257), (32, 33, 1), (130, 33, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(dtype, rows, k, n, bias):
    torch.manual_seed(rows * 7 + k)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    packed = PackedLinear(lin)
    assert packed.weight is lin.weight and packed.bias is lin.bias  # shared, not copied
    x = torch.randn(rows, k, dtype=dtype)
    with torch.no_grad():
        want, got = F.linear(x, lin.weight, lin.bias), packed(x)
    assert got.shape == (rows, n) and got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol * k ** 0.5, rtol=rtol)


@needs_onednn
def test_packed_linear_leading_dims_non_contiguous_and_fallbacks():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    packed = PackedLinear(lin)
    x = torch.randn(5, 24, 3).transpose(1, 2)  # [5, 3, 24] non-contiguous
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    # autograd: falls back to F.linear, gradients reach the shared weight
    xg = torch.randn(4, 24, requires_grad=True)
    packed(xg).sum().backward()
    assert lin.weight.grad is not None and xg.grad is not None
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(4, -1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("perf") / "ckpt", vit="eva",
                                   video_input="all", seed=3, llm_vocab_size=400)
    return load_checkpoint(folder, progress=False)


def _logits(model, steps: int = 3) -> list[torch.Tensor]:
    """Prefill of video embeddings + ids, then greedy decode steps through a ModelRunner."""
    runner = ModelRunner(model)
    torch.manual_seed(1)
    seq = Sequence(list(range(5, 12)), SamplingParams(temperature=0.0),
                   video_embeds=torch.randn(9, model.config.llm.hidden_size).to(model.dtype), video_key="v")
    nb = -(-(seq.num_tokens + steps) // model.block_size)
    seq.block_table = list(range(nb))
    out = []
    n = seq.num_tokens
    for _ in range(steps + 1):
        logits = runner.run([(seq, n)])
        out.append(logits[0])
        seq.num_computed_tokens += n
        seq.append_token(int(logits[0].argmax()))
        n = 1
    return out


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linears_keeps_logits(ckpt, dtype, monkeypatch):
    monkeypatch.setenv("STLLM_CPU_PACKED", "0")
    plain = STLLMModel.from_checkpoint(ckpt, "cpu", dtype)
    plain.allocate_kv_cache(8, 4)
    assert pack_linears(plain) == 0  # disabled by the environment
    want = _logits(plain)
    monkeypatch.setenv("STLLM_CPU_PACKED", "1")
    model = STLLMModel.from_checkpoint(ckpt, "cpu", dtype)
    model.allocate_kv_cache(8, 4)
    runner = ModelRunner(model)  # packs
    layers = model.config.llm.num_layers
    assert runner.num_packed == 4 * layers + 1
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.llm.layers[0].mlp.down_proj, PackedLinear)
    assert pack_linears(model) == 0  # idempotent
    assert model.dtype == dtype
    got = _logits(model)
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        assert (g - w).abs().max().item() <= atol * max(scale, 1.0)


@pytest.mark.parametrize("value,decode,prefill,busy_only", [
    ("", None, None, False), ("auto", 1, 1, True), ("torch", None, None, False), ("1", 1, 1, False),
    ("3", 3, 3, False), ("1,2", 1, 2, False), (" 2 , 4 ", 2, 4, False)])
def test_thread_policy_parse(value, decode, prefill, busy_only):
    p = ThreadPolicy.from_env(value)
    assert (p.decode, p.prefill, p.only_when_busy) == (decode, prefill, busy_only)
    if not busy_only:
        assert p.threads(decode=True) == decode and p.threads(decode=False) == prefill


@pytest.mark.parametrize("loads,want", [
    ([5.0], [True]), ([0.3], [False]),
    ([5.0, 2.2, 1.2], [True, True, False]),   # hysteresis: stays busy until below cores - 0.5
    ([0.5, 2.2, 2.6], [False, False, True])])  # and idle until above cores + 0.5
def test_auto_policy_follows_load_with_hysteresis(monkeypatch, loads, want):
    from stllm_engine.model import threads

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_BUSY", {"state": False, "checked": -1e9})
    clock = [0.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    policy = ThreadPolicy()
    for load, busy in zip(loads, want):
        clock[0] += 10.0
        monkeypatch.setattr(threads.os, "getloadavg", lambda load=load: (load, load, load))
        assert threads.machine_busy() is busy
        assert policy.threads(decode=True) == (1 if busy else None)
        assert ThreadPolicy(2, 3, only_when_busy=False).threads(decode=False) == 3  # fixed: always
    # re-read at most once a second
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (99.0, 99.0, 99.0) if want[-1] is False else (0.0,) * 3)
    clock[0] += 0.5
    assert threads.machine_busy() is want[-1]
    clock[0] += 1.0
    assert threads.machine_busy() is (not want[-1])


@pytest.mark.parametrize("value", ["0", "-1", "a", "1,2,3", "1,x", ","])
def test_thread_policy_rejects(value):
    with pytest.raises(ValueError, match="STLLM_CPU_THREADS"):
        ThreadPolicy.from_env(value)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_thread_policy_checks_fields(bad):
    with pytest.raises(ValueError, match="ThreadPolicy.decode"):
        ThreadPolicy(decode=bad)


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cpu_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with cpu_threads(target):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    with cpu_threads(target, "meta"):  # not a CPU device: unchanged
        assert torch.get_num_threads() == before


def _cache(ctx, Hk, d, bs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-c // bs) for c in ctx]
    total = sum(nblk) + 3
    k_cache = torch.randn(total, bs, Hk, d, generator=g).to(dtype)
    v_cache = torch.randn(total, bs, Hk, d, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g).tolist()
    width = max(nblk)
    table, i = [], 0
    for n in nblk:
        table.append(perm[i:i + n] + [0] * (width - n))
        i += n
    return k_cache, v_cache, torch.tensor(table, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hk,d", [(4, 4, 64), (8, 2, 88)])
@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("ctx,qlens", [
    ([200, 1, 97, 70, 133], [120, 1, 97, 3, 64]),  # history + new turn, decode, full prefill, chunks
    ([150, 97, 40], [120, 97, 40]),                 # long chunks only (40: short for the SDPA path)
    ([30, 9, 70], [1, 9, 3]),                       # decodes and small chunks only
])
def test_paged_prefill_paths_match_twin(dtype, Hq, Hk, d, bs, ctx, qlens, monkeypatch):
    """Per sequence: chunks of >= gather_min_queries(dtype) queries run a flash kernel (bf16 on an
    AMX CPU: the AMX kernel reading the cache blocks; else gathered K/V and SDPA), shorter ones the
    C++ paged kernel, both kinds in one call over permuted block tables; equal to the pure-torch
    twin, and each sequence took its path."""
    from stllm_engine import ops
    from stllm_engine.kernels import reference as twin
    from stllm_engine.ops import _backend, attention

    k_cache, v_cache, table, lens, g = _cache(ctx, Hk, d, bs, dtype, seed=7)
    cu = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), Hq, d, generator=g).to(dtype)
    flash = []  # context lengths of the sequences each flash path ran, by path
    real = attention._paged_prefill_gather
    monkeypatch.setattr(attention, "_paged_prefill_gather",
                        lambda qs, kc, vc, bt, cus, cls, sc: flash.append(("gather", cls.tolist())) or real(qs, kc, vc, bt, cus, cls, sc))
    C = _backend.cpp()
    real_amx = C.flash_attention_amx_paged
    monkeypatch.setattr(C, "flash_attention_amx_paged",
                        lambda qs, kc, vc, bt, cus, cls, sc: flash.append(("amx", cls.tolist())) or real_amx(qs, kc, vc, bt, cus, cls, sc))
    out = ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens, scale=0.2)
    at = attention.gather_min_queries(dtype)
    long = [c for c, n in zip(ctx, qlens) if n >= at]
    path = "amx" if attention.cpu_prefill_attention_kernel(dtype) == "amx" else "gather"
    assert flash == ([(path, long)] if long else [])
    want = twin.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens, scale=0.2)
    assert out.shape == q.shape and out.dtype == dtype
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want.float(), **tol)


def test_paged_prefill_gather_path_errors():
    from stllm_engine import ops

    k_cache, v_cache, table, lens, g = _cache([80], 2, 16, 8, torch.float32, seed=1)
    cu = torch.tensor([0, 80], dtype=torch.int32)
    q = torch.randn(80, 2, 16, generator=g)
    bad = table.clone()
    bad[0, 3] = k_cache.shape[0]
    with pytest.raises(IndexError, match=r"block_tables\[0\]"):
        ops.paged_prefill_attention(q, k_cache, v_cache, bad, cu, lens)
    with pytest.raises(ValueError, match="needs 11 blocks"):
        ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, torch.tensor([88], dtype=torch.int32))
    # bfloat16 on an AMX CPU: the AMX kernel reads the blocks itself and names the same problems
    from stllm_engine.ops.attention import cpu_prefill_attention_kernel
    if cpu_prefill_attention_kernel(torch.bfloat16) == "amx":
        kb, vb, qb = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16), q.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"block_tables\[0\] holds block 13, outside \[0, 13\)"):
            ops.paged_prefill_attention(qb, kb, vb, bad, cu, lens)
        with pytest.raises(RuntimeError, match="needs 11 blocks but block_tables has 10 columns"):
            ops.paged_prefill_attention(qb, kb, vb, table, cu, torch.tensor([88], dtype=torch.int32))


@needs_onednn
@pytest.mark.parametrize("vit", ["eva", "btadapter"])
def test_vision_packing_keeps_features(tmp_path, vit, monkeypatch):
    """pack_vision: every vision linear packed, fc1 + bias + GELU with its GEMM, the blocks'
    residual adds GEMM post-ops. float32: the same features (bit-identical for the ViT blocks when
    every GEMM takes the packed path; ~2e-7 relative otherwise); bfloat16: within bf16 rounding
    (the residual-add post-ops round once where torch rounds twice)."""
    from stllm_engine.model.packed_linear import PackedLinearGELU, PackedPatchEmbed, pack_vision
    from stllm_engine.weights import load_checkpoint

    monkeypatch.setenv("STLLM_CPU_PACKED_PREFILL", "1")
    folder = write_tiny_checkpoint(tmp_path / vit, vit=vit, video_input="all")
    ck = load_checkpoint(folder)
    frames = torch.randn(3, 3, 56, 56)
    for dtype in (torch.float32, torch.bfloat16):
        plain = STLLMModel.from_checkpoint(ck, "cpu", dtype)
        want = plain.encode_vision(frames)
        fused = STLLMModel.from_checkpoint(ck, "cpu", dtype)
        n = pack_vision(fused)
        linears = [m for m in fused.visual_encoder.modules() if isinstance(m, PackedLinear)]
        embed_packed = isinstance(fused.visual_encoder.patch_embed.proj, PackedPatchEmbed)
        assert embed_packed == (dtype == torch.bfloat16)  # float32 keeps the convolution
        assert n == len(linears) + embed_packed and linears
        assert not any(type(m) is nn.Linear for m in fused.visual_encoder.modules())
        assert sum(isinstance(m, PackedLinearGELU) for m in linears) == sum(
            1 for m in fused.visual_encoder.modules() if type(m).__name__ == "EVAMlp")
        assert pack_vision(fused) == 0  # idempotent
        marked = {id(m) for m in linears if m.residual_add}  # calibrated with their residual add
        want_marked = {id(m) for b in fused.visual_encoder.blocks for m in (b.attn.proj, b.mlp.fc2)}
        bt = fused.visual_encoder.btadapter
        if bt is not None:
            want_marked |= {id(m) for t, s in zip(bt.temporal, bt.spatial) for m in (t.temporal_fc, s.mlp.fc2)}
        assert marked == want_marked
        got = fused.encode_vision(frames)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            if vit == "eva":
                assert torch.equal(got, want)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2)
    x = torch.randn(5, fused.config.vision.width, requires_grad=True)
    mlp = next(m for m in fused.visual_encoder.modules() if isinstance(m, PackedLinearGELU))
    mlp(x.bfloat16()).float().sum().backward()  # autograd falls back to torch
    assert x.grad is not None


@needs_onednn
@pytest.mark.parametrize("rows,width,hidden", [(1, 64, 40), (257, 256, 1117), (40, 88, 352)])
def test_fc1_gelu_paths(rows, width, hidden):
    """bfloat16 fc1 + GELU: with ``gelu_table`` the packed GEMM (+ bias) rounded to bfloat16, then
    exactly torch's bfloat16 GELU of it (the lookup table); without, oneDNN's post-op; both within
    bf16 rounding of torch; ``calibrate_gelu`` sets the flag once per shape. float32 keeps the
    post-op within float32 rounding of ``F.gelu(F.linear(...))``."""
    from stllm_engine.model.packed_linear import PackedLinearGELU, calibrate_gelu

    g = torch.Generator().manual_seed(rows + hidden)
    lin = nn.Linear(width, hidden)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(hidden, width, generator=g) * width ** -0.5)
        lin.bias.copy_(torch.randn(hidden, generator=g))
    x = torch.randn(rows, width, generator=g)
    with torch.no_grad():
        mod = PackedLinearGELU(lin.to(torch.bfloat16))
        twin = PackedLinearGELU(lin)
        choice = calibrate_gelu([mod, twin], rows=rows, repeats=1)
        assert list(choice) == [(width, hidden)] and mod.gelu_table == twin.gelu_table == choice[(width, hidden)]
        xb = x.bfloat16()
        want = F.gelu(F.linear(xb, lin.weight, lin.bias)).float()
        for table in (True, False):
            mod.gelu_table = table
            got = mod(xb)
            if table:
                assert torch.equal(got, F.gelu(mod._packed(xb, "none", "")))
            torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2 ** -7)
        mod32 = PackedLinearGELU(nn.Linear(width, hidden).float())
        torch.testing.assert_close(mod32(x), F.gelu(F.linear(x, mod32.weight, mod32.bias)),
                                   rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("video_input", ["all", "mean"])
def test_qformer_packing_keeps_video_tokens(tmp_path, video_input, monkeypatch):
    """pack_qformer: every Q-Former and projector linear packed, each FFN's fc1 + GELU one GEMM,
    the residual adds GEMM post-ops. float32: the same video tokens to float32 rounding; bfloat16:
    within bf16 rounding. Autograd still runs through torch."""
    from stllm_engine.model.packed_linear import PackedLinearGELU, pack_qformer
    from stllm_engine.model.qformer import _FFN
    from stllm_engine.weights import load_checkpoint

    monkeypatch.setenv("STLLM_CPU_PACKED_PREFILL", "1")
    folder = write_tiny_checkpoint(tmp_path / video_input, vit="eva", video_input=video_input)
    ck = load_checkpoint(folder)
    for dtype in (torch.float32, torch.bfloat16):
        plain = STLLMModel.from_checkpoint(ck, "cpu", dtype)
        ids = torch.arange(2, 9) % plain.config.qformer.vocab_size
        embeds = plain.encode_vision(torch.randn(3, 3, 56, 56))
        want = plain.encode_video(embeds, ids)
        fused = STLLMModel.from_checkpoint(ck, "cpu", dtype)
        n = pack_qformer(fused)
        mods = list(fused.qformer.modules()) + list(fused.projector.modules())
        assert n == sum(isinstance(m, PackedLinear) for m in mods) > 0
        assert not any(type(m) is nn.Linear for m in mods)
        assert sum(isinstance(m, PackedLinearGELU) for m in mods) == sum(isinstance(m, _FFN) for m in mods)
        assert pack_qformer(fused) == 0  # idempotent
        marked = [m for m in mods if isinstance(m, PackedLinear) and m.residual_add]
        assert len(marked) == sum(type(m).__name__ in ("_FFN", "_Attention") for m in mods) > 0
        got = fused.encode_video(embeds, ids)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2)
    ffn = next(m for m in fused.qformer.modules() if isinstance(m, _FFN))
    x = torch.randn(4, fused.config.qformer.hidden_size, requires_grad=True)
    ffn(x.bfloat16()).float().sum().backward()  # autograd falls back to torch
    assert x.grad is not None


@needs_onednn
@pytest.mark.parametrize("frames,size,patch,width", [(1, 14, 14, 8), (3, 56, 14, 40), (2, 48, 16, 24),
                                                      (16, 224, 14, 64)])
def test_packed_patch_embed_matches_conv(frames, size, patch, width):
    """bfloat16: the patch GEMM gives the convolution's tokens within one bf16 rounding (both
    accumulate in float32); other dtypes, autograd and sizes that are not a multiple of the patch
    run the convolution itself."""
    from stllm_engine.model.packed_linear import PackedPatchEmbed

    torch.manual_seed(size + width)
    conv = nn.Conv2d(3, width, patch, patch)
    x = torch.randn(frames, 3, size, size)
    with torch.no_grad():
        want = F.conv2d(x.bfloat16().float(), conv.weight.bfloat16().float(), conv.bias.bfloat16().float(),
                        stride=patch).flatten(2).transpose(1, 2)
        bf = PackedPatchEmbed(conv.bfloat16())
        got = bf.tokens(x)
    assert got.dtype == torch.bfloat16 and got.shape == (frames, (size // patch) ** 2, width)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        fp = PackedPatchEmbed(nn.Conv2d(3, width, patch, patch))
        assert torch.equal(fp.tokens(x), F.conv2d(x, fp.weight, fp.bias, stride=patch).flatten(2).transpose(1, 2))
    out = bf.tokens(x[:1])  # grad enabled, weight requires grad: the convolution (autograd works)
    out.float().sum().backward()
    assert bf.weight.grad is not None
    with pytest.raises(ValueError, match="kernel = stride"):
        PackedPatchEmbed(nn.Conv2d(3, 4, 3, 1))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("prefill_packed", [False, True])
def test_linear_add_matches_torch(dtype, rows, prefill_packed):
    from stllm_engine.model.packed_linear import linear_add

    torch.manual_seed(rows)
    lin = nn.Linear(88, 40).to(dtype)
    packed = PackedLinear(lin)
    packed.prefill_packed = prefill_packed
    x, r = torch.randn(rows, 88, dtype=dtype), torch.randn(rows, 40, dtype=dtype)
    with torch.no_grad():
        want = (r.float() + F.linear(x.float(), lin.weight.float(), lin.bias.float()))
        got = linear_add(packed, x, r)
        plain = linear_add(lin, x, r)  # not packed: torch
    assert got.shape == r.shape and got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, atol=atol * 88 ** 0.5, rtol=rtol)
    torch.testing.assert_close(plain, r + lin(x))
    torch.testing.assert_close(linear_add(packed, x[:0], r[:0]), r[:0])  # no rows


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "0", "1"])
def test_calibrate_prefill_modes(monkeypatch, mode):
    """``prefill_packed`` is set per weight shape (auto: timed, the same choice for one shape);
    either path gives F.linear's result above MAX_PACKED_ROWS; a bad setting is rejected."""
    from stllm_engine.model.packed_linear import MAX_PACKED_ROWS, calibrate_prefill

    monkeypatch.setenv("STLLM_CPU_PACKED_PREFILL", mode)
    torch.manual_seed(0)
    lins = [PackedLinear(nn.Linear(k, n)) for k, n in ((64, 96), (64, 96), (96, 64), (96, 64))]
    lins[3].residual_add = True  # timed with its residual add (packed post-op vs F.linear + add)
    choice = calibrate_prefill(lins, rows=64, repeats=1)
    assert set(choice) == {(64, 96, torch.float32, False), (96, 64, torch.float32, False),
                           (96, 64, torch.float32, True)}
    assert lins[0].prefill_packed == lins[1].prefill_packed == choice[(64, 96, torch.float32, False)]
    assert lins[3].prefill_packed == choice[(96, 64, torch.float32, True)]
    if mode != "auto":
        assert all(lin.prefill_packed == (mode == "1") for lin in lins)
    x = torch.randn(MAX_PACKED_ROWS + 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(lins[0](x), F.linear(x, lins[0].weight, lins[0].bias), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("STLLM_CPU_PACKED_PREFILL", "sometimes")
    with pytest.raises(ValueError, match="STLLM_CPU_PACKED_PREFILL"):
        calibrate_prefill(lins)


@needs_onednn
def test_fixed_calibration_times_nothing_and_takes_fixed_paths(tmp_path, monkeypatch):
    """Edge audit: bfloat16 greedy answers changed between processes at near-ties, because the
    kernel paths (which round differently) are chosen by timing at load. STLLM_CPU_CALIBRATION=fixed
    times nothing: F.linear for prefills and residual adds, the GELU table, the unfused SwiGLU."""
    from stllm_engine import STLLM
    from stllm_engine.model import fused_swiglu, packed_linear

    def timed(*a, **k):
        raise AssertionError("a kernel path was timed")

    monkeypatch.setenv("STLLM_CPU_CALIBRATION", "fixed")
    monkeypatch.setattr(packed_linear, "interleaved_medians", timed)
    monkeypatch.setattr(fused_swiglu, "interleaved_medians", timed)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", vit="eva", video_input="all", seed=3)
    model = STLLM.from_pretrained(folder, dtype="bfloat16", warmup=False).engine.model
    mods = list(model.modules())
    packed = [m for m in mods if isinstance(m, PackedLinear) and m.weight is not None]
    assert packed and not any(m.prefill_packed for m in packed)
    gelus = [m for m in mods if isinstance(m, packed_linear.PackedLinearGELU)]
    assert gelus and all(m.gelu_table for m in gelus)
    assert all(getattr(m, "swiglu_packed", None) is None for m in mods)
    monkeypatch.setenv("STLLM_CPU_CALIBRATION", "sometimes")
    with pytest.raises(ValueError, match="STLLM_CPU_CALIBRATION must be timed or fixed"):
        packed_linear.calibration_fixed()


def test_llm_calibration_rows_follow_the_video_input():
    """The LLM's GEMM paths are timed at its typical prefill: the default frame count's video
    tokens + a chat prompt, padded to the 32-row bucket."""
    from stllm_engine.config import STLLMConfig
    from stllm_engine.model.packed_linear import PROMPT_ROWS, llm_prefill_rows

    assert llm_prefill_rows(STLLMConfig(video_input="all", num_frames=16)) == 608 == 512 + PROMPT_ROWS
    assert llm_prefill_rows(STLLMConfig(video_input="mean", num_frames=16)) == 128
    assert llm_prefill_rows(STLLMConfig(video_input="residual", num_frames=64, residual_size=16)) == 608
    assert llm_prefill_rows(STLLMConfig(video_input="all", num_frames=3)) == 192  # 96 + 96


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [32, 33, 40, 64, 65, 97])
def test_prefill_row_bucketing_matches_unpadded(ckpt, dtype, n, monkeypatch):
    """CPU prefill passes pad their rows to a multiple of ROW_BUCKET: same hidden states, same
    last-row states through ``out_rows``, and the same KV cache (padding rows write nothing)."""
    from stllm_engine.model import llama
    from stllm_engine.model.context import AttentionContext, reset_context, set_context

    model = STLLMModel.from_checkpoint(ckpt, "cpu", dtype)
    model.allocate_kv_cache(64, 4)
    torch.manual_seed(n)
    x = torch.randn(n, model.config.llm.hidden_size).to(dtype)
    cu = torch.tensor([0, n], dtype=torch.int32)
    slots = torch.arange(n) + 4  # leave block 0 untouched

    def run(bucket: int, out_rows=None):
        monkeypatch.setattr(llama, "ROW_BUCKET", bucket)
        model.kv_cache.zero_()
        set_context(AttentionContext(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n,
                                     max_seqlen_k=n, slot_mapping=slots,
                                     context_lens=torch.tensor([n], dtype=torch.int32)))
        try:
            with torch.no_grad():
                return model(x, torch.arange(n), out_rows=out_rows), model.kv_cache.clone()
        finally:
            reset_context()

    assert llama.bucketed_rows(n, torch.device("cpu")) == (n if n <= 32 else -(-n // 32) * 32)
    want, want_kv = run(1)
    got, got_kv = run(32)
    assert got.shape == want.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got_kv.float(), want_kv.float(), **tol)
    assert got_kv[:, :, 0].abs().sum() == 0  # nothing written outside the real rows' slots
    rows = torch.tensor([n - 1, 0])
    last, _ = run(32, rows)
    torch.testing.assert_close(last.float(), want[rows].float(), **tol)
