"""BT-Adapter: the temporal branch beside the last ViT blocks (ST-LLM's ``eva_btadapter_g``).

Data flow for one video of T frames (P patches a frame, W width), as the release runs it:

* Branch layer 0 starts from the output ``x`` of ViT block ``depth - btadapter_depth``: patches get
  the ViT position embedding and the temporal embedding ``BTAdapter_position[t]``; the branch cls
  is ``(mean_t x[t, cls] + BTAdapter_cls + pos_embed[cls]) / 2``.
* Branch layer j > 0 adds the main path in: cls += mean_t x[t, cls]; patch (p, t) += x[t, 1 + p].
* Each layer: temporal block (LayerNorm -> attention over the T frames of each patch position ->
  ``temporal_fc``; residual on the patches, cls untouched), then a spatial ViT block per frame
  (frame t sees [cls, its patches]; the cls update is the mean over frames; shared MLP).
* Output per frame t: (x[t] + [branch cls, branch patches at t]) / 2.

The branch state is kept as ``cls [W]`` and ``patches [P, T, W]`` (patch-major, as the release).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stllm_engine.config import VisionConfig
from stllm_engine.model.layer_norm import LayerNorm
from stllm_engine.model.packed_linear import linear_add
from stllm_engine.model.vision import EVAAttention, EVAMlp

SPATIAL_EPS = 1e-5  # the release builds BTAdapter_S with torch's default LayerNorm eps
TEMPORAL_EPS = 1e-6


def _cu(num_seqs: int, length: int, device) -> torch.Tensor:
    return torch.arange(0, (num_seqs + 1) * length, length, dtype=torch.int32, device=device)


class TemporalBlock(nn.Module):
    """patches [P, T, W] -> patches + temporal_fc(attn_over_T(norm1(patches)))."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=TEMPORAL_EPS)
        self.attn = EVAAttention(width, num_heads)
        self.temporal_fc = nn.Linear(width, width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        p, t, w = patches.shape
        y = self.attn(self.norm1(patches).reshape(p * t, w), _cu(p, t, patches.device), t)
        return linear_add(self.temporal_fc, y, patches.reshape(p * t, w)).view(p, t, w)


class SpatialBlock(nn.Module):
    """ViT block applied per frame to (cls [W], patches [P, T, W]); cls update = mean over frames."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=SPATIAL_EPS)
        self.attn = EVAAttention(width, num_heads)
        self.norm2 = LayerNorm(width, eps=SPATIAL_EPS)
        self.mlp = EVAMlp(width, mlp_dim)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor):
        p, t, w = patches.shape
        frames = torch.cat([cls.expand(t, 1, w), patches.transpose(0, 1)], dim=1)  # [T, 1+P, W]
        y = self.attn(self.norm1(frames).reshape(t * (p + 1), w), _cu(t, p + 1, cls.device), p + 1)
        y = y.view(t, p + 1, w)
        cls = cls + y[:, 0].mean(0)
        patches = patches + y[:, 1:].transpose(0, 1)
        cls = cls + self.mlp(self.norm2(cls))
        flat = patches.reshape(p * t, w)
        return cls, linear_add(self.mlp.fc2, self.mlp.hidden(self.norm2(flat)), flat).view(p, t, w)


class BTAdapter(nn.Module):
    """Parameters and per-layer steps of the temporal branch (driven by the ViT's forward)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w, h = cfg.width, cfg.num_heads
        self.max_frames = cfg.btadapter_max_frames
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.position = nn.Embedding(cfg.btadapter_max_frames, w)
        self.spatial = nn.ModuleList(SpatialBlock(w, h, cfg.mlp_dim) for _ in range(cfg.btadapter_depth))
        self.temporal = nn.ModuleList(TemporalBlock(w, h) for _ in range(cfg.btadapter_depth))

    def _start(self, x: torch.Tensor, pos_embed: torch.Tensor):
        t = x.shape[0]
        if t > self.max_frames:
            raise ValueError(f"BT-Adapter supports at most {self.max_frames} frames, got {t}")
        patches = (x[:, 1:] + pos_embed[0, 1:]).transpose(0, 1)  # [P, T, W]
        patches = patches + self.position.weight[:t]
        cls = (x[:, 0].mean(0) + (self.cls[0, 0] + pos_embed[0, 0])) / 2
        return cls, patches

    def layer(self, j: int, x: torch.Tensor, branch, pos_embed: torch.Tensor):
        """One branch layer after ViT block ``depth - btadapter_depth + j``; x [T, Nv, W]."""
        if branch is None:
            cls, patches = self._start(x, pos_embed)
        else:
            cls = branch[0] + x[:, 0].mean(0)
            patches = branch[1] + x[:, 1:].transpose(0, 1)
        patches = self.temporal[j](patches)
        return self.spatial[j](cls, patches)

    @staticmethod
    def merge(x: torch.Tensor, branch) -> torch.Tensor:
        """(main path [T, Nv, W] + branch per frame) / 2."""
        cls, patches = branch
        t, _, w = x.shape
        b = torch.cat([cls.expand(t, 1, w), patches.transpose(0, 1)], dim=1)
        return (x + b) / 2
