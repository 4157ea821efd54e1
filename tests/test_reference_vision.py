"""InstructBLIP vision + key mapping == a plain-torch EVA ViT written from the release facts."""
import pytest
import torch
import torch.nn.functional as F

from stllm_engine.config import VisionConfig
from stllm_engine.reference.keymap import VISION_PREFIX, reference_to_official
from stllm_engine.reference.vision import ReferenceVision


def plain_eva(W: dict, frames: torch.Tensor, vc: VisionConfig) -> torch.Tensor:
    """EVA ViT-g forward from its published structure, on official key names (no final norm)."""
    x = F.conv2d(frames, W["patch_embed.proj.weight"], W["patch_embed.proj.bias"], stride=vc.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([W["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + W["pos_embed"]
    B, N, D = x.shape
    h, hd = vc.num_heads, vc.head_dim
    for i in range(vc.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (D,), W[p + "norm1.weight"], W[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([W[p + "attn.q_bias"], torch.zeros(D, dtype=x.dtype), W[p + "attn.v_bias"]])
        qkv = F.linear(y, W[p + "attn.qkv.weight"], bias).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(y, W[p + "attn.proj.weight"], W[p + "attn.proj.bias"])
        y = F.layer_norm(x, (D,), W[p + "norm2.weight"], W[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, W[p + "mlp.fc1.weight"], W[p + "mlp.fc1.bias"])),
                     W[p + "mlp.fc2.weight"], W[p + "mlp.fc2.bias"])
        x = x + y
    return x


def _random_official(vc: VisionConfig, seed: int) -> dict:
    """Random official EVA weights (norm weights near 1), built without the reference model."""
    g = torch.Generator().manual_seed(seed)
    D, P = vc.width, vc.patch_size
    r = lambda *s: 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W = {"cls_token": r(1, 1, D), "pos_embed": r(1, vc.num_tokens, D),
         "patch_embed.proj.weight": r(D, 3, P, P), "patch_embed.proj.bias": r(D)}
    for i in range(vc.depth):
        p = f"blocks.{i}."
        W.update({p + "norm1.weight": 1 + r(D) / 3, p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
                  p + "attn.q_bias": r(D), p + "attn.v_bias": r(D), p + "attn.proj.weight": r(D, D),
                  p + "attn.proj.bias": r(D), p + "norm2.weight": 1 + r(D) / 3, p + "norm2.bias": r(D),
                  p + "mlp.fc1.weight": r(vc.mlp_dim, D), p + "mlp.fc1.bias": r(vc.mlp_dim),
                  p + "mlp.fc2.weight": r(D, vc.mlp_dim), p + "mlp.fc2.bias": r(D)})
    return W


@pytest.mark.parametrize("T,width,heads,image", [(1, 32, 4, 28), (3, 44, 4, 42)])
def test_mapped_instructblip_equals_plain_eva(T, width, heads, image):
    from stllm_engine.reference.keymap import official_to_reference

    vc = VisionConfig(image_size=image, patch_size=14, width=width, depth=2, num_heads=heads, mlp_dim=2 * width + 5)
    W = _random_official(vc, seed=T)
    vision = ReferenceVision(vc).double()
    official = {VISION_PREFIX + "visual_encoder." + k: v for k, v in W.items()}
    official[VISION_PREFIX + "ln_vision.weight"] = torch.ones(width, dtype=torch.float64)
    official[VISION_PREFIX + "ln_vision.bias"] = torch.zeros(width, dtype=torch.float64)
    mapped = official_to_reference(official).state_dict
    vision.load_state_dict({k[len("vision."):]: v for k, v in mapped.items()}, strict=True)
    frames = torch.randn(T, 3, image, image, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = plain_eva(W, frames, vc)
    torch.testing.assert_close(vision.vit_features(frames), want, rtol=1e-10, atol=1e-10)
    # ln_vision: LayerNorm eps 1e-5 (LAVIS default), no final norm inside the ViT
    torch.testing.assert_close(vision(frames), F.layer_norm(want, (width,), eps=1e-5), rtol=1e-10, atol=1e-10)


def test_qkv_bias_packing_round_trip():
    vc = VisionConfig(image_size=14, patch_size=14, width=8, depth=1, num_heads=2, mlp_dim=16)
    W = _random_official(vc, seed=0)
    from stllm_engine.reference.keymap import official_to_reference

    official = {VISION_PREFIX + "visual_encoder." + k: v for k, v in W.items()}
    mapped = official_to_reference(official).state_dict
    bias = mapped["vision.vit.encoder.layers.0.self_attn.qkv.bias"]
    torch.testing.assert_close(bias, torch.cat([W["blocks.0.attn.q_bias"], torch.zeros(8, dtype=torch.float64),
                                                W["blocks.0.attn.v_bias"]]))
    back = reference_to_official(mapped)
    assert set(back) == set(official)
    for k, v in official.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("shape", [(2, 3, 28, 14), (2, 1, 28, 28), (3, 28, 28), (0, 3, 28, 28)])
def test_bad_frames_raise_clear_error(shape):
    vision = ReferenceVision(VisionConfig(image_size=28, patch_size=14, width=8, depth=1, num_heads=2, mlp_dim=16))
    with pytest.raises(ValueError, match="frames must"):
        vision(torch.zeros(shape))
