"""Video-token projector of the reference: all / mean / global-local (residual)."""
import pytest
import torch

from stllm_engine.reference.projector import VideoProjector, residual_indices


@pytest.mark.parametrize("R,T,want", [
    (16, 64, list(range(2, 64, 4))),
    (16, 16, list(range(16))),
    (4, 6, [0, 2, 3, 4]),    # seg 1.5: int(0.75 + round(1.5 i)); numpy rounds 1.5 -> 2, 4.5 -> 4
    (16, 20, [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19]),
    (1, 7, [3]),
])
def test_residual_indices(R, T, want):
    assert residual_indices(R, T) == want


def test_residual_indices_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        residual_indices(0, 4)


@pytest.mark.parametrize("T", [1, 3])
def test_all_and_mean(T):
    x = torch.randn(T, 5, 8)
    torch.testing.assert_close(VideoProjector("all", 8, 4, 2)(x), torch.cat(list(x)))
    torch.testing.assert_close(VideoProjector("mean", 8, 4, 2)(x), x.mean(0))


@pytest.mark.parametrize("T,R", [(4, 4), (9, 4), (64, 16)])
def test_global_local_formula(T, R):
    p = VideoProjector("residual", 8, R, 3)
    torch.nn.init.normal_(p.up_proj.weight)
    x = torch.randn(T, 5, 8, dtype=torch.float64)
    p = p.double()
    g = x.mean(0)
    g = torch.relu(g @ p.down_proj.weight.T + p.down_proj.bias) @ p.up_proj.weight.T + p.up_proj.bias
    want = torch.cat([x[i] + g for i in residual_indices(R, T)])
    out = p(x)
    assert out.shape == (R * 5, 8)
    torch.testing.assert_close(out, want)


def test_bad_mode_and_shape():
    with pytest.raises(ValueError, match="unsupported video_input 'sum'"):
        VideoProjector("sum", 8, 4, 2)
    with pytest.raises(ValueError, match=r"\[T, Q, H\]"):
        VideoProjector("all", 8, 4, 2)(torch.zeros(5, 8))
