"""EVA ViT-g (InstructBLIP's vision tower) over packed frames.

Per frame: patch embedding (conv, stride = patch) -> [cls] + patches -> + learned absolute position
embedding -> pre-norm blocks (fused qkv whose bias is ``cat(q_bias, 0, v_bias)``, GELU MLP); no
final norm. The T frames of a video run as one packed batch: every attention is
``ops.varlen_attention`` (non-causal) with one sequence per frame. With a BT-Adapter the temporal
branch (``btadapter.py``) runs beside the last blocks and is averaged into the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stllm_engine.config import VisionConfig
from stllm_engine import ops
from stllm_engine.model.layer_norm import LayerNorm
from stllm_engine.model.packed_linear import PackedPatchEmbed, linear_add, linear_gelu


class EVAAttention(nn.Module):
    """Multi-head self-attention over packed sequences (fused qkv, one bias vector)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)  # bias = cat(q_bias, zeros, v_bias)
        self.proj = nn.Linear(width, width)

    def heads(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x [N, W] packed; cu_seqlens int32 [S+1] -> the heads' outputs [N, W] before ``proj``."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 causal=False, scale=self.head_dim ** -0.5, uniform=True)
        return o.reshape(n, -1)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x [N, W] packed; cu_seqlens int32 [S+1] -> [N, W]."""
        return self.proj(self.heads(x, cu_seqlens, max_seqlen))


class EVAMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(fc1(x)): the input of ``fc2``."""
        return linear_gelu(self.fc1, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class EVABlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = EVAAttention(width, num_heads)
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = EVAMlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = linear_add(self.attn.proj, self.attn.heads(self.norm1(x), cu_seqlens, max_seqlen), x)
        return linear_add(self.mlp.fc2, self.mlp.hidden(self.norm2(x)), x)


class EVAVisionTransformer(nn.Module):
    """frames [T, 3, S, S] -> tokens [T, 1 + (S/p)^2, W] (cls first)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, w))
        self.blocks = nn.ModuleList(
            EVABlock(w, cfg.num_heads, cfg.mlp_dim, cfg.eps) for _ in range(cfg.depth))
        self.btadapter = None
        if cfg.btadapter:
            from stllm_engine.model.btadapter import BTAdapter

            self.btadapter = BTAdapter(cfg)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [T, 3, S, S] -> [T, Nv, W] with cls token and position embedding."""
        c = self.cfg
        if frames.ndim != 4 or frames.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(f"vision tower expects frames [T, 3, {c.image_size}, {c.image_size}], "
                             f"got {tuple(frames.shape)}")
        proj = self.patch_embed.proj
        if isinstance(proj, PackedPatchEmbed):  # (CPU) the conv as one packed GEMM
            x = proj.tokens(frames)
        else:
            x = proj(frames.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.embed(frames)
        t, nv, w = x.shape
        if self.btadapter is not None and t > self.cfg.btadapter_max_frames:
            raise ValueError(f"BT-Adapter supports at most {self.cfg.btadapter_max_frames} frames, "
                             f"got {t}")
        cu = torch.arange(0, (t + 1) * nv, nv, dtype=torch.int32, device=x.device)
        flat = x.reshape(t * nv, w)
        first_branch = self.cfg.depth - self.cfg.btadapter_depth
        branch = None
        for i, blk in enumerate(self.blocks):
            flat = blk(flat, cu, nv)
            if self.btadapter is not None and i >= first_branch:
                branch = self.btadapter.layer(i - first_branch, flat.view(t, nv, w), branch,
                                              self.pos_embed)
        x = flat.view(t, nv, w)
        if self.btadapter is not None:
            x = self.btadapter.merge(x, branch)
        return x
