"""Packing without a second copy of the weights: STLLM_CPU_PACKED=auto|both|only|0.

When the packed copies would not fit beside the plain weights (ST-LLM-7B's ~13 GB of bf16 LLM
weights twice on a 24 GB machine), each packed module frees its plain weight; the model then runs
CPU inference through the packed GEMMs only, with the same greedy tokens and logits within GEMM
rounding, and any other use of a freed module fails with an error naming the setting.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn

from stllm_engine.engine.llm_engine import EngineConfig, LLMEngine
from stllm_engine.model import STLLMModel
from stllm_engine.model import packed_linear as pl
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.prefill import prefill_logits
from stllm_engine.testing.videos import write_video
from stllm_engine.tokenizers import load_llama_tokenizer
from stllm_engine.weights import load_checkpoint

needs_onednn = pytest.mark.skipif(not pl.packing_available(torch.zeros(1)),
                                  reason="oneDNN linear packing is not available in this torch build")


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "both"),
                                        ("both", "both"), ("ON", "both"), ("only", "only"), ("0", "0"),
                                        ("off", "0"), ("false", "0")])
def test_packing_mode(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv(pl.ENV, raising=False)
    else:
        monkeypatch.setenv(pl.ENV, value)
    assert pl.packing_mode() == mode


def test_bad_packing_mode_names_the_setting(monkeypatch):
    monkeypatch.setenv(pl.ENV, "sometimes")
    with pytest.raises(ValueError, match="STLLM_CPU_PACKED must be .*'sometimes'"):
        pl.packing_mode()


@pytest.mark.parametrize("mode,avail,extra,keep", [
    ("auto", 64 << 30, 13 << 30, True),
    ("auto", 24 << 30, 13 << 30, True),
    ("auto", 9 << 30, 13 << 30, False),  # a 24 GB machine already holding 13 GB of weights
    ("auto", 14 << 30, 13 << 30, False),  # fits, but less than 2 GiB would be left
    ("auto", 3 << 30, 3 << 29, False),  # 1.5 GiB more would leave less than 2 GiB
    ("auto", 4 << 30, 1 << 30, True),
    ("auto", None, 1 << 40, True),  # unknown: keep both (the old behaviour)
    ("both", 1 << 30, 1 << 40, True),
    ("only", 1 << 40, 1, False),
])
def test_keep_plain_copies(monkeypatch, mode, avail, extra, keep):
    monkeypatch.setenv(pl.ENV, mode)
    monkeypatch.setattr(pl, "memory_available", lambda: avail)
    assert pl.keep_plain_copies(extra) is keep


def test_memory_available_reads_meminfo():
    avail = pl.memory_available()
    assert avail is None or avail > 0


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33, 300])
def test_packed_only_linear_matches_and_frees_the_weight(dtype, rows):
    torch.manual_seed(rows)
    lin = nn.Linear(88, 40, bias=rows % 2 == 1).to(dtype)
    want_fn = nn.Linear(88, 40, bias=lin.bias is not None).to(dtype)
    want_fn.load_state_dict(lin.state_dict())
    ref = weakref.ref(lin.weight)
    packed = pl.PackedLinear(lin, drop_plain=True)
    del lin
    gc.collect()
    assert packed.weight is None and ref() is None  # the plain weight's memory is gone
    assert "plain weight freed" in repr(packed)
    x = torch.randn(rows, 88, dtype=dtype)
    with torch.no_grad():
        got, want = packed(x), want_fn(x)
        gelu = pl.PackedLinearGELU(nn.Linear(88, 40).to(dtype), drop_plain=True)
        assert gelu(x).shape == (rows, 40)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    with pytest.raises(RuntimeError, match="plain copy was freed.*STLLM_CPU_PACKED=both"):
        packed(x.double())  # another dtype
    with pytest.raises(RuntimeError, match="plain copy was freed"):
        packed(torch.randn(2, 88, dtype=dtype, requires_grad=True))  # autograd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed_memory")
    folder = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=5)
    return folder, write_video(d / "clip.mp4", num_frames=12, size=(64, 48), seed=2)


def engine(folder, dtype):
    model = STLLMModel.from_checkpoint(load_checkpoint(folder, progress=False), "cpu", dtype)
    return LLMEngine(model, load_llama_tokenizer(folder), EngineConfig(block_size=8, num_kv_blocks=64))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_only_engine_answers_like_both(tiny, dtype, monkeypatch):
    """STLLM_CPU_PACKED=only: every packed module of the LLM, ViT and Q-Former holds only its
    packed weight, and the engine gives the greedy tokens of the engine that keeps both copies in
    float32, first-token logits within GEMM rounding (bf16: within bf16 rounding)."""
    folder, video = tiny
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    outs, firsts = {}, {}
    for mode in ("both", "only"):
        monkeypatch.setenv(pl.ENV, mode)
        eng = engine(folder, dtype)
        packed = [m for m in eng.model.modules() if isinstance(m, pl.PackedLinear)]
        assert len(packed) > 4 * eng.model.config.llm.num_layers
        assert all((m.weight is None) == (mode == "only") for m in packed)
        assert eng.model.dtype == dtype
        rid = eng.add_request(video, "what moves?", params)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[mode] = o.token_ids
        pv = eng.prepare_video(video, "what moves?")
        ids = torch.tensor(eng.prompt_ids("what moves?"))
        x = torch.cat([pv.tokens, eng.model.embed_tokens(ids)]).to(dtype)
        firsts[mode] = prefill_logits(eng.model, x)[0]
        assert rid
    assert len(outs["only"]) == len(outs["both"]) == 6
    if dtype == torch.float32:  # bf16: the two GEMM paths round differently and tokens may drift
        assert outs["only"] == outs["both"]
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    scale = max(firsts["both"].abs().max().item(), 1.0)
    assert (firsts["only"] - firsts["both"]).abs().max().item() <= atol * scale


@needs_onednn
def test_auto_frees_the_plain_weights_only_when_memory_is_short(tiny, monkeypatch):
    folder, _ = tiny
    monkeypatch.setenv(pl.ENV, "auto")
    monkeypatch.setattr(pl, "memory_available", lambda: 64 << 30)
    roomy = engine(folder, torch.float32)
    assert all(m.weight is not None for m in roomy.model.modules() if isinstance(m, pl.PackedLinear))
    monkeypatch.setattr(pl, "memory_available", lambda: 1 << 30)  # under the 2 GiB headroom
    tight = engine(folder, torch.float32)
    packed = [m for m in tight.model.modules() if isinstance(m, pl.PackedLinear)]
    assert packed and all(m.weight is None for m in packed)
