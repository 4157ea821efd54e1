"""The engine's video side against the reference (transformers InstructBLIP + plain-PyTorch
BT-Adapter) on tiny official-layout checkpoints of every variant, vision head dim 88.

Compared: ViT (+ BT-Adapter) output before ln_vision, ln_vision features, Q-Former query states for
a question, and the final video tokens (all / mean / residual), in float32 (tight) and bfloat16 /
float16 (no worse than twice the reference's own error in that dtype, flash-attention's rule).
"""
from __future__ import annotations

import pytest
import torch

from stllm_engine.model import STLLMModel
from stllm_engine.reference import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

VARIANTS = [(v, i) for v in ("eva", "btadapter") for i in ("all", "mean", "residual")]
SIZES = dict(vision_width=176, vision_num_heads=2, vision_mlp_dim=64, num_frames=6)  # head dim 88, as EVA-g
QUESTION = "What does the red square do after it reaches the left edge of the frame?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_video")
    return {(v, i): write_tiny_checkpoint(root / f"{v}-{i}", vit=v, video_input=i, seed=3, **SIZES)
            for v, i in VARIANTS}


_CACHE: dict = {}


def _models(folders, variant, dtype):
    key = (variant, dtype)
    if key not in _CACHE:
        ckpt = load_checkpoint(folders[variant], dtype=dtype, progress=False)
        _CACHE[key] = (STLLMModel.from_checkpoint(ckpt, "cpu", dtype),
                       ReferenceSTLLM.from_pretrained(folders[variant], dtype=dtype))
    return _CACHE[key]


