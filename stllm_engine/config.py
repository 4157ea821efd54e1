"""Model configuration: plain dataclasses checked in ``__post_init__``.

On disk, ``config.json`` is the release's LlamaConfig dict (``model_type: "st_llm_hf"``). The
vision tower and Q-Former sizes are not in the release's config (they are fixed: EVA ViT-g,
BERT-base); the defaults below are those real sizes. Checkpoints written by this project (tiny
test models, trained defaults) add one extra key, ``"stllm"``, holding the non-default fields of
:class:`VisionConfig`, :class:`QFormerConfig` and the video fields of :class:`STLLMConfig`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

VIDEO_INPUTS = ("all", "mean", "residual")


def _check_positive_number(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive number, got {v!r}")


def _check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive int, got {v!r}")


@dataclass
class VisionConfig:
    """EVA ViT (optionally with the BT-Adapter temporal branch)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    eps: float = 1e-6
    btadapter: bool = False
    btadapter_depth: int = 3  # branch beside the last `btadapter_depth` blocks
    btadapter_max_frames: int = 64

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
        _check_positive_number(self, "eps")
        if self.width % self.num_heads:
            raise ValueError(f"vision width {self.width} not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError("vision image_size must be a multiple of patch_size")
        if self.btadapter and not (0 < self.btadapter_depth <= self.depth):
            raise ValueError(f"btadapter_depth must be in 1..depth, got {self.btadapter_depth}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:  # patches + cls
        return self.num_patches + 1


@dataclass
class QFormerConfig:
    """Instruction-aware Q-Former (BERT with cross-attention every `cross_attention_freq` layers)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    cross_attention_freq: int = 2
    eps: float = 1e-12
    max_txt_len: int = 256

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size",
                        "num_query_tokens", "vocab_size", "max_position_embeddings",
                        "cross_attention_freq", "max_txt_len")
        _check_positive_number(self, "eps")
        if self.hidden_size % self.num_heads:
            raise ValueError("qformer hidden_size not divisible by num_heads")


@dataclass
class LLMConfig:
    """LLaMA (Vicuna-7B v1.1 by default)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                        "num_heads", "num_kv_heads", "max_position_embeddings")
        _check_positive_number(self, "rms_norm_eps", "rope_theta")
        if self.hidden_size % self.num_heads:
            raise ValueError("llm hidden_size not divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("llm num_heads must be a multiple of num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class STLLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    video_input: str = "all"  # all | mean | residual (global-local)
    residual_size: int = 16  # local frames of global-local input
    residual_hidden: int = 1024  # down_proj width of global-local input
    num_frames: int = 16  # frames sampled per video by default
    mvm_decoder: bool = False  # training-only head present
    torch_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.video_input not in VIDEO_INPUTS:
            raise ValueError(f"unsupported video_input {self.video_input!r}; expected one of {VIDEO_INPUTS}")
        _check_positive(self, "residual_size", "residual_hidden", "num_frames")
        if self.vision.btadapter and self.num_frames > self.vision.btadapter_max_frames:
            raise ValueError(f"BT-Adapter supports at most {self.vision.btadapter_max_frames} frames, "
                             f"num_frames={self.num_frames}")

    @property
    def tokens_per_frame(self) -> int:
        return self.qformer.num_query_tokens

    def num_video_tokens(self, num_frames: int | None = None) -> int:
        """LLM tokens a video of ``num_frames`` frames (default: the config's) becomes: every
        frame's (``all``), one frame's worth (``mean``), the ``residual_size`` local frames'
        (``residual``)."""
        t = self.num_frames if num_frames is None else num_frames
        frames = {"all": t, "mean": 1, "residual": self.residual_size}[self.video_input]
        return frames * self.tokens_per_frame

    # --- config.json round trip -------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        l = self.llm
        d = {
            "architectures": ["STLLMForCausalLM"],
            "model_type": "st_llm_hf",
            "vocab_size": l.vocab_size,
            "hidden_size": l.hidden_size,
            "intermediate_size": l.intermediate_size,
            "num_hidden_layers": l.num_layers,
            "num_attention_heads": l.num_heads,
            "num_key_value_heads": l.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": l.rms_norm_eps,
            "rope_theta": l.rope_theta,
            "max_position_embeddings": l.max_position_embeddings,
            "bos_token_id": l.bos_token_id,
            "eos_token_id": l.eos_token_id,
            "pad_token_id": l.pad_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
        }
        extra: dict[str, Any] = {}
        for name, sub, default in (("vision", self.vision, VisionConfig()),
                                   ("qformer", self.qformer, QFormerConfig())):
            diff = {k: v for k, v in asdict(sub).items() if getattr(default, k) != v}
            if diff:
                extra[name] = diff
        for k in ("video_input", "residual_size", "residual_hidden", "num_frames", "mvm_decoder"):
            extra[k] = getattr(self, k)
        d["stllm"] = extra
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "STLLMConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        g = d.get
        llm = LLMConfig(
            vocab_size=g("vocab_size", 32000), hidden_size=g("hidden_size", 4096),
            intermediate_size=g("intermediate_size", 11008), num_layers=g("num_hidden_layers", 32),
            num_heads=g("num_attention_heads", 32),
            num_kv_heads=g("num_key_value_heads") or g("num_attention_heads", 32),
            rms_norm_eps=g("rms_norm_eps", 1e-6), rope_theta=_as_float(g("rope_theta", 10000.0)),
            max_position_embeddings=g("max_position_embeddings", 2048),
            bos_token_id=g("bos_token_id", 1) if g("bos_token_id") is not None else 1,
            eos_token_id=g("eos_token_id", 2) if g("eos_token_id") is not None else 2,
            pad_token_id=g("pad_token_id", 0) if g("pad_token_id") is not None else 0,
        )
        extra = dict(g("stllm") or {})
        vision = VisionConfig(**_known(VisionConfig, extra.pop("vision", {})))
        qformer = QFormerConfig(**_known(QFormerConfig, extra.pop("qformer", {})))
        top = _known(cls, extra)
        top.pop("vision", None), top.pop("qformer", None), top.pop("llm", None)
        return cls(vision=vision, qformer=qformer, llm=llm,
                   torch_dtype=str(g("torch_dtype") or "float16"), **top)

    def save(self, folder: str | Path) -> Path:
        p = Path(folder) / "config.json"
        p.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return p

    @classmethod
    def load(cls, folder: str | Path) -> "STLLMConfig":
        p = Path(folder) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {folder}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)


def _as_float(v):
    """A JSON number as a float; anything else as is (``__post_init__`` names it)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _known(cls: type, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config.json: {sorted(unknown)}")
    return dict(d)
