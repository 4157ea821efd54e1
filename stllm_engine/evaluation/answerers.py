"""What the MVBench runner needs from a model, and the adapters for the two backends.

Any object with ``mvbench_answer(frames, question, candidates) -> str`` works: ``frames`` float32
[T, 3, S, S] normalised (S = ``image_size``, read by the runner), ``question`` the raw question,
``candidates`` the raw options; it returns the model's answer text starting with the option,
e.g. ``"(B) slows down"`` (the runner checks it with the release's letter check). An optional
``num_frames`` attribute is the CLI's default frame count.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

BACKENDS = ("reference", "engine")


@runtime_checkable
class MVBenchAnswerer(Protocol):
    image_size: int

    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str: ...


def load_answerer(backend: str, checkpoint: str, device: str = "cpu") -> MVBenchAnswerer:
    """Build the answerer of ``backend`` ("reference" | "engine") from a checkpoint folder."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return ReferenceAnswerer(checkpoint, device)
    return EngineAnswerer(checkpoint, device)


class ReferenceAnswerer:
    """The transformers-built reference model (``stllm_engine.reference``)."""

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        from stllm_engine.reference import ReferenceSTLLM

        self.model = ReferenceSTLLM.from_pretrained(checkpoint, device=device)
        self.image_size = self.model.config.vision.image_size
        self.num_frames = self.model.config.num_frames

    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str:
        return self.model.mvbench_answer(frames, question, candidates)


class EngineAnswerer:
    """The engine (``stllm_engine.api.STLLM``); needs its ``mvbench_answer(frames, question,
    candidates)`` with the reference's signature (not in the API yet: a clear error until then)."""

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        try:
            from stllm_engine.api import STLLM
        except ImportError as e:
            raise RuntimeError(f"the engine backend needs stllm_engine.api.STLLM ({e}); "
                               "use --backend reference") from e
        if not hasattr(STLLM, "mvbench_answer"):
            raise RuntimeError("stllm_engine.api.STLLM has no mvbench_answer(frames, question, "
                               "candidates) yet; use --backend reference")
        self.llm = STLLM.from_pretrained(checkpoint, device=device)
        config = self.llm.engine.model.config
        self.image_size = config.vision.image_size
        self.num_frames = config.num_frames

    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str:
        return self.llm.mvbench_answer(frames, question, candidates)