def _frames(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _check(out, ref32, ref_low=None, rtol=1e-4):
    """fp32: max error <= rtol * max|ref|; low precision: <= 2 * the reference's own error."""
    assert out.shape == ref32.shape
    err = (out.float() - ref32.float()).abs().max().item()
    scale = ref32.abs().max().item()
    if ref_low is None:
        assert err <= rtol * scale, f"max error {err:.3g} > {rtol * scale:.3g}"
    else:
        base = (ref_low.float() - ref32.float()).abs().max().item()
        assert err <= 2 * base + 1e-3 * scale, f"max error {err:.3g}, reference's own {base:.3g}"


@pytest.mark.parametrize("vit", ["eva", "btadapter"])
@pytest.mark.parametrize("num_frames", [1, 5])
def test_vision_fp32(folders, vit, num_frames):
    eng, ref = _models(folders, (vit, "all"), torch.float32)
    frames = _frames(num_frames)
    with torch.no_grad():
        _check(eng.visual_encoder(frames), ref.vision.vit_features(frames))  # ViT (+ BT-Adapter)
    _check(eng.encode_vision(frames), ref.encode_vision(frames))  # + ln_vision


@pytest.mark.parametrize("vit,dtype", [("eva", torch.bfloat16), ("btadapter", torch.bfloat16),
                                       ("btadapter", torch.float16)])
def test_vision_low_precision(folders, vit, dtype):
    eng, ref_low = _models(folders, (vit, "all"), dtype)
    _, ref32 = _models(folders, (vit, "all"), torch.float32)
    frames = _frames(4, seed=1)
    out = eng.encode_vision(frames)
    assert out.dtype == dtype
    _check(out, ref32.encode_vision(frames), ref_low.encode_vision(frames))


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: LayerNorm eps (1e-5 vs 1e-6) matters
def test_btadapter_branch_steps(folders, scale):
    """Each branch layer alone (same main-path input), merged, against the reference's steps."""
    eng, ref = _models(folders, ("btadapter", "all"), torch.float32)
    g = torch.Generator().manual_seed(6)
    pos = eng.visual_encoder.pos_embed * scale
    depth = eng.config.vision.btadapter_depth
    x = [torch.randn(5, 17, 176, generator=g) * scale for _ in range(depth)]
    ours = theirs = None
    with torch.no_grad():
        for j in range(depth):
            ours = eng.visual_encoder.btadapter.layer(j, x[j], ours, pos)
            theirs = ref.vision.btadapter.step(x[j], theirs, j, pos)
            _check(eng.visual_encoder.btadapter.merge(x[j], ours),
                   ref.vision.btadapter.merge(x[j], theirs))


@pytest.mark.parametrize("question", ["what happens?", "", QUESTION * 6])  # the last is truncated
def test_qformer_states_fp32(folders, question):
    eng, ref = _models(folders, ("eva", "all"), torch.float32)
    feats = ref.encode_vision(_frames(3, seed=2))
    ids, mask = ref.qformer_inputs(question)
    assert torch.equal(eng.qformer_ids(question), ids[0])  # same tokens, left truncation
    assert ids.shape[1] <= eng.config.qformer.max_txt_len
    with torch.no_grad():
        _check(eng.qformer(feats, eng.qformer_ids(question)), ref.qformer(feats, ids, mask))


def test_qformer_depends_on_question_and_frame(folders):
    eng, _ = _models(folders, ("eva", "all"), torch.float32)
    feats = eng.encode_vision(_frames(2, seed=4))
    with torch.no_grad():
        a = eng.qformer(feats, eng.qformer_ids("is it red?"))
        b = eng.qformer(feats, eng.qformer_ids("where does it go?"))
    assert not torch.allclose(a, b, atol=1e-4)  # instruction-aware
    assert not torch.allclose(a[0], a[1], atol=1e-4)  # per frame


CASES = [(v, torch.float32) for v in VARIANTS] + [(("eva", "residual"), torch.bfloat16),
                                                  (("btadapter", "all"), torch.bfloat16)]


@pytest.mark.parametrize("variant,dtype", CASES, ids=lambda x: "/".join(x) if isinstance(x, tuple)
                         else str(x).removeprefix("torch."))
def test_video_tokens(folders, variant, dtype):
    eng, ref_low = _models(folders, variant, dtype)
    _, ref32 = _models(folders, variant, torch.float32)
    cfg = eng.config
    frames = _frames(cfg.num_frames, seed=5)
    tokens = eng.encode_video(eng.encode_vision(frames), QUESTION)
    q, t = cfg.tokens_per_frame, cfg.num_frames
    expect_len = {"all": t * q, "mean": q, "residual": cfg.residual_size * q}[cfg.video_input]
    assert tokens.shape == (expect_len, cfg.llm.hidden_size) and tokens.dtype == dtype
    ref_tokens = ref32.encode_video(frames, QUESTION)
    if dtype == torch.float32:
        _check(tokens, ref_tokens)
    else:
        _check(tokens, ref_tokens, ref_low.encode_video(frames, QUESTION))


def test_bad_inputs_raise(folders):
    eng, _ = _models(folders, ("btadapter", "residual"), torch.float32)
    with pytest.raises(ValueError, match="frames"):
        eng.encode_vision(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="at most 64 frames"):
        eng.encode_vision(torch.randn(65, 3, 56, 56))
    feats = eng.encode_vision(_frames(2))
    with pytest.raises(ValueError, match="enough frames"):  # 4 local frames out of 2
        eng.encode_video(feats, "why?")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("num_frames", [3, 6, 9])
def test_config_counts_the_video_tokens_the_model_makes(folders, variant, num_frames):
    """STLLMConfig.num_video_tokens (the benchmarks' and the GEMM calibration's count) is the
    length of what the engine's and the reference's video pass return, at the config's frame
    count and others (3 < residual_size 4: global-local still gives 4 local frames' tokens)."""
    eng, ref = _models(folders, variant, torch.float32)
    frames = _frames(num_frames)
    with torch.no_grad():
        got = eng.encode_video(eng.encode_vision(frames), QUESTION)
    assert got.shape[0] == ref.encode_video(frames, QUESTION).shape[0] == eng.config.num_video_tokens(num_frames)
    assert eng.config.num_video_tokens() == eng.config.num_video_tokens(eng.config.num_frames)
