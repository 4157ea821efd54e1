"""Training losses: LM loss on the answer tokens, and masked video modelling (MVM).

MVM (STLLM_REFERENCE.md section 6): the masked run's last-layer hidden states at its video
positions go through ``mvm_decoder`` (Linear(H, H) + LayerNorm); the target is the unmasked run's
(no grad) last-layer hidden states at the kept video positions; both are L2-normalised and
``loss = mean(2 - 2 * cos)`` over every kept token of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class MVMDecoder(nn.Module):
    """``mvm_decoder``: Linear(H, H) then LayerNorm(H); keys ``head.*`` and ``norm.*``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(x))


class FrameReconHead(nn.Module):
    """Auxiliary (training only, never saved in the official folder): one frame's video tokens
    ``[Q, H]`` (flattened) -> that frame at ``grid x grid`` resolution ``[3, grid, grid]``, linear.
    Its loss makes the per-frame tokens keep *where* things are (a linear read-out of a low-res
    image), which the LM loss alone did not teach the Q-Former (see default_model.md)."""

    def __init__(self, tokens_per_frame: int, hidden: int, grid: int = 8) -> None:
        super().__init__()
        self.grid = grid
        self.head = nn.Linear(tokens_per_frame * hidden, 3 * grid * grid)

    def forward(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """``[..., Q, H]`` -> ``[..., 3, grid, grid]``."""
        out = self.head(frame_tokens.flatten(-2))
        return out.unflatten(-1, (3, self.grid, self.grid))


def frame_recon_loss(pred: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """MSE between ``pred`` ``[T, 3, g, g]`` and ``frames`` ``[T, 3, S, S]`` average-pooled to g x g."""
    target = F.adaptive_avg_pool2d(frames.float(), pred.shape[-1])
    return F.mse_loss(pred.float(), target)


def mvm_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(2 - 2 cos(pred, target))`` over the last dim; ``pred``/``target`` [..., H] (float32)."""
    if pred.shape != target.shape:
        raise ValueError(f"MVM pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    return (2 - 2 * (p * t).sum(dim=-1)).mean()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position s predicts ``labels[s + 1]``; ``-100`` is ignored.

    ``logits`` [B, S, V], ``labels`` [B, S] (the answer tokens, everything else -100).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        raise ValueError("no answer tokens to train on (all labels are -100)")
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden`` [B, S, H] at ``positions`` [B, K] (int64) -> [B, K, H]."""
    idx = positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)
