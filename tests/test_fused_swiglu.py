"""The CPU prefill's gate_up GEMM + SwiGLU in one AMX kernel (csrc/amx_swiglu_cpu.cpp,
stllm_engine/model/fused_swiglu.py) against the unfused path.

Oracle: the gate_up product in float32 rounded to bfloat16 (what a bf16 GEMM returns), then torch's
bfloat16 ``F.silu(gate) * up``. The kernel accumulates in another order, so a gate or up value can
land one bf16 ulp away; nearly every output must still be bit-identical (a wrong rounding step in the
epilogue would change most of them) and all within bf16 tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stllm_engine.config import LLMConfig
from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.engine.sequence import Sequence
from stllm_engine.model import STLLMModel, fused_swiglu
from stllm_engine.model.llama import LlamaMLP
from stllm_engine.ops import _backend
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

C = _backend.cpp()
AMX = bool(C.amx_swiglu_available())
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16 tiles")


def oracle(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = (x.float() @ w.float().t()).to(torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def check(out: torch.Tensor, want: torch.Tensor, min_identical: float) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    scale = want.float().abs().max().item()
    assert (out.float() - want.float()).abs().max().item() <= 2e-2 * max(scale, 1e-3)
    assert (out == want).float().mean().item() >= min_identical


@needs_amx
@pytest.mark.parametrize("rows,k,inter", [(1, 64, 16), (5, 88, 33), (33, 100, 70), (64, 256, 128),
                                          (100, 1024, 176), (608, 512, 344)])
def test_kernel_matches_unfused(rows, k, inter):
    """Ragged rows (1, 33: not multiples of the 32-row block), K not a multiple of 32 (88, 100),
    I not a multiple of 16 (33, 70); K > 256 runs several k chunks, 608 rows several row blocks."""
    torch.manual_seed(rows + k)
    x = torch.randn(rows, k).to(torch.bfloat16)
    w = (torch.randn(2 * inter, k) / k ** 0.5).to(torch.bfloat16)
    packed = C.amx_swiglu_pack(w)
    check(C.amx_swiglu(x, packed, k, inter), oracle(x, w), 0.98)


@needs_amx
def test_kernel_strided_rows_and_reuse():
    """x rows with a stride past K (a column slice of a wider tensor); one packing serves calls of
    any row count."""
    torch.manual_seed(0)
    wide = torch.randn(70, 200).to(torch.bfloat16)
    x = wide[:, 8:104]  # [70, 96], row stride 200
    w = (torch.randn(2 * 48, 96) / 10).to(torch.bfloat16)
    packed = C.amx_swiglu_pack(w)
    check(C.amx_swiglu(x, packed, 96, 48), oracle(x, w), 0.98)
    check(C.amx_swiglu(x[:3], packed, 96, 48), oracle(x[:3], w), 0.98)
    assert C.amx_swiglu(x[:0], packed, 96, 48).shape == (0, 48)


@needs_amx
def test_kernel_errors_name_the_problem():
    w = torch.randn(2 * 16, 64).to(torch.bfloat16)
    packed = C.amx_swiglu_pack(w)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="packs to"):
        C.amx_swiglu(x, packed[:-1].clone(), 64, 16)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        C.amx_swiglu(x[:, :32], packed, 64, 16)
    with pytest.raises(RuntimeError, match="BFloat16"):
        C.amx_swiglu(x.float(), packed, 64, 16)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        C.amx_swiglu(torch.randn(64, 4).to(torch.bfloat16).t(), packed, 64, 16)
    with pytest.raises(RuntimeError, match=r"\[gate; up\]"):
        C.amx_swiglu_pack(torch.randn(33, 64).to(torch.bfloat16))


@needs_amx
def test_mlp_takes_the_kernel_for_prefill_rows_only():
    """LlamaMLP: prefill-sized bf16 inputs through the fused kernel (within bf16 rounding of the
    unfused MLP), decode-sized ones and autograd through the unfused path."""
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=64, hidden_size=96, intermediate_size=136, num_layers=1, num_heads=4,
                    num_kv_heads=4)
    mlp = LlamaMLP(cfg).to(torch.bfloat16)
    x = torch.randn(fused_swiglu.MIN_ROWS + 9, 96).to(torch.bfloat16)
    with torch.no_grad():
        want = mlp(x)
        assert fused_swiglu.swiglu(mlp, x) is None  # not packed yet
        packed = C.amx_swiglu_pack(mlp.gate_up_proj.weight)
        mlp.swiglu_packed = packed
        h = fused_swiglu.swiglu(mlp, x)
        check(h, oracle(x, mlp.gate_up_proj.weight), 0.98)
        got = mlp(x)
        assert fused_swiglu.swiglu(mlp, x[:fused_swiglu.MIN_ROWS]) is None
        assert fused_swiglu.swiglu(mlp, x.float()) is None
        mlp.swiglu_packed = None  # not chosen (pack_swiglu frees the copy)
        assert fused_swiglu.swiglu(mlp, x) is None
        mlp.swiglu_packed = packed
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * scale
    xg = x.clone().requires_grad_(True)
    assert fused_swiglu.swiglu(mlp, xg) is None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("swiglu") / "ckpt", vit="eva",
                                   video_input="all", seed=5, llm_vocab_size=400)
    return load_checkpoint(folder, progress=False)


def _prefill_logits(model, rows: int = 48) -> torch.Tensor:
    runner = ModelRunner(model)
    torch.manual_seed(1)
    seq = Sequence(list(range(5, 12)), SamplingParams(temperature=0.0),
                   video_embeds=torch.randn(rows - 7, model.config.llm.hidden_size).to(model.dtype), video_key="v")
    seq.block_table = list(range(-(-seq.num_tokens // model.block_size)))
    return runner.run([(seq, seq.num_tokens)])[0].float()


def test_pack_swiglu_modes(ckpt, monkeypatch):
    """``STLLM_CPU_FUSED_SWIGLU``: 0 packs nothing; 1 packs every layer (where AMX runs) and the
    prefill logits stay within bf16 rounding of the unfused model's; float32 models are left alone;
    packing twice does nothing; a bad value is named."""
    monkeypatch.setenv(fused_swiglu.ENV, "0")
    plain = STLLMModel.from_checkpoint(ckpt, "cpu", torch.bfloat16)
    plain.allocate_kv_cache(16, 4)
    want = _prefill_logits(plain)
    assert all(layer.mlp.swiglu_packed is None for layer in plain.llm.layers)
    monkeypatch.setenv(fused_swiglu.ENV, "1")
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.bfloat16)
    model.allocate_kv_cache(16, 4)
    got = _prefill_logits(model)
    layers = model.config.llm.num_layers
    runner = ModelRunner(model)
    assert runner.num_fused_swiglu == 0  # already packed by the first runner
    if AMX:
        assert all(layer.mlp.swiglu_packed is not None for layer in model.llm.layers)
        assert len(model.llm.layers) == layers
    else:
        assert all(layer.mlp.swiglu_packed is None for layer in model.llm.layers)
    assert (got - want).abs().max().item() <= 5e-2 * max(want.abs().max().item(), 1.0)
    assert fused_swiglu.describe(plain) == "gate_up gemm + swiglu"  # what kernels()["prefill_mlp"] reports
    assert fused_swiglu.describe(model) == ("amx gate_up+swiglu" if AMX else "gate_up gemm + swiglu")
    f32 = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    assert fused_swiglu.pack_swiglu(f32) == 0
    monkeypatch.setenv(fused_swiglu.ENV, "sometimes")
    with pytest.raises(ValueError, match="STLLM_CPU_FUSED_SWIGLU"):
        fused_swiglu.mode()



@needs_amx
@pytest.mark.parametrize("rows,k,inter", [(160, 1100, 40), (40, 2080, 24), (700, 1056, 16), (8200, 2080, 16)])
def test_kernel_wide_inputs(rows, k, inter):
    """K > 1024 runs k chunk by chunk with partial sums between chunks: threads split the rows
    (160, 700 rows; 700 also runs several row blocks a thread) or, with few rows, the panels (40);
    8200 x 2080 packs x into more than the 32 MiB a thread keeps (a fresh buffer for the call)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, k).to(torch.bfloat16)
    w = (torch.randn(2 * inter, k) / k ** 0.5).to(torch.bfloat16)
    check(C.amx_swiglu(x, C.amx_swiglu_pack(w), k, inter), oracle(x, w), 0.98)


@needs_amx
def test_wide_models_take_the_kernel_from_more_rows():
    """Inputs wider than WIDE_FEATURES take the kernel only above MIN_ROWS_WIDE rows (at fewer the
    weight streaming dominates and the unfused path was as fast or faster)."""
    from stllm_engine.model.llama import LlamaMLP

    k = fused_swiglu.WIDE_FEATURES + 32
    cfg = LLMConfig(vocab_size=64, hidden_size=k, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=4)
    mlp = LlamaMLP(cfg).to(torch.bfloat16)
    mlp.swiglu_packed = C.amx_swiglu_pack(mlp.gate_up_proj.weight)
    with torch.no_grad():
        assert fused_swiglu.swiglu(mlp, torch.randn(fused_swiglu.MIN_ROWS_WIDE, k).bfloat16()) is None
        x = torch.randn(fused_swiglu.MIN_ROWS_WIDE + 1, k).bfloat16()
        check(fused_swiglu.swiglu(mlp, x), oracle(x, mlp.gate_up_proj.weight), 0.98)
