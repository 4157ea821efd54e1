"""Dynamic video-token masking (ST-LLM training, STLLM_REFERENCE.md section 6).

One mask rate per step, ``rate ~ N(mean, std)`` clipped to ``[low, high]``; every sample of the
batch drops its own random ``int(rate * L)`` of its L video tokens. The kept tokens keep their
order and are packed without padding: with one rate per step every sample keeps the same count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MaskingConfig:
    """Mask-rate distribution; ``enabled=False`` keeps every token (and disables MVM)."""

    enabled: bool = True
    mean: float = 0.5
    std: float = 0.1
    low: float = 0.1
    high: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high < 1.0:
            raise ValueError(f"mask rate bounds need 0 <= low <= high < 1, got {self.low}, {self.high}")
        if self.std < 0:
            raise ValueError(f"mask rate std must be >= 0, got {self.std}")


@dataclass
class MaskedVideo:
    tokens: torch.Tensor  # [B, Lk, D] kept tokens, original order
    keep: torch.Tensor  # [B, L] bool
    kept_index: torch.Tensor  # [B, Lk] int64, position of each kept token in its sample
    rate: float


def sample_mask_rate(rng: np.random.Generator, cfg: MaskingConfig = MaskingConfig()) -> float:
    """One step's mask rate: ``clip(N(mean, std), low, high)``."""
    return float(np.clip(rng.normal(cfg.mean, cfg.std), cfg.low, cfg.high))


def random_keep_mask(batch: int, length: int, rate: float,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Bool [batch, length]: each row drops its own random ``int(rate * length)`` positions."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"mask rate must be in [0, 1), got {rate}")
    if batch <= 0 or length <= 0:
        raise ValueError(f"need batch > 0 and length > 0, got {batch}, {length}")
    n_drop = int(rate * length)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep.scatter_(1, order[:, :n_drop], False)
    return keep.to(device) if device is not None else keep


def pack_kept(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept rows of ``x`` [B, L, D] as [B, Lk, D] (order kept) and their positions [B, Lk].

    Every row of ``keep`` must keep the same count. Differentiable w.r.t. ``x``; uses
    ``stllm_engine.ops.pack_by_mask`` when the ops layer provides it.
    """
    if x.dim() != 3 or keep.shape != x.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(f"need x [B, L, D] and bool keep [B, L], got {tuple(x.shape)}, "
                         f"{tuple(keep.shape)} {keep.dtype}")
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must keep the same number of tokens, got {counts.tolist()}")
    b, l, d = x.shape
    lk = int(counts[0])
    keep = keep.to(x.device)
    try:
        from stllm_engine.ops import pack_by_mask
    except ImportError:
        pack_by_mask = None
    if pack_by_mask is not None:
        packed, _, src_index = pack_by_mask(x, keep)
    else:
        src_index = keep.reshape(-1).nonzero().squeeze(1)  # ascending: b-major, order kept
        packed = x.reshape(b * l, d).index_select(0, src_index)
    return packed.reshape(b, lk, d), (src_index % l).reshape(b, lk)


def apply_dynamic_mask(x: torch.Tensor, rate: float,
                       generator: torch.Generator | None = None) -> MaskedVideo:
    """Drop ``int(rate * L)`` random video tokens of each sample of ``x`` [B, L, D]."""
    keep = random_keep_mask(x.shape[0], x.shape[1], rate, generator, device=x.device)
    tokens, kept_index = pack_kept(x, keep)
    return MaskedVideo(tokens, keep, kept_index, rate)
