"""The engine's LLaMA (packed varlen prefill, fused weights, GQA) against transformers' Llama with
the same weights: per-sequence hidden states of a packed batch, RoPE at explicit positions, RMSNorm.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from stllm_engine.config import LLMConfig
from stllm_engine.model import reset_context, set_context
from stllm_engine.model.convert import convert_state_dict
from stllm_engine.model.llama import LlamaModel, RMSNorm, apply_rotary, rotary_cos_sin

# (hidden, heads, kv heads): MHA, GQA, MQA, and head dim 88
SHAPES = [(64, 4, 4), (64, 4, 2), (64, 4, 1), (176, 2, 1)]


def _hf_config(c: LLMConfig) -> LlamaConfig:
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                       intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                       num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                       rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                       max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)


def _pair(hidden, heads, kv, dtype):
    cfg = LLMConfig(vocab_size=50, hidden_size=hidden, intermediate_size=72, num_layers=2,
                    num_heads=heads, num_kv_heads=kv)
    torch.manual_seed(hidden + heads + kv)
    hf = LlamaForCausalLM(_hf_config(cfg)).eval()
    with torch.no_grad():  # norms away from 1 so their weights matter
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    ours = LlamaModel(cfg)
    sd = {k.removeprefix("llm."): v for k, v in convert_state_dict(hf.state_dict()).items()
          if k.startswith("llm.")}
    ours.load_state_dict(sd, strict=True)
    return ours.to(dtype).eval(), hf.to(dtype)


@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_matches_hf(hidden, heads, kv, dtype):
    ours, hf = _pair(hidden, heads, kv, dtype)
    hf32 = _pair(hidden, heads, kv, torch.float32)[1] if dtype != torch.float32 else hf
    lens = [1, 7, 12]
    embeds = torch.randn(sum(lens), hidden, generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 1, 8, 20], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    set_context(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12)
    try:
        with torch.no_grad():
            out = ours(embeds.to(dtype), positions)
    finally:
        reset_context()
    assert out.shape == embeds.shape and out.dtype == dtype
    for b, n in enumerate(lens):
        x = embeds[cu[b]:cu[b + 1]][None]
        with torch.no_grad():
            ref32 = hf32.model(inputs_embeds=x).last_hidden_state[0]
            ref = hf.model(inputs_embeds=x.to(dtype)).last_hidden_state[0].float()
        err = (out[cu[b]:cu[b + 1]].float() - ref32).abs().max().item()
        scale = ref32.abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * scale, f"sequence {b}: {err}"
        else:  # no worse than twice transformers' own bf16 error
            assert err <= 2 * (ref - ref32).abs().max().item() + 1e-3 * scale, f"sequence {b}: {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[19], [0, 7, 19], [7, 0], []])
def test_out_rows_trims_the_last_layer(dtype, rows):
    """``out_rows`` returns those rows (in that order) of the full pass, the last layer's o_proj
    and MLP running for them only; none at all gives [0, H]."""
    ours, _ = _pair(64, 4, 2, dtype)
    lens = [1, 7, 12]
    embeds = torch.randn(sum(lens), 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    cu = torch.tensor([0, 1, 8, 20], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    set_context(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12)
    try:
        with torch.no_grad():
            full = ours(embeds, positions)
            some = ours(embeds, positions, out_rows=torch.tensor(rows, dtype=torch.int64))
    finally:
        reset_context()
    assert some.shape == (len(rows), 64) and some.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(some, full[rows], **tol)


@pytest.mark.parametrize("head_dim", [16, 88, 128])
def test_rotary_matches_hf(head_dim):
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=10000.0)
    positions = torch.tensor([0, 5, 2047, 17, 1])
    q, k = torch.randn(5, 2, head_dim), torch.randn(5, 1, head_dim)
    cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_hf, sin_hf)
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_matches_hf(dtype):
    ours, hf = RMSNorm(88, 1e-6), LlamaRMSNorm(88, eps=1e-6)
    w = torch.rand(88) + 0.5
    ours.weight.data.copy_(w), hf.weight.data.copy_(w)
    x = torch.randn(7, 88).to(dtype)
    torch.testing.assert_close(ours.to(dtype)(x), hf.to(dtype)(x), rtol=0, atol=0)


def test_errors_name_the_problem():
    ours, _ = _pair(64, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="packed embeds"):
        ours(torch.randn(2, 3, 64), torch.arange(3))
    set_context(is_prefill=False, context_lens=torch.tensor([3], dtype=torch.int32))
    try:
        with pytest.raises(RuntimeError, match="allocate_kv_cache"):
            ours(torch.randn(1, 64), torch.tensor([2]))
    finally:
        reset_context()
