"""What the MVBench runner needs from a model, and the adapters for the two backends.

Any object with ``mvbench_answer(frames, question, candidates) -> str`` works: ``frames`` float32
[T, 3, S, S] normalised (S = ``image_size``, read by the runner), ``question`` the raw question,
``candidates`` the raw options; it returns the model's answer text starting with the option,
e.g. ``"(B) slows down"`` (the runner checks it with the release's letter check). An optional
``num_frames`` attribute is the CLI's default frame count.

Video tokens: the release's MVBench inference feeds every frame's tokens whatever the checkpoint's
``video_input`` (``all_token`` is always truthy, see ``reference/chat.py``); that is the default
(``video_tokens="release"``). ``video_tokens="own"`` uses the checkpoint's own projector instead
(a mean model then sees its mean tokens), for comparing variants trained with their own input.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

BACKENDS = ("reference", "engine")
VIDEO_TOKENS = ("release", "own")


@runtime_checkable
class MVBenchAnswerer(Protocol):
    image_size: int

    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str: ...


def load_answerer(backend: str, checkpoint: str, device: str = "cpu",
                  video_tokens: str = "release", ask_simple: bool = False) -> MVBenchAnswerer:
    """Build the answerer of ``backend`` ("reference" | "engine") from a checkpoint folder;
    ``ask_simple``: the published script's prompt layout (video tokens first)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if video_tokens not in VIDEO_TOKENS:
        raise ValueError(f"video_tokens must be one of {VIDEO_TOKENS}, got {video_tokens!r}")
    if backend == "reference":
        return ReferenceAnswerer(checkpoint, device, video_tokens, ask_simple)
    if video_tokens != "release":
        raise ValueError("video_tokens='own' is only implemented for the reference backend")
    return EngineAnswerer(checkpoint, device, ask_simple=ask_simple)


class ReferenceAnswerer:
    """The transformers-built reference model (``stllm_engine.reference``)."""

    def __init__(self, checkpoint: str, device: str = "cpu", video_tokens: str = "release",
                 ask_simple: bool = False) -> None:
        from stllm_engine.reference import ReferenceSTLLM

        if video_tokens not in VIDEO_TOKENS:
            raise ValueError(f"video_tokens must be one of {VIDEO_TOKENS}, got {video_tokens!r}")
        self.model = ReferenceSTLLM.from_pretrained(checkpoint, device=device)
        self.image_size = self.model.config.vision.image_size
        self.num_frames = self.model.config.num_frames
        self.video_tokens = video_tokens
        self.ask_simple = ask_simple

    @torch.no_grad()
    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str:
        if self.video_tokens == "release":
            return self.model.mvbench_answer(frames, question, candidates, ask_simple=self.ask_simple)
        from stllm_engine.prompts import decode_output, mvbench_postprocess, mvbench_question

        m = self.model
        q = mvbench_question(question, candidates)
        embeds = m.mvbench_inputs_embeds(m.encode_video(frames, q), q, ask_simple=self.ask_simple)  # own projector
        gen = m.generate_from_embeds(embeds, num_beams=1, max_new_tokens=100, min_length=1,
                                     repetition_penalty=1.0, do_sample=False)
        return mvbench_postprocess(decode_output(m.llama_tokenizer, gen.token_ids, m.config.llm.eos_token_id))


class EngineAnswerer:
    """The engine (``stllm_engine.api.STLLM.mvbench_answer``: paged KV, prefix cache shared by the
    questions' common system text, vision cache per frames tensor). ``video_tokens`` as
    :class:`ReferenceAnswerer`; ``engine_kw`` go to ``STLLM.from_pretrained`` (e.g. ``dtype``)."""

    def __init__(self, checkpoint: str, device: str = "cpu", video_tokens: str = "release",
                 ask_simple: bool = False, **engine_kw) -> None:
        from stllm_engine.api import STLLM

        if video_tokens not in VIDEO_TOKENS:
            raise ValueError(f"video_tokens must be one of {VIDEO_TOKENS}, got {video_tokens!r}")
        self.llm = STLLM.from_pretrained(checkpoint, device=device, **engine_kw)
        config = self.llm.engine.model.config
        self.image_size = config.vision.image_size
        self.num_frames = config.num_frames
        self.video_tokens = "frames" if video_tokens == "release" else "own"
        self.ask_simple = ask_simple

    def mvbench_answer(self, frames: torch.Tensor, question: str, candidates: list[str]) -> str:
        return self.llm.mvbench_answer(frames, question, candidates, video_tokens=self.video_tokens,
                                       ask_simple=self.ask_simple)

    def mvbench_answers(self, items: list) -> list[str]:
        """Many ``(frames, question, candidates)`` at once (continuous batching), in order."""
        outs = self.llm.mvbench_generate([dict(video=f, question=q, candidates=c, video_tokens=self.video_tokens,
                                               ask_simple=self.ask_simple) for f, q, c in items])
        return [self.llm.mvbench_text(o) for o in outs]
