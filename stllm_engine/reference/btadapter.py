"""BT-Adapter: the temporal branch beside the last ``depth`` EVA blocks (plain PyTorch).

Behaviour of the release (``stllm/models/eva_btadapter.py``), for one video of T frames, P patches,
width D (``x_k`` = output of main ViT block k, shape ``[T, 1+P, D]``; the branch holds one
sequence ``[1, 1 + P*T, D]``: a cls token then the patch tokens in **patch-major, time-minor**
order ``(p t)``):

1. At the first branch block (k = L - depth), ``init_input``: patches of ``x_k`` get the ViT
   ``pos_embed`` again and the temporal embedding ``BTAdapter_position[t]`` (an ``Embedding(64, D)``:
   at most 64 frames); the branch cls is ``(mean_t x_k[t, 0] + BTAdapter_cls + pos_embed[0]) / 2``.
   At later branch blocks the input is ``[mean_t x_k[t, 0]; x_k patches in (p t) order] + branch``.
2. Each branch layer j: ``BTAdapter_T[j]`` (temporal: LayerNorm eps 1e-6 -> EVA attention over the T
   frames of each patch position -> ``temporal_fc``, residual on the patches; cls passes through),
   then ``BTAdapter_S[j]`` (an EVA block run per frame with the branch cls copied into each frame;
   the frames' attention outputs for cls are averaged; residual; then MLP with residual). The S
   blocks are ``Block`` built without ``norm_layer``, so their LayerNorms use torch's default eps 1e-5.
3. After the last ViT block: ``out[t] = (x_L[t] + [branch cls; branch patches of frame t]) / 2``.
Dropout / drop-path are identity at inference.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig


class EVAAttention(nn.Module):
    """EVA attention: qkv Linear without bias, plus ``q_bias`` and ``v_bias`` (k bias is zero)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        B, N, D = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # scale d^-0.5
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TemporalBlock(nn.Module):
    """``BTAdapter_T[j]``: attention over time per patch position, through ``temporal_fc``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EVAAttention(dim, num_heads)
        self.temporal_fc = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, T: int) -> torch.Tensor:  # h [1, 1 + P*T, D]
        cls, patches = h[:, :1], h[:, 1:]
        b, pt, d = patches.shape
        seq = patches.reshape(b * (pt // T), T, d)  # (p t) order: each row is one patch over time
        out = self.temporal_fc(self.attn(self.norm1(seq))).reshape(b, pt, d) + patches
        return torch.cat((cls, out), dim=1)


class SpatialBlock(nn.Module):
    """``BTAdapter_S[j]``: EVA block applied per frame, cls shared across frames."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5: the release builds these blocks without norm_layer
        self.attn = EVAAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, h: torch.Tensor, T: int) -> torch.Tensor:  # h [1, 1 + P*T, D]
        cls, patches = h[:, :1], h[:, 1:]
        b, pt, d = patches.shape
        p = pt // T
        frames = patches.reshape(b, p, T, d).transpose(1, 2).reshape(b * T, p, d)  # [(b t), p, d]
        z = torch.cat((cls.repeat_interleave(T, dim=0), frames), dim=1)
        a = self.attn(self.norm1(z))
        a_cls = a[:, :1].reshape(b, T, 1, d).mean(1)
        a_patch = a[:, 1:].reshape(b, T, p, d).transpose(1, 2).reshape(b, pt, d)
        h = h + torch.cat((a_cls, a_patch), dim=1)
        return h + self.mlp(self.norm2(h))


class BTAdapter(nn.Module):
    """Branch state machine driven by :class:`~stllm_engine.reference.vision.ReferenceVision`."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.depth = vc.btadapter_depth
        self.max_frames = vc.btadapter_max_frames
        d = vc.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))  # BTAdapter_cls
        self.position = nn.Embedding(vc.btadapter_max_frames, d)  # BTAdapter_position
        self.spatial = nn.ModuleList(SpatialBlock(d, vc.num_heads, vc.mlp_dim) for _ in range(self.depth))
        self.temporal = nn.ModuleList(TemporalBlock(d, vc.num_heads) for _ in range(self.depth))

    def init_input(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        T, n, d = x.shape
        if T > self.max_frames:
            raise ValueError(f"BT-Adapter supports at most {self.max_frames} frames, got {T}")
        cls_main = x[:, 0].mean(0)
        patches = x[:, 1:] + pos_embed[0, 1:n] + self.position.weight[:T, None, :]
        cls_branch = self.cls_token[0, 0] + pos_embed[0, 0]
        seq = patches.transpose(0, 1).reshape((n - 1) * T, d)  # (p t)
        return torch.cat((((cls_main + cls_branch) / 2)[None], seq), dim=0)[None]

    def step(self, x: torch.Tensor, branch: torch.Tensor | None, j: int, pos_embed: torch.Tensor) -> torch.Tensor:
        """Branch layer j fed by main-path block output ``x [T, 1+P, D]``; returns ``[1, 1+P*T, D]``."""
        T, n, d = x.shape
        if branch is None:
            if j != 0:
                raise RuntimeError(f"BT-Adapter branch missing at layer {j}")
            h = self.init_input(x, pos_embed)
        else:
            seq = x[:, 1:].transpose(0, 1).reshape((n - 1) * T, d)
            h = torch.cat((x[:, 0].mean(0)[None], seq), dim=0)[None] + branch
        h = self.temporal[j](h, T)
        return self.spatial[j](h, T)

    @staticmethod
    def merge(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``(x + branch laid out per frame) / 2`` -> ``[T, 1+P, D]``."""
        T, n, d = x.shape
        cls = branch[0, :1].expand(T, 1, d)
        patches = branch[0, 1:].reshape(n - 1, T, d).transpose(0, 1)
        return (x + torch.cat((cls, patches), dim=1)) / 2
