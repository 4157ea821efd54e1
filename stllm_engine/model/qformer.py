"""Instruction-aware Q-Former (BERT with cross-attention to the image every 2nd layer).

Sequence per frame: the learned query tokens followed by the question's WordPiece tokens (text
gets word + absolute position embeddings, queries none; one LayerNorm over both). Each layer
(post-norm BERT): self-attention over queries + text; for the queries only, cross-attention to the
frame's image embeddings (layers 0, f, 2f, ...); then separate FFNs for query and text positions.
Output: the query states of every frame. All T frames share one question, so the first
self-attention (before any image is seen) is computed once and broadcast.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stllm_engine import ops
from stllm_engine.config import QFormerConfig
from stllm_engine.model.layer_norm import LayerNorm
from stllm_engine.model.packed_linear import linear_add, linear_gelu


class _Attention(nn.Module):
    """BERT attention + output (dense, residual, LayerNorm). Self (fused qkv) or cross (q + kv)."""

    def __init__(self, hidden: int, num_heads: int, eps: float, kv_width: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.cross = kv_width is not None
        if self.cross:
            self.q = nn.Linear(hidden, hidden)
            self.kv = nn.Linear(kv_width, 2 * hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Lq, hidden] (B frames, or 1 before any image), context [B, Lk, kv_width]."""
        if self.cross:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        # every frame attends within itself: B equal-length sequences for ops.varlen_attention
        # (on a bfloat16 AMX CPU the C++ AMX kernel; else torch SDPA, one batched call)
        b, lq, lk = x.shape[0], q.shape[1], k.shape[1]
        heads = lambda t: t.reshape(b * t.shape[1], self.num_heads, -1)  # noqa: E731 - views
        cu = torch.arange(b + 1, dtype=torch.int32, device=x.device)
        o = ops.varlen_attention(heads(q), heads(k), heads(v), cu * lq, cu * lk, lq, lk, causal=False,
                                 uniform=True)
        return self.norm(linear_add(self.out, o.reshape(x.shape), x))


class _FFN(nn.Module):
    def __init__(self, hidden: int, inner: int, eps: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.norm = LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(linear_add(self.fc2, linear_gelu(self.fc1, x), x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_width: int, has_cross: bool):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.eps
        self.self_attn = _Attention(h, cfg.num_heads, eps)
        self.cross_attn = _Attention(h, cfg.num_heads, eps, kv_width=image_width) if has_cross else None
        self.ffn_query = _FFN(h, cfg.intermediate_size, eps)
        self.ffn_text = _FFN(h, cfg.intermediate_size, eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor, num_query: int, last: bool,
                frames: int) -> torch.Tensor:
        x = self.self_attn(x)
        q, t = x[:, :num_query], x[:, num_query:]
        if q.shape[0] != frames:  # the first layer's self-attention ran once for all frames
            q = q.expand(frames, -1, -1)
        if self.cross_attn is not None:
            q = self.cross_attn(q, image)
        q = self.ffn_query(q)
        if last:  # the text states of the last layer are not used
            return q
        t = self.ffn_text(t)  # text positions see no image in the first layer: once for all frames there too
        return torch.cat([q, t.expand(frames, -1, -1)], dim=1)


class QFormer(nn.Module):
    """(image_embeds [T, Nv, Wv], text ids [n]) -> query states [T, num_query, hidden]."""

    def __init__(self, cfg: QFormerConfig, image_width: int):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, h))
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.emb_norm = LayerNorm(h, eps=cfg.eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, image_width, i % cfg.cross_attention_freq == 0)
            for i in range(cfg.num_layers))

    def forward(self, image_embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        if image_embeds.ndim != 3:
            raise ValueError(f"Q-Former expects image_embeds [T, Nv, Wv], got {tuple(image_embeds.shape)}")
        n = text_ids.numel()
        if n > self.cfg.max_position_embeddings:
            raise ValueError(f"question has {n} Q-Former tokens, more than the "
                             f"{self.cfg.max_position_embeddings} positions")
        dtype = self.query_tokens.dtype
        ids = text_ids.to(self.word_embeddings.weight.device, torch.long).view(1, n)
        pos = torch.arange(n, device=ids.device).view(1, n)
        text = self.word_embeddings(ids) + self.position_embeddings(pos)
        x = self.emb_norm(torch.cat([self.query_tokens, text], dim=1))
        image = image_embeds.to(dtype)
        nq, frames = self.cfg.num_query_tokens, image.shape[0]
        for i, layer in enumerate(self.layers):
            x = layer(x, image, nq, i == len(self.layers) - 1, frames)
        return x[:, :nq]
