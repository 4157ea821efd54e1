"""One training forward: batch assembly, dynamic masking, LM loss + MVM loss.

Per sample the LLM input is ``[before] [video tokens] [after] [target]`` (see ``data.py``); the
batch is right-padded (attention mask) because the text parts differ in length. With masking on,
every sample keeps ``L - int(rate * L)`` video tokens (one rate per step), so the masked video
parts still line up; the MVM target comes from an extra no-grad run on the unmasked sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stllm_engine.training.data import Example
from stllm_engine.training.losses import (IGNORE_INDEX, frame_recon_loss, gather_positions, lm_loss,
                                          mvm_loss)
from stllm_engine.training.masking import apply_dynamic_mask
from stllm_engine.training.model import TrainableSTLLM


@dataclass
class StepOutput:
    loss: torch.Tensor  # lm + mvm (what is back-propagated)
    lm: float
    mvm: float | None  # None when masking or MVM is off
    mask_rate: float  # 0 when masking is off
    video_tokens: int  # per sample, after masking
    recon: float | None = None  # auxiliary frame-reconstruction loss (None when off)


@dataclass
class Assembled:
    embeds: torch.Tensor  # [B, S, H]
    attention_mask: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, -100 outside the targets
    video_start: torch.Tensor  # [B] int64, first video position of each sample


def assemble(model: TrainableSTLLM, batch: list[Example], video: torch.Tensor) -> Assembled:
    """Concatenate text embeddings around ``video`` [B, Lv, H] and right-pad the batch."""
    seqs, labels, starts = [], [], []
    for ex, v in zip(batch, video):
        parts = [model.embed(ex.ids.before), v, model.embed(ex.ids.after), model.embed(ex.ids.target)]
        n_ctx = len(ex.ids.before) + v.shape[0] + len(ex.ids.after)
        seqs.append(torch.cat(parts))
        labels.append([IGNORE_INDEX] * n_ctx + list(ex.ids.target))
        starts.append(len(ex.ids.before))
    s_max = max(s.shape[0] for s in seqs)
    b, h = len(seqs), seqs[0].shape[1]
    dev = seqs[0].device
    embeds = seqs[0].new_zeros(b, s_max, h)
    mask = torch.zeros(b, s_max, dtype=torch.long, device=dev)
    lab = torch.full((b, s_max), IGNORE_INDEX, dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        embeds[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
        lab[i, : s.shape[0]] = torch.tensor(labels[i], device=dev)
    return Assembled(embeds, mask, lab, torch.tensor(starts, device=dev))


def _last_hidden(model: TrainableSTLLM, a: Assembled) -> torch.Tensor:
    out = model.reference.llm.model(inputs_embeds=a.embeds, attention_mask=a.attention_mask,
                                    use_cache=False)
    return out.last_hidden_state  # after the final RMSNorm, as the release's hidden_states[-1]


def forward_step(model: TrainableSTLLM, batch: list[Example], mask_rate: float | None,
                 use_mvm: bool, generator: torch.Generator | None = None,
                 recon_head: torch.nn.Module | None = None, recon_weight: float = 0.0) -> StepOutput:
    """Losses of one batch; ``mask_rate`` None = no masking (then no MVM either). With
    ``recon_head`` and ``recon_weight`` > 0, ``recon_weight`` x the frame-reconstruction loss
    (:class:`~stllm_engine.training.losses.FrameReconHead` on each frame's tokens) is added."""
    if not batch:
        raise ValueError("empty batch")
    per_frame = [model.frame_tokens(ex.frames, ex.qformer_text) for ex in batch]
    video = torch.stack([model.reference.projector(f) for f in per_frame])
    recon_value, loss_recon = None, None
    if recon_head is not None and recon_weight > 0:
        loss_recon = torch.stack([frame_recon_loss(recon_head(f), ex.frames.to(f.device))
                                  for f, ex in zip(per_frame, batch)]).mean()
        recon_value = float(loss_recon.detach())
    b, lv, _ = video.shape
    masked = apply_dynamic_mask(video, mask_rate, generator) if mask_rate is not None else None
    a = assemble(model, batch, masked.tokens if masked is not None else video)
    hidden = _last_hidden(model, a)
    loss_lm = lm_loss(model.reference.llm.lm_head(hidden), a.labels)
    loss, mvm_value = loss_lm, None
    if masked is not None and use_mvm:
        lk = masked.tokens.shape[1]
        pos_masked = a.video_start[:, None] + torch.arange(lk, device=hidden.device)[None]
        pred = model.mvm_decoder(gather_positions(hidden, pos_masked))
        with torch.no_grad():
            full = assemble(model, batch, video.detach())
            target = gather_positions(_last_hidden(model, full),
                                      full.video_start[:, None] + masked.kept_index)
        loss_mvm = mvm_loss(pred, target)
        loss = loss_lm + loss_mvm
        mvm_value = float(loss_mvm.detach())
    if loss_recon is not None:
        loss = loss + recon_weight * loss_recon
    return StepOutput(loss, float(loss_lm.detach()), mvm_value,
                      mask_rate if masked is not None else 0.0,
                      masked.tokens.shape[1] if masked is not None else lv, recon_value)
