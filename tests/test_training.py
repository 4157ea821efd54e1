"""Training building blocks: mask-rate distribution, keep masks, packing, losses, lr schedule."""
import math

import numpy as np
import pytest
import torch

import stllm_engine.ops
from stllm_engine.training import (MaskingConfig, MVMDecoder, apply_dynamic_mask, lm_loss,
                                   lr_factor, mvm_loss, pack_kept, random_keep_mask, sample_mask_rate)
from stllm_engine.training.losses import gather_positions


def test_mask_rate_distribution():
    rng = np.random.default_rng(0)
    r = np.array([sample_mask_rate(rng) for _ in range(20000)])
    assert r.min() >= 0.1 and r.max() <= 0.7
    assert abs(r.mean() - 0.5) < 0.005 and abs(r.std() - 0.1) < 0.005
    assert abs(np.mean(r > 0.6) - 0.1587) < 0.01  # one sigma above the mean


def test_mask_rate_clipping():
    rng = np.random.default_rng(1)
    cfg = MaskingConfig(mean=0.65, std=0.2)
    r = np.array([sample_mask_rate(rng, cfg) for _ in range(20000)])
    assert r.max() == 0.7 and r.min() == 0.1
    assert abs(np.mean(r == 0.7) - 0.4013) < 0.015  # P(z > 0.25)
    assert abs(np.mean(r == 0.1) - 0.0030) < 0.003  # P(z < -2.75)


@pytest.mark.parametrize("bad", [dict(low=0.5, high=0.4), dict(high=1.0), dict(low=-0.1), dict(std=-1)])
def test_masking_config_errors(bad):
    with pytest.raises(ValueError):
        MaskingConfig(**bad)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 64, 512])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.7, 0.99])
def test_keep_mask_counts(batch, length, rate):
    keep = random_keep_mask(batch, length, rate, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == (batch, length)
    assert keep.sum(1).tolist() == [length - int(rate * length)] * batch


def test_keep_mask_random_per_sample_and_seeded():
    a = random_keep_mask(4, 128, 0.5, torch.Generator().manual_seed(3))
    b = random_keep_mask(4, 128, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 4
    # every position is dropped about half the time over many samples
    many = random_keep_mask(4000, 16, 0.5, torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.all((many - 0.5).abs() < 0.04)


@pytest.mark.parametrize("bad", [(-0.1, 3, 4), (1.0, 3, 4), (0.5, 0, 4), (0.5, 3, 0)])
def test_keep_mask_errors(bad):
    rate, b, l = bad
    with pytest.raises(ValueError):
        random_keep_mask(b, l, rate)


@pytest.mark.parametrize("use_ops", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,rate", [((1, 1, 4), 0.5), ((2, 9, 5), 0.34), ((3, 96, 8), 0.7),
                                        ((5, 33, 3), 0.0)])
def test_pack_keeps_order_and_gradient(monkeypatch, use_ops, dtype, shape, rate):
    if not use_ops:
        monkeypatch.delattr(stllm_engine.ops, "pack_by_mask")
    b, l, d = shape
    x = torch.randn(b, l, d).to(dtype).requires_grad_(True)
    m = apply_dynamic_mask(x, rate, torch.Generator().manual_seed(1))
    lk = l - int(rate * l)
    assert m.tokens.shape == (b, lk, d) and m.tokens.dtype == dtype and m.kept_index.shape == (b, lk)
    for i in range(b):
        idx = m.kept_index[i]
        assert torch.all(idx[1:] > idx[:-1])  # original order
        assert torch.equal(m.keep[i].nonzero().squeeze(1), idx)
        assert torch.equal(m.tokens[i], x[i, idx])
    (m.tokens.float() * 2).sum().backward()
    assert torch.equal(x.grad.float()[..., 0], 2 * m.keep.float())


def test_pack_rejects_unequal_counts():
    keep = torch.tensor([[True, False, True], [True, True, True]])
    with pytest.raises(ValueError, match="same number"):
        pack_kept(torch.zeros(2, 3, 4), keep)
    with pytest.raises(ValueError, match="bool keep"):
        pack_kept(torch.zeros(2, 3, 4), keep.int())


def test_mvm_loss_by_hand():
    pred = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    target = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]])
    # cosines 1, 0, -1 -> 2 - 2cos = 0, 2, 4 -> mean 2
    assert mvm_loss(pred, target).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    by_hand = np.mean([2 - 2 * float(p[i, j] @ t[i, j]) / float(p[i, j].norm() * t[i, j].norm())
                       for i in range(2) for j in range(3)])
    assert mvm_loss(p, t).item() == pytest.approx(by_hand, rel=1e-5)
    assert mvm_loss(p * 7.0, t * 0.1).item() == pytest.approx(by_hand, rel=1e-5)  # scale-free
    assert mvm_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        mvm_loss(p, t[:, :2])


def test_mvm_decoder_is_linear_then_layernorm():
    dec = MVMDecoder(6)
    assert sorted(dec.state_dict()) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    x = torch.randn(2, 6)
    h = x @ dec.head.weight.T + dec.head.bias
    ref = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(dec(x), ref * dec.norm.weight + dec.norm.bias)


def test_lm_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[0, 4], labels[1, 2] = 4, 1, 6
    lp = torch.log_softmax(logits, -1)
    by_hand = -(lp[0, 2, 4] + lp[0, 3, 1] + lp[1, 1, 6]) / 3  # position s predicts s + 1
    assert lm_loss(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="no answer tokens"):
        lm_loss(logits, torch.full((2, 5), -100))


def test_gather_positions():
    h = torch.arange(2 * 6 * 3).float().view(2, 6, 3)
    pos = torch.tensor([[0, 5], [2, 3]])
    out = gather_positions(h, pos)
    assert torch.equal(out[0, 1], h[0, 5]) and torch.equal(out[1, 0], h[1, 2])


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (5, 5), (10, 1000)])
def test_lr_schedule(warmup, total):
    f = [lr_factor(s, warmup, total, 0.1) for s in range(total + 1)]
    if warmup:
        assert f[0] == pytest.approx(1 / warmup) and f[warmup - 1] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(f[:warmup - 1], f[1:warmup]))
    after = f[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))
    assert max(f) <= 1.0 + 1e-12
    if total > warmup:
        assert f[total] == pytest.approx(0.1)
    if total - warmup >= 2:
        mid = warmup + (total - warmup) // 2
        exact = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (total - warmup)))
        assert f[mid] == pytest.approx(exact)
