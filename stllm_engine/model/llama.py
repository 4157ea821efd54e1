"""LLaMA decoder for packed, paged inference.

Tokens of all sequences in a step are packed into one [N, H] tensor with explicit positions (no
padding). RMSNorm, rotary embedding (rotate-half, theta from the config), fused ``qkv_proj`` and
``gate_up_proj`` (built at load time from the official q/k/v and gate/up weights), SiLU MLP, GQA.
The element-wise parts are the fused ops of :mod:`stllm_engine.ops.elementwise`: each residual add
is folded into the RMSNorm after it, rotary runs in place on the qkv rows, SwiGLU on gate_up.
``out_rows`` (the rows whose logits a step samples) trims the last layer: every row still writes
its K/V, but o_proj, the MLP and the final norm run only for those rows.
On the CPU a prefill pass runs its row-wise work (GEMMs, norms, MLP) on the packed rows padded
with zero rows up to a multiple of ``ROW_BUCKET``: oneDNN sets up its GEMMs per row count, and the
first pass at a new row count cost ~50 ms more at bench-cpu (122 -> 170 ms, every new prompt
length); padded, a new length only pays that when it starts a new bucket. Padding rows never
reach the cache or the attention (which see the real rows only) and are dropped from the output.
Attention reads the per-step :class:`~stllm_engine.model.context.AttentionContext`:

* prefill without prefix: ``ops.varlen_attention`` (causal) over the new tokens;
* prefill with a prefix in the cache (chunked prefill, multi-turn): ``ops.paged_prefill_attention``;
* decode: ``ops.paged_decode_attention``.

CPU decode steps of up to 32 sequences (float32/bfloat16, outside autograd) run all layers in one
compiled call instead (:mod:`stllm_engine.model.cpu_decode`): the same kernels in the same order,
bit-identical, without the Python between them.

New keys/values are written to the paged cache (``ops.write_kv_cache``) before attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stllm_engine.config import LLMConfig
from stllm_engine import ops
from stllm_engine.model import cpu_decode, fused_swiglu
from stllm_engine.model.context import get_context
from stllm_engine.ops import elementwise as ew


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ew.rms_norm(x, self.weight, self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [N, head_dim] for integer positions [N] (computed in float32)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


apply_rotary = ew.rotate_ref  # x [N, heads, d] rotated by cos/sin [N, d] (rotate-half convention)

ROW_BUCKET = 32  # CPU prefill passes pad their rows to a multiple of this (see the module docstring)
MIN_BUCKETED_ROWS = 33  # decode-sized passes (<= 32 rows) run unpadded: oneDNN's small-M path


def bucketed_rows(n: int, device: torch.device) -> int:
    """Rows a pass of n tokens runs its row-wise ops on: n, or on the CPU for prefill-sized n
    the next multiple of ROW_BUCKET."""
    if device.type != "cpu" or n < MIN_BUCKETED_ROWS:
        return n
    return -(-n // ROW_BUCKET) * ROW_BUCKET


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hk, d], bound later
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                out_rows: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """x [N, H] -> [N, H], or [len(out_rows), H] for those rows only (all rows' K/V are
        still written and attend; only the output projection is trimmed). ``rows``: only the
        first ``rows`` rows are tokens (cos/sin have that many), the rest is row padding: it goes
        through the projections only and comes out as zero rows before ``o_proj``."""
        padded = x.shape[0]
        n = padded if rows is None else rows
        qkv = self.qkv_proj(x)
        if n < padded:
            qkv = qkv[:n]
        qkv = ew.rotary_qk_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos, sin)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        ctx = get_context()
        if self.k_cache is not None and ctx.slot_mapping is not None:
            ops.write_kv_cache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill and not ctx.has_prefix:
            o = ops.varlen_attention(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                     ctx.max_seqlen_k, causal=True, scale=self.scale)
        elif self.k_cache is None:
            raise RuntimeError("attention over cached tokens needs a KV cache: "
                               "call allocate_kv_cache first")
        elif ctx.is_prefill:
            o = ops.paged_prefill_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                            ctx.cu_seqlens_q, ctx.context_lens, scale=self.scale,
                                            max_seqlen_q=ctx.max_seqlen_q or None)
        else:
            o = ops.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                           ctx.context_lens, scale=self.scale)
        o = o.reshape(n, self.q_size)
        if out_rows is not None:
            o = o.index_select(0, out_rows)
        elif n < padded:
            o = F.pad(o, (0, 0, 0, padded - n))
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    """down(silu(gate) * up) with gate and up from one fused ``gate_up_proj``; CPU bfloat16
    prefills may run gate_up + SwiGLU as one AMX kernel (:mod:`stllm_engine.model.fused_swiglu`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.swiglu_packed: torch.Tensor | None = None  # set by fused_swiglu.pack_swiglu (None: unfused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fused_swiglu.swiglu(self, x)
        return self.down_proj(ew.silu_and_mul(self.gate_up_proj(x)) if h is None else h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, normed: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                next_norm: RMSNorm, out_rows: torch.Tensor | None = None, rows: int | None = None):
        """(input_layernorm(x), x) -> (next_norm(x'), x') with x' this layer's output; the
        residual tensor is updated in place where the fused op allows. ``out_rows``: only those
        rows of x'; ``rows``: real rows before the padding (see LlamaAttention)."""
        a = self.self_attn(normed, cos, sin, out_rows, rows)
        if out_rows is not None:
            residual = residual.index_select(0, out_rows)
        normed, residual = ew.add_rms_norm(a, residual, self.post_attention_layernorm.weight,
                                           self.post_attention_layernorm.eps)
        return ew.add_rms_norm(self.mlp(normed), residual, next_norm.weight, next_norm.eps)


class LlamaModel(nn.Module):
    """embed_tokens, decoder layers and the final norm (the LM head lives in STLLMModel)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [N, H] packed, positions [N] int64 -> final-normed hidden [N, H]; with
        ``out_rows`` (int64 row indices) only those rows, in that order, and the last layer's
        o_proj/MLP run for them alone (prefill steps sample one row a sequence)."""
        if embeds.ndim != 2 or positions.shape != embeds.shape[:1]:
            raise ValueError(f"LLM expects packed embeds [N, H] and positions [N], got "
                             f"{tuple(embeds.shape)} and {tuple(positions.shape)}")
        n = embeds.shape[0]
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        ctx = get_context()
        plan = cpu_decode.plan_for(self, embeds, ctx, MIN_BUCKETED_ROWS - 1)
        if plan is not None:
            hidden = cpu_decode.run(plan, embeds, cos, sin, ctx)
            return hidden if out_rows is None else hidden.index_select(0, out_rows)
        padded = bucketed_rows(n, embeds.device)
        # residual: a new tensor the fused add + norm update in place (zero rows as padding)
        residual = F.pad(embeds, (0, 0, 0, padded - n)) if padded > n else embeds.contiguous().clone()
        normed = self.layers[0].input_layernorm(residual)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i < last else self.norm
            normed, residual = layer(normed, residual, cos, sin, next_norm,
                                     out_rows if i == last else None, n)
        return normed if out_rows is not None or padded == n else normed[:n]
