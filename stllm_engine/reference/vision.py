"""EVA ViT-g as ``transformers``' InstructBLIP vision model, plus ``ln_vision`` and the BT-Adapter.

Release facts (``stllm/models/eva_vit.py``, ``blip2.py``) and how they map onto InstructBLIP:

* patch embedding Conv2d(3, D, p, stride p) with bias; ``cls_token`` then learned absolute
  ``pos_embed`` (1 + P tokens) -> ``embeddings.{patch_embedding, class_embedding, position_embedding}``.
* pre-norm blocks, LayerNorm eps 1e-6, exact GELU MLP, no layer scale (``init_values`` is None), no
  relative position bias. qkv is one Linear without bias plus ``q_bias``/``v_bias``; InstructBLIP's
  ``qkv`` Linear carries one bias vector, which we fill with ``cat(q_bias, 0, v_bias)``.
* EVA here has **no final norm** inside the ViT; InstructBLIP has ``post_layernorm``, replaced by
  ``nn.Identity`` (we run the encoder layers ourselves anyway, to tap the BT-Adapter inputs).
* ``ln_vision`` is LAVIS' fp32 LayerNorm with torch's default eps **1e-5**, applied after the ViT.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

from ..config import VisionConfig
from .btadapter import BTAdapter


def hf_vision_config(vc: VisionConfig, attn_implementation: str = "sdpa") -> InstructBlipVisionConfig:
    """InstructBLIP vision config equal to the EVA ViT described by ``vc``."""
    cfg = InstructBlipVisionConfig(
        hidden_size=vc.width, intermediate_size=vc.mlp_dim, num_hidden_layers=vc.depth,
        num_attention_heads=vc.num_heads, image_size=vc.image_size, patch_size=vc.patch_size,
        hidden_act="gelu", layer_norm_eps=vc.eps, attention_dropout=0.0, qkv_bias=True)
    cfg._attn_implementation = attn_implementation
    return cfg


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (LAVIS ``LayerNorm``, used as ``ln_vision``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 stays)
        w = self.weight.to(ct) if self.weight is not None else None
        b = self.bias.to(ct) if self.bias is not None else None
        return nn.functional.layer_norm(x.to(ct), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ReferenceVision(nn.Module):
    """Frames ``[T, 3, S, S]`` (one video) -> ``ln_vision`` features ``[T, 1 + P, D]``."""

    def __init__(self, vc: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = vc
        self.vit = InstructBlipVisionModel(hf_vision_config(vc, attn_implementation))
        self.vit.post_layernorm = nn.Identity()  # EVA has no final norm inside the ViT
        self.btadapter = BTAdapter(vc) if vc.btadapter else None
        self.ln_vision = FP32LayerNorm(vc.width)  # eps 1e-5, as LAVIS' LayerNorm(num_features)

    def check_frames(self, frames: torch.Tensor) -> None:
        s = self.config.image_size
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or tuple(frames.shape[1:]) != (3, s, s):
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be a tensor [T, 3, {s}, {s}], got {shape}")
        if frames.shape[0] == 0:
            raise ValueError("frames must hold at least one frame, got T=0")
        if self.btadapter is not None and frames.shape[0] > self.config.btadapter_max_frames:
            raise ValueError(f"BT-Adapter supports at most {self.config.btadapter_max_frames} frames, "
                             f"got {frames.shape[0]}")

    def vit_features(self, frames: torch.Tensor) -> torch.Tensor:
        """EVA ViT (+ BT-Adapter) output before ``ln_vision``: ``[T, 1 + P, D]``."""
        self.check_frames(frames)
        dtype = self.vit.embeddings.patch_embedding.weight.dtype
        x = self.vit.embeddings(frames.to(dtype))
        layers = self.vit.encoder.layers
        first_branch = len(layers) - (self.btadapter.depth if self.btadapter is not None else 0)
        branch = None
        for i, layer in enumerate(layers):
            x = layer(x)
            if isinstance(x, tuple):  # older transformers return tuples from encoder layers
                x = x[0]
            if self.btadapter is not None and i >= first_branch:
                branch = self.btadapter.step(x, branch, i - first_branch, self.vit.embeddings.position_embedding)
        if self.btadapter is not None:
            x = self.btadapter.merge(x, branch)
        return x

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.vit_features(frames))
