"""Video-to-LLM-token projector: ``all`` | ``mean`` | ``residual`` (global-local), plain PyTorch.

Release (``Chat.upload_video``): per-frame LLM tokens ``[T, Q, H]`` become
* ``all``: ``[T*Q, H]`` (frames concatenated in order);
* ``mean``: ``[Q, H]`` (mean over frames);
* ``residual``: local frames at ``int(seg/2 + round(seg*i))``, ``seg = T / R`` (numpy round: half to
  even), global = mean over all T frames -> ``down_proj`` -> ReLU -> ``up_proj``, added to every
  local frame -> ``[R*Q, H]``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def residual_indices(num_local: int, num_frames: int) -> list[int]:
    """Local frame indices of global-local input (``get_residual_index`` of the release)."""
    if num_local <= 0 or num_frames <= 0:
        raise ValueError(f"need positive sizes, got num_local={num_local}, num_frames={num_frames}")
    seg = float(num_frames) / num_local
    return [int(seg / 2 + np.round(seg * i)) for i in range(num_local)]


class VideoProjector(nn.Module):
    def __init__(self, mode: str, hidden: int, residual_size: int, residual_hidden: int):
        super().__init__()
        if mode not in ("all", "mean", "residual"):
            raise ValueError(f"unsupported video_input {mode!r}")
        self.mode = mode
        self.residual_size = residual_size
        if mode == "residual":
            self.down_proj = nn.Linear(hidden, residual_hidden)
            self.up_proj = nn.Linear(residual_hidden, hidden)

    def forward(self, frame_tokens: torch.Tensor) -> torch.Tensor:  # [T, Q, H] -> [L, H]
        if frame_tokens.ndim != 3:
            raise ValueError(f"frame tokens must be [T, Q, H], got {tuple(frame_tokens.shape)}")
        T, Q, H = frame_tokens.shape
        if self.mode == "all":
            return frame_tokens.reshape(T * Q, H)
        if self.mode == "mean":
            return frame_tokens.mean(dim=0)
        idx = residual_indices(self.residual_size, T)
        if idx[-1] >= T:
            raise ValueError(f"global-local input needs at least {self.residual_size} frames, got {T}")
        local = frame_tokens[idx]
        glob = frame_tokens.mean(dim=0, keepdim=True).to(self.up_proj.weight.dtype)
        glob = self.up_proj(torch.relu(self.down_proj(glob)))
        return (local + glob).reshape(self.residual_size * Q, H)
