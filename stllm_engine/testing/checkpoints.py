"""Tiny (and benchmark-sized) ST-LLM checkpoints with random weights in the official layout.

``write_tiny_checkpoint`` writes ``config.json``, sharded weights + index, the LLaMA tokenizer
files and ``qformer_tokenizer/``, exactly like a release folder, so loaders, the reference model and
the engine are tested on real files. Presets follow BENCHMARKS.md (``tiny``, ``bench-cpu``).
"""
from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..config import LLMConfig, QFormerConfig, STLLMConfig, VisionConfig
from ..weights.keys import QFORMER_PREFIX, expected_shapes
from ..weights.writer import write_checkpoint
from .tokenizers import write_llama_tokenizer, write_qformer_tokenizer

EVA_MLP_RATIO = 4.3637
VITS = ("eva", "btadapter")
PRESETS = ("tiny", "bench_cpu")
_SECTIONS = {"vision": VisionConfig, "qformer": QFormerConfig, "llm": LLMConfig}
_TOP = ("residual_size", "residual_hidden", "num_frames")


def _preset(name: str) -> STLLMConfig:
    if name == "tiny":  # seconds on CPU; head dims 12 / 10 / 16, 17 vision tokens a frame
        return STLLMConfig(
            vision=VisionConfig(image_size=56, patch_size=14, width=48, depth=3, num_heads=4,
                                mlp_dim=int(48 * EVA_MLP_RATIO), btadapter_depth=2),
            qformer=QFormerConfig(hidden_size=40, num_layers=2, num_heads=4, intermediate_size=80,
                                  num_query_tokens=6, max_position_embeddings=128, max_txt_len=64),
            llm=LLMConfig(vocab_size=1024, hidden_size=64, intermediate_size=172, num_layers=2,
                          num_heads=4, num_kv_heads=4),
            residual_size=4, residual_hidden=16, num_frames=8)
    if name == "bench_cpu":  # BENCHMARKS.md bench-cpu: 257 vision tokens, 8-layer 1024-wide LLM
        return STLLMConfig(
            vision=VisionConfig(image_size=224, patch_size=14, width=256, depth=4, num_heads=4,
                                mlp_dim=int(256 * EVA_MLP_RATIO), btadapter_depth=3),
            qformer=QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                                  num_query_tokens=32, max_position_embeddings=512, max_txt_len=256),
            llm=LLMConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                          num_heads=16, num_kv_heads=16),
            residual_size=16, residual_hidden=256, num_frames=16)
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


def _apply_overrides(config: STLLMConfig, overrides: dict) -> STLLMConfig:
    """``vision_width=64``, ``qformer_num_layers=1``, ``llm_num_kv_heads=2``, ``num_frames=4``..."""
    parts: dict[str, dict] = {s: {} for s in _SECTIONS}
    top: dict = {}
    valid = [f"{s}_{f.name}" for s, c in _SECTIONS.items() for f in fields(c)] + list(_TOP)
    for key, value in overrides.items():
        section = next((s for s in _SECTIONS if key.startswith(s + "_")), None)
        name = key[len(section) + 1:] if section else key
        if section and name in {f.name for f in fields(_SECTIONS[section])}:
            parts[section][name] = value
        elif key in _TOP:
            top[key] = value
        else:
            raise TypeError(f"unknown size override {key!r}; valid: {', '.join(valid)}")
    return replace(config, vision=replace(config.vision, **parts["vision"]),
                   qformer=replace(config.qformer, **parts["qformer"]),
                   llm=replace(config.llm, **parts["llm"]), **top)


def make_config(vit: str = "eva", video_input: str = "all", preset: str = "tiny",
                mvm_decoder: bool = False, dtype: torch.dtype = torch.float32,
                **size_overrides) -> STLLMConfig:
    """The config a tiny/bench checkpoint of this variant gets (before tokenizer sizes)."""
    if vit not in VITS:
        raise ValueError(f"vit must be one of {VITS}, got {vit!r}")
    config = _preset(preset)
    config = replace(config, vision=replace(config.vision, btadapter=vit == "btadapter"),
                     video_input=video_input, mvm_decoder=mvm_decoder,
                     torch_dtype=str(dtype).removeprefix("torch."))
    return _apply_overrides(config, size_overrides)


def _is_norm_weight(key: str) -> bool:
    module = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return key.endswith(".weight") and ("norm" in module.lower() or module == "ln_vision")


def random_state_dict(config: STLLMConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights for every expected key: norms ~1, biases and embeddings ~0.02,
    matrices ~N(0, max(0.02, 1/sqrt(fan_in))^2) so tiny models give varied logits.

    ``device``: where the numbers are drawn (a CUDA generator draws the 7B shapes in seconds, the
    CPU one in minutes; the two give different, each reproducible, weights). Returned on the CPU."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(config).items():
        r = torch.randn(shape, generator=g, device=device)
        if _is_norm_weight(key):
            t = 1.0 + 0.02 * r
        elif len(shape) >= 2 and key.endswith(".weight") and "embed" not in key:
            t = r * max(0.02, math.prod(shape[1:]) ** -0.5)
        else:  # biases, q/v biases, cls / pos / query tokens, embeddings
            t = 0.02 * r
        out[key] = t.to(dtype).cpu()
    # the release also saves the Q-Former's position_ids buffer
    out[QFORMER_PREFIX + "embeddings.position_ids"] = torch.arange(
        config.qformer.max_position_embeddings, dtype=torch.int64)[None]
    return out


def write_tiny_checkpoint(folder: str | Path, vit: str = "eva", video_input: str = "all",
                          seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 2,
                          fmt: str = "bin", mvm_decoder: bool = False, preset: str = "tiny",
                          device: str | torch.device = "cpu", **size_overrides) -> Path:
    """Write a random-weight checkpoint folder in the official layout; returns the folder.

    ``size_overrides``: ``vision_<field>``, ``qformer_<field>``, ``llm_<field>`` (fields of the
    config dataclasses) or ``num_frames`` / ``residual_size`` / ``residual_hidden``.
    ``llm_vocab_size`` sets the trained LLaMA tokenizer's size too; the Q-Former vocabulary is
    the trained BERT tokenizer's length (``[DEC]`` included) unless ``qformer_vocab_size`` is given.
    ``device``: where the random weights are drawn (:func:`random_state_dict`).
    """
    config = make_config(vit, video_input, preset, mvm_decoder, dtype, **size_overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_llama_tokenizer(folder, vocab_size=config.llm.vocab_size,
                          model_max_length=config.llm.max_position_embeddings)
    qdir = write_qformer_tokenizer(folder / "qformer_tokenizer",
                                   max_length=config.qformer.max_position_embeddings)
    if "qformer_vocab_size" not in size_overrides:
        from ..tokenizers import load_qformer_tokenizer
        config = replace(config, qformer=replace(config.qformer,
                                                 vocab_size=len(load_qformer_tokenizer(qdir))))
    state = random_state_dict(config, seed=seed, dtype=dtype, device=device)
    return write_checkpoint(folder, config, state, shards=shards, fmt=fmt)


def write_bench_cpu_checkpoint(folder: str | Path, vit: str = "eva", video_input: str = "all",
                               seed: int = 0, dtype: torch.dtype = torch.float16, shards: int = 2,
                               fmt: str = "safetensors", **size_overrides) -> Path:
    """The ``bench-cpu`` preset of BENCHMARKS.md (about 170M random parameters)."""
    return write_tiny_checkpoint(folder, vit=vit, video_input=video_input, seed=seed, dtype=dtype,
                                 shards=shards, fmt=fmt, preset="bench_cpu", **size_overrides)
