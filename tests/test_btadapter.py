"""BT-Adapter of the reference vs. an independent einsum derivation of the published formulas.

The derivation below works on the *official* weight names and keeps the branch as a cls vector plus
a time-major grid ``[T, P, D]`` (the module uses one flat ``(p t)`` sequence), with einsum attention
and an unfolded patch embedding instead of a convolution.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from stllm_engine.config import VisionConfig
from stllm_engine.reference.keymap import VISION_PREFIX, reference_to_official
from stllm_engine.reference.vision import ReferenceVision


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.3 * noise)
        # EVA has no k bias: keep the k third of InstructBLIP's packed qkv bias at zero
        for layer in module.vit.encoder.layers:
            b = layer.self_attn.qkv.bias
            b[b.numel() // 3: 2 * b.numel() // 3] = 0


def _official_vision(vision: ReferenceVision) -> dict:
    sd = {"vision." + k: v for k, v in vision.state_dict().items()}
    off = reference_to_official(sd)
    return {k[len(VISION_PREFIX):]: v for k, v in off.items()}


def _attn(W, p, x, heads):
    D = x.shape[-1]
    bias = torch.cat([W[p + "attn.q_bias"], torch.zeros_like(W[p + "attn.q_bias"]), W[p + "attn.v_bias"]])
    qkv = torch.einsum("...nd,ed->...ne", x, W[p + "attn.qkv.weight"]) + bias
    q, k, v = (t.unflatten(-1, (heads, D // heads)) for t in qkv.split(D, dim=-1))
    s = torch.einsum("...nhc,...mhc->...hnm", q, k) / math.sqrt(D // heads)
    o = torch.einsum("...hnm,...mhc->...nhc", s.softmax(-1), v).flatten(-2)
    return torch.einsum("...nd,ed->...ne", o, W[p + "attn.proj.weight"]) + W[p + "attn.proj.bias"]


def _ln(W, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], W[p + ".weight"], W[p + ".bias"], eps)


def _mlp(W, p, x):
    h = F.gelu(torch.einsum("...d,ed->...e", x, W[p + "mlp.fc1.weight"]) + W[p + "mlp.fc1.bias"])
    return torch.einsum("...e,de->...d", h, W[p + "mlp.fc2.weight"]) + W[p + "mlp.fc2.bias"]


def derived_eva_btadapter(W, frames, vc: VisionConfig):
    """Published formulas: EVA ViT with the BT-Adapter branch beside its last blocks."""
    T, ps, H = frames.shape[0], vc.patch_size, vc.num_heads
    g = vc.image_size // ps
    patches = frames.reshape(T, 3, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(T, g * g, 3 * ps * ps)
    w = W["visual_encoder.patch_embed.proj.weight"].reshape(vc.width, -1)
    x = torch.einsum("tpk,dk->tpd", patches, w) + W["visual_encoder.patch_embed.proj.bias"]
    pos = W["visual_encoder.pos_embed"][0]
    x = torch.cat([W["visual_encoder.cls_token"][0].expand(T, 1, -1), x], 1) + pos
    first = vc.depth - vc.btadapter_depth
    c = grid = None
    for k in range(vc.depth):
        b = f"visual_encoder.blocks.{k}."
        x = x + _attn(W, b, _ln(W, b + "norm1", x, 1e-6), H)
        x = x + _mlp(W, b, _ln(W, b + "norm2", x, 1e-6))
        if k < first:
            continue
        j = k - first
        if j == 0:
            c = (x[:, 0].mean(0) + W["visual_encoder.BTAdapter_cls"][0, 0] + pos[0]) / 2
            grid = x[:, 1:] + pos[1:] + W["visual_encoder.BTAdapter_position.weight"][:T, None]
        else:
            c, grid = c + x[:, 0].mean(0), grid + x[:, 1:]
        tp = f"visual_encoder.BTAdapter_T.{j}."
        a = _attn(W, tp, _ln(W, tp + "norm1", grid.transpose(0, 1), 1e-6), H)  # over time per patch
        a = torch.einsum("ptd,ed->tpe", a, W[tp + "temporal_fc.weight"]) + W[tp + "temporal_fc.bias"]
        grid = grid + a
        sp = f"visual_encoder.BTAdapter_S.{j}."
        seq = torch.cat([c.expand(T, 1, -1), grid], 1)
        a = _attn(W, sp, _ln(W, sp + "norm1", seq, 1e-5), H)
        c, grid = c + a[:, 0].mean(0), grid + a[:, 1:]
        c = c + _mlp(W, sp, _ln(W, sp + "norm2", c, 1e-5))
        grid = grid + _mlp(W, sp, _ln(W, sp + "norm2", grid, 1e-5))
    return (x + torch.cat([c.expand(T, 1, -1), grid], 1)) / 2


CASES = [  # (T, depth, btadapter_depth, width, heads, image, patch)
    (1, 2, 1, 32, 4, 28, 14),
    (3, 3, 3, 36, 3, 28, 14),  # head dim 12, branch beside every block
    (5, 3, 2, 44, 4, 42, 14),  # head dim 11, 9 patches
]


@pytest.mark.parametrize("T,depth,bt_depth,width,heads,image,patch", CASES)
def test_btadapter_matches_derivation(T, depth, bt_depth, width, heads, image, patch):
    vc = VisionConfig(image_size=image, patch_size=patch, width=width, depth=depth, num_heads=heads,
                      mlp_dim=2 * width + 3, btadapter=True, btadapter_depth=bt_depth)
    vision = ReferenceVision(vc).double()
    _randomize(vision, seed=T + depth)
    frames = torch.randn(T, 3, image, image, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = vision.vit_features(frames)
    want = derived_eva_btadapter(_official_vision(vision), frames, vc)
    assert got.shape == (T, vc.num_tokens, width)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_btadapter_branch_changes_output():
    """The branch is not a no-op: dropping it changes the features (guards a silent bypass)."""
    vc = VisionConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64,
                      btadapter=True, btadapter_depth=1)
    vision = ReferenceVision(vc).double()
    _randomize(vision, seed=3)
    frames = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    with_branch = vision.vit_features(frames)
    adapter, vision.btadapter = vision.btadapter, None
    without = vision.vit_features(frames)
    vision.btadapter = adapter
    assert (with_branch - without).abs().max() > 1e-3


def test_btadapter_frames_are_coupled():
    """Temporal attention mixes frames: changing frame 0 changes frame 1's features (not so for EVA)."""
    vc = VisionConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64,
                      btadapter=True, btadapter_depth=2)
    vision = ReferenceVision(vc).double()
    _randomize(vision, seed=5)
    frames = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    a = vision.vit_features(frames)
    frames2 = frames.clone()
    frames2[0] += 1.0
    b = vision.vit_features(frames2)
    assert (a[1] - b[1]).abs().max() > 1e-6


def test_btadapter_at_most_64_frames():
    vc = VisionConfig(image_size=14, patch_size=14, width=16, depth=1, num_heads=2, mlp_dim=32,
                      btadapter=True, btadapter_depth=1)
    vision = ReferenceVision(vc)
    vision.vit_features(torch.randn(64, 3, 14, 14))  # the limit itself is fine
    with pytest.raises(ValueError, match="at most 64 frames, got 65"):
        vision.vit_features(torch.randn(65, 3, 14, 14))
