"""LayerNorm of the vision side (ViT blocks, Q-Former): ``nn.LayerNorm`` (same parameters and
state-dict names) whose forward is :func:`stllm_engine.ops.elementwise.layer_norm`: the C++ op on
large CPU float32/bfloat16 inputs outside autograd, torch's op everywhere else."""
from __future__ import annotations

import torch
import torch.nn as nn

from stllm_engine.ops import elementwise as ew


class LayerNorm(nn.LayerNorm):
    """Over the last dim only (``normalized_shape`` of one int), with weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ew.layer_norm(x, self.weight, self.bias, self.eps)
