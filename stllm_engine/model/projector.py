"""Frame query states -> LLM video tokens: ``llama_proj`` then the video input mode.

* ``all``: every frame's tokens in frame order -> [T * Q, H].
* ``mean``: the frames' average -> [Q, H].
* ``residual`` (global-local): ``residual_size`` local frames at ``int(seg/2 + round(seg*i))``,
  ``seg = T / residual_size``; global = mean over all frames -> down_proj -> ReLU -> up_proj,
  added to every local frame -> [residual_size * Q, H].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stllm_engine.config import STLLMConfig


def residual_frame_indices(num_frames: int, residual_size: int) -> list[int]:
    """The local frames of global-local input (numpy rounding: half to even, as the release)."""
    seg = float(num_frames) / residual_size
    idx = [int(seg / 2 + np.round(seg * i)) for i in range(residual_size)]
    if idx[-1] >= num_frames:
        raise ValueError(f"global-local input needs enough frames for {residual_size} local "
                         f"frames; got {num_frames} frames (local index {idx[-1]} out of range)")
    return idx


class VideoProjector(nn.Module):
    def __init__(self, cfg: STLLMConfig):
        super().__init__()
        self.mode, self.residual_size = cfg.video_input, cfg.residual_size
        h = cfg.llm.hidden_size
        self.llama_proj = nn.Linear(cfg.qformer.hidden_size, h)
        if self.mode == "residual":
            self.down_proj = nn.Linear(h, cfg.residual_hidden)
            self.up_proj = nn.Linear(cfg.residual_hidden, h)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        """query_states [T, Q, Hq] -> video tokens [Lv, H]."""
        x = self.llama_proj(query_states)  # [T, Q, H]
        t, _, h = x.shape
        if self.mode == "all":
            return x.reshape(-1, h)
        if self.mode == "mean":
            return x.mean(0)
        # frames picked by slices, not by an index list: a list becomes a host tensor copied to
        # the GPU, which a CUDA-graph capture of this pass (``video_graphs.py``) cannot hold
        local = torch.stack([x[i] for i in residual_frame_indices(t, self.residual_size)])
        glob = self.up_proj(F.relu(self.down_proj(x.mean(0))))
        return (local + glob).reshape(-1, h)
