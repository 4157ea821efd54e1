"""The compiled CPU decode step (csrc/llama_decode_cpu.cpp via stllm_engine.model.cpu_decode)
against the Python layer loop it replaces: bit-identical hidden states and KV caches over dtypes,
batch sizes, GQA, head dim 88, ragged contexts and packed/plain weights; when it is planned; errors."""
from __future__ import annotations

import pytest
import torch

from stllm_engine.config import LLMConfig
from stllm_engine.model import cpu_decode
from stllm_engine.model.context import AttentionContext, reset_context, set_context
from stllm_engine.model.llama import LlamaModel
from stllm_engine.model.packed_linear import PackedLinear, packing_available
from stllm_engine.ops._backend import cpp

BS = 4  # block size: contexts below are not multiples of it


def _model(Hq: int, Hk: int, d: int, dtype: torch.dtype, packed: bool, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = LLMConfig(vocab_size=50, hidden_size=Hq * d, intermediate_size=72, num_layers=2, num_heads=Hq,
                    num_kv_heads=Hk, max_position_embeddings=256)
    m = LlamaModel(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:  # norm weights: not all ones
                p.uniform_(0.5, 1.5)
    if packed:
        for layer in m.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                setattr(parent, name, PackedLinear(getattr(parent, name)))
    return m


def _bind_caches(m: LlamaModel, num_blocks: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = m.layers[0].self_attn
    kv = torch.randn(2, len(m.layers), num_blocks, BS, a.num_kv_heads, a.head_dim, generator=g).to(dtype)
    for i, layer in enumerate(m.layers):
        layer.self_attn.k_cache, layer.self_attn.v_cache = kv[0, i], kv[1, i]
    return kv


def _decode_ctx(context_lens: list[int], num_blocks: int, seed: int) -> AttentionContext:
    """One new token a sequence at position context_len - 1, blocks drawn without repeats."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // BS) for n in context_lens)
    tables, slots = [], []
    for n in context_lens:
        blocks = [perm.pop() for _ in range(-(-n // BS))]
        tables.append(blocks + [0] * (width - len(blocks)))
        slots.append(blocks[(n - 1) // BS] * BS + (n - 1) % BS)
    return AttentionContext(is_prefill=False, slot_mapping=torch.tensor(slots),
                            context_lens=torch.tensor(context_lens, dtype=torch.int32),
                            block_tables=torch.tensor(tables, dtype=torch.int32), has_prefix=True)


def _run(m, x, ctx, out_rows=None):
    set_context(ctx)
    try:
        with torch.no_grad():
            return m(x, ctx.context_lens.long() - 1, out_rows)
    finally:
        reset_context()


CONTEXTS = {1: [1], 3: [7, 1, 13], 8: [5, 9, 2, 17, 4, 30, 11, 8]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("Hq,Hk,d", [(4, 4, 16), (4, 2, 88), (6, 1, 32)])
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_decode_is_bit_identical_to_python_loop(dtype, batch, Hq, Hk, d, packed, monkeypatch):
    if packed and not packing_available(torch.empty(1, dtype=dtype)):
        pytest.skip("oneDNN packing not available in this torch build")
    m = _model(Hq, Hk, d, dtype, packed)
    lens = CONTEXTS[batch]
    num_blocks = sum(-(-n // BS) for n in lens) + 3
    ctx = _decode_ctx(lens, num_blocks, seed=batch)
    x = torch.randn(batch, Hq * d, generator=torch.Generator().manual_seed(7)).to(dtype)
    kv = _bind_caches(m, num_blocks, dtype, seed=1)
    before = kv.clone()
    with torch.no_grad():
        assert cpu_decode.plan_for(m, x, ctx, 32) is not None
    got = _run(m, x, ctx)
    got_kv = kv.clone()
    kv.copy_(before)
    monkeypatch.setenv(cpu_decode.ENV, "0")
    with torch.no_grad():
        assert cpu_decode.plan_for(m, x, ctx, 32) is None
    want = _run(m, x, ctx)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == x.shape
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(got_kv, kv)  # the new tokens' K/V written to the same slots, nothing else
    assert not torch.equal(got_kv, before)
    rows = torch.arange(batch).flip(0)
    monkeypatch.setenv(cpu_decode.ENV, "1")
    kv.copy_(before)
    assert torch.equal(_run(m, x, ctx, rows), want[rows])


@torch.no_grad()
def test_plan_only_for_cpu_decode_steps(monkeypatch):
    m = _model(4, 2, 16, torch.float32, packed=False)
    x = torch.randn(3, 64)
    ctx = _decode_ctx([3, 5, 2], 12, seed=0)
    assert cpu_decode.plan_for(m, x, ctx, 32) is None  # no cache bound yet
    _bind_caches(m, 12, torch.float32, seed=0)
    assert cpu_decode.plan_for(m, x, ctx, 32) is not None
    assert cpu_decode.plan_for(m, x, ctx, 2) is None  # more rows than the unpadded decode passes
    assert cpu_decode.plan_for(m, x.half(), ctx, 32) is None
    prefill = AttentionContext(is_prefill=True, slot_mapping=ctx.slot_mapping)
    assert cpu_decode.plan_for(m, x, prefill, 32) is None
    with torch.enable_grad():
        assert cpu_decode.plan_for(m, x, ctx, 32) is None
    m.layers[1].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(64))
    m.layers[0].self_attn.k_cache = m.layers[0].self_attn.k_cache.clone()  # new binding: plans rebuilt
    assert cpu_decode.plan_for(m, x, ctx, 32) is None
    monkeypatch.setenv(cpu_decode.ENV, "maybe")
    with pytest.raises(ValueError, match=cpu_decode.ENV):
        cpu_decode.enabled()


def test_compiled_decode_names_bad_arguments():
    m = _model(4, 2, 16, torch.float32, packed=False)
    _bind_caches(m, 8, torch.float32, seed=0)
    ctx = _decode_ctx([3], 8, seed=0)
    norms, weights, flags, kcs, vcs = cpu_decode._cached_plan(m, 1, torch.float32)[:5]
    x, cos = torch.randn(1, 64), torch.ones(1, 16)
    args = (ctx.slot_mapping, ctx.block_tables, ctx.context_lens, 4, 2, 16, 1e-6, 0.25)
    with pytest.raises(RuntimeError, match="norm weights"):
        cpp().llama_decode(x, cos, cos, norms[:-1], weights, flags, kcs, vcs, *args)
    with pytest.raises(RuntimeError, match="linear weights"):
        cpp().llama_decode(x, cos, cos, norms, weights[:-1], flags, kcs, vcs, *args)
    with pytest.raises(RuntimeError, match="qkv_proj"):
        cpp().llama_decode(x, cos, cos, norms, weights, flags, kcs, vcs, *args[:3], 2, 2, 16, 1e-6, 0.25)
    with pytest.raises(IndexError, match="out of range"):
        bad = ctx.block_tables.clone().fill_(99)
        cpp().llama_decode(x, cos, cos, norms, weights, flags, kcs, vcs, args[0], bad, *args[2:])


def test_bad_environment_fails_at_load(monkeypatch, tmp_path):
    from stllm_engine.engine.model_runner import ModelRunner
    from stllm_engine.model import STLLMModel
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint
    from stllm_engine.weights import load_checkpoint

    ck = load_checkpoint(write_tiny_checkpoint(tmp_path / "ck", vit="eva", video_input="all"))
    model = STLLMModel.from_checkpoint(ck, "cpu", torch.float32)
    model.allocate_kv_cache(8, 4)
    monkeypatch.setenv(cpu_decode.ENV, "fast")
    with pytest.raises(ValueError, match=cpu_decode.ENV):
        ModelRunner(model)
