"""The model being trained: :class:`ReferenceSTLLM` (autograd) + the ``mvm_decoder`` head.

Loading and saving use the official checkpoint layout (``load_checkpoint`` / ``write_checkpoint``),
so a trained folder loads in the reference and the engine like any release folder.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from stllm_engine.training.losses import MVMDecoder
from stllm_engine.weights.keys import MVM_PREFIX, VIDEO_PREFIX

PARTS = ("vision", "qformer", "projector", "llm", "mvm_decoder")
_PART_PREFIXES = {"vision": ("vision.",), "qformer": ("qformer.",),
                  "projector": ("llama_proj.", "projector."), "llm": ("llm.",)}
WEIGHT_SUFFIXES = (".bin", ".safetensors")


class TrainableSTLLM(nn.Module):
    """``reference`` (a :class:`ReferenceSTLLM`) plus ``mvm_decoder``; video side with autograd."""

    def __init__(self, reference: nn.Module, mvm_decoder: MVMDecoder) -> None:
        super().__init__()
        self.reference = reference
        self.mvm_decoder = mvm_decoder
        self.config = reference.config
        # InstructBLIP packs EVA's q_bias/v_bias into one qkv bias whose k third must stay zero
        # (EVA has no k bias): its gradient is zeroed, and biases get no weight decay.
        for name, p in reference.named_parameters():
            if name.startswith("vision.") and name.endswith("qkv.bias"):
                p.register_hook(_zero_middle_third)

    def video_tokens(self, frames: torch.Tensor, qformer_text: str) -> torch.Tensor:
        """Frames [T, 3, S, S] + Q-Former text -> video tokens [L, H] (same math as
        ``ReferenceSTLLM.encode_video``, but differentiable)."""
        return self.reference.projector(self.frame_tokens(frames, qformer_text))

    def frame_tokens(self, frames: torch.Tensor, qformer_text: str) -> torch.Tensor:
        """Frames [T, 3, S, S] + Q-Former text -> per-frame tokens [T, Q, H] before the projector
        (``ReferenceSTLLM.frame_tokens``, differentiable)."""
        r = self.reference
        frames = frames.to(device=r.device, dtype=r.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(r.vision)):
            feats = r.vision(frames)
        ids, mask = r.qformer_inputs(qformer_text)
        return r.llama_proj(r.qformer(feats, ids, mask))

    def embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long, device=self.reference.device)
        return self.reference.llm.get_input_embeddings()(t)

    def set_trainable(self, parts: tuple[str, ...]) -> int:
        """Train only ``parts`` (subset of :data:`PARTS`, or ``("all",)``); returns #trainable params."""
        parts = PARTS if tuple(parts) == ("all",) else tuple(parts)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"unknown trainable parts {bad}; choose from {PARTS} or 'all'")
        for name, p in self.reference.named_parameters():
            p.requires_grad_(any(name.startswith(_PART_PREFIXES[x]) for x in parts if x in _PART_PREFIXES))
        for p in self.mvm_decoder.parameters():
            p.requires_grad_("mvm_decoder" in parts)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Official key names, ``mvm_decoder.*`` included."""
        from stllm_engine.reference.keymap import reference_to_official

        sd = reference_to_official({k: v.detach() for k, v in self.reference.named_parameters()})
        for k, v in self.mvm_decoder.state_dict().items():
            sd[MVM_PREFIX + k] = v.detach()
        return sd


def _zero_middle_third(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    n = grad.shape[0] // 3
    grad[n:2 * n] = 0
    return grad


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def load_trainable(folder: str | Path, video_input: str | None = None, device: str = "cpu",
                   seed: int = 0) -> TrainableSTLLM:
    """Load an official folder in float32 for training.

    ``video_input`` may switch the projector; switching to ``"residual"`` on a folder without
    ``down_proj``/``up_proj`` initialises them as the release does (kaiming down, zero up, so the
    global branch starts as a no-op). A missing ``mvm_decoder`` is freshly initialised.
    """
    from stllm_engine.reference import ReferenceSTLLM
    from stllm_engine.tokenizers import load_llama_tokenizer, load_qformer_tokenizer
    from stllm_engine.weights import load_checkpoint
    from stllm_engine.weights.infer import has_residual

    folder = Path(folder)
    ckpt = load_checkpoint(folder, dtype=torch.float32, mvm_decoder=True, progress=False,
                           video_input=None if video_input == "residual" else video_input)
    sd, config = dict(ckpt.state_dict), ckpt.config
    gen = torch.Generator().manual_seed(seed)
    if video_input == "residual" and not has_residual(sd):
        h, r = config.llm.hidden_size, config.residual_hidden
        down = torch.empty(r, h)
        bound = 1 / math.sqrt(h)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
        sd[VIDEO_PREFIX + "down_proj.weight"] = down.uniform_(-bound, bound, generator=gen)
        sd[VIDEO_PREFIX + "down_proj.bias"] = torch.zeros(r)
        sd[VIDEO_PREFIX + "up_proj.weight"] = torch.zeros(h, r)
        sd[VIDEO_PREFIX + "up_proj.bias"] = torch.zeros(h)
        config = replace(config, video_input="residual")
    mvm = {k[len(MVM_PREFIX):]: sd.pop(k) for k in [k for k in sd if k.startswith(MVM_PREFIX)]}
    config = replace(config, mvm_decoder=True, torch_dtype="float32")
    reference = ReferenceSTLLM(config, load_llama_tokenizer(folder), load_qformer_tokenizer(folder))
    reference.load_official_state_dict(sd)
    decoder = MVMDecoder(config.llm.hidden_size)
    if mvm:
        decoder.load_state_dict(mvm)
    model = TrainableSTLLM(reference, decoder).to(device=device, dtype=torch.float32)
    return model


def save_checkpoint(model: TrainableSTLLM, folder: str | Path, source_folder: str | Path,
                    shards: int = 2) -> Path:
    """Write ``model`` in the official layout (``mvm_decoder.*`` included) and copy the
    tokenizer files (everything but config and weights) from ``source_folder``."""
    from stllm_engine.weights import write_checkpoint

    folder, source_folder = Path(folder), Path(source_folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_checkpoint(tmp, model.config, model.official_state_dict(), shards=shards)
    for p in source_folder.iterdir():
        if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json") \
                or p.name.startswith("trainer_state"):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        else:
            shutil.copy2(p, tmp / p.name)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # a folder is either complete or absent
    return folder
