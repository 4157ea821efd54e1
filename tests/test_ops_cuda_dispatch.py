"""The CUDA attention dispatch's CPU-visible parts: the ``STLLM_CUDA_ATTENTION`` switch, the kernel
names reports show, and that ``uniform=True`` changes nothing on the CPU. The CUDA paths
themselves are compared against a float32 twin in ``test_engine_cuda.py`` on a GPU."""
import pytest
import torch

from stllm_engine import ops
from stllm_engine.ops.attention import cuda_attention_kernel


def test_switch_picks_the_kernel(monkeypatch):
    monkeypatch.delenv("STLLM_CUDA_ATTENTION", raising=False)
    assert cuda_attention_kernel(uniform=True) == "torch-sdpa"
    assert cuda_attention_kernel(uniform=False) == "triton"
    monkeypatch.setenv("STLLM_CUDA_ATTENTION", "triton")
    assert cuda_attention_kernel(uniform=True) == "triton"
    monkeypatch.setenv("STLLM_CUDA_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="STLLM_CUDA_ATTENTION='cudnn': expected one of auto, triton"):
        cuda_attention_kernel(uniform=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_flag_is_a_no_op_on_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3 * 17, 2, 88, generator=g).to(dtype) for _ in range(3))
    cu = torch.arange(0, 4, dtype=torch.int32) * 17
    a = ops.varlen_attention(q, k, v, cu, cu, 17, 17, False, uniform=True)
    b = ops.varlen_attention(q, k, v, cu, cu, 17, 17, False)
    assert torch.equal(a, b)
