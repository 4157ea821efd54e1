"""The release's chat and MVBench inference on :class:`ReferenceSTLLM` (methods bound there).

Findings from the release that differ from or refine STLLM_REFERENCE.md:

* BOS: with ``qformer_text_input`` the release re-assigns the LLaMA tokenizer's specials
  (``bos = eos = unk = "</s>"``, pad ``[PAD]``), so the token the tokenizer prepends as "BOS" is
  ``</s>`` (id 2 in Vicuna), not ``<s>`` (1). We prepend ``eos_token_id``.
* Chat path (``get_context_emb_sim``): one BOS, then
  ``system + "###Human: " + q + " ###Assistant: "``; no attention mask. QA benchmarks pass
  ``system=False`` (``system=""`` here). (``demo.py`` itself passes an already wrapped
  ``"###Human: q ###Assistant: "`` as the question, doubling the roles; we follow ``Chat``.)
* ``min_length=1`` in transformers 4.28 counted generated tokens only (the prompt is embeds);
  transformers 5 subtracts the prompt length from ``min_length``, so we pass ``min_new_tokens``.
* MVBench (``mv_bench_infer.py``): ``all_token = ~(video_input == 'mean')`` is always truthy, so the
  video tokens are **all frames concatenated** whatever the variant; repetition penalty 1.0; the
  ``get_context_emb`` path (BOS + segment before the video, video, segment after without BOS) by
  default, as ``infer_mvbench`` defaults; the published ``test_mvbench.sh`` passes ``--ask_simple``
  (``get_context_emb_sim``: video, then BOS + the text after ``"</Video>\n"``; ``ask_simple=True``)
  and ``--num-frames 0`` (fps-1 sampling: the evaluation's ``--segments 0``, ``load_video(fps1=True)``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from ..prompts import (MVBENCH_SYSTEM, chat_prompt, decode_output, mvbench_postprocess, mvbench_prompt_segments,
                       mvbench_question, mvbench_simple_prompt, postprocess_answer)
from .generation import StopOnSequences, stop_sequences

RELEASE_MAX_LENGTH = 2000


@dataclass
class ReferenceGeneration:
    """Raw result of :func:`generate_ids`."""

    token_ids: list[int]  # generated ids as transformers returns them (best beam)
    scores: torch.Tensor | None  # [steps, vocab] float32 processed scores (greedy/sampling, batch row 0)
    logits: torch.Tensor | None  # [steps, vocab] float32 raw logits (greedy/sampling, batch row 0)
    prompt_length: int  # embeds fed to the LLM after left truncation


def prompt_bos_id(self) -> int:
    """The id the release puts first in the prompt (``</s>``, see module docstring)."""
    return int(self.llama_tokenizer.eos_token_id)


def model_stop_sequences(self) -> list[list[int]]:
    if getattr(self, "_stop_sequences", None) is None:
        self._stop_sequences = stop_sequences(self.llama_tokenizer)
    return self._stop_sequences


def _text_ids(self, text: str, bos: bool) -> list[int]:
    ids = list(self.llama_tokenizer(text, add_special_tokens=False).input_ids)
    return ([self.prompt_bos_id] if bos else []) + ids


def load_frames(self, video, num_frames: int | None = None, sampling: str = "uniform",
                bound=None) -> torch.Tensor:
    """``video`` as a frames tensor ``[T, 3, S, S]``, a ``VideoFrames`` or a ``load_video`` source."""
    if isinstance(video, torch.Tensor) and video.ndim == 4 and video.shape[1] == 3 and video.is_floating_point():
        if num_frames is not None and video.shape[0] != num_frames:
            raise ValueError(f"frames tensor has {video.shape[0]} frames but num_frames={num_frames}")
        return video
    if hasattr(video, "frames") and isinstance(video.frames, torch.Tensor):
        return video.frames
    from ..video import load_video

    n = num_frames if num_frames is not None else self.config.num_frames
    return load_video(video, num_frames=n, sampling=sampling, bound=bound,  # decord decodes, as in the release
                      size=self.config.vision.image_size, backend="release", hash_content=False).frames


def chat_inputs_embeds(self, video_tokens: torch.Tensor, question: str, system: str | None = None
                       ) -> torch.Tensor:
    """``[1, Lv + Lt, H]``: video tokens then the embedded chat prompt (BOS first)."""
    ids = _text_ids(self, chat_prompt(question, system), bos=True)
    return torch.cat([video_tokens.to(self.dtype), self.embed_tokens(ids)], dim=0)[None]


def mvbench_inputs_embeds(self, video_tokens: torch.Tensor, question: str,
                          system: str = MVBENCH_SYSTEM, ask_simple: bool = False) -> torch.Tensor:
    """``[1, L, H]``: BOS + text before the video, video tokens, text after (no BOS);
    ``ask_simple`` (``get_context_emb_sim``): video tokens, then BOS + the text after
    ``"</Video>\n"``."""
    if ask_simple:
        ids = _text_ids(self, mvbench_simple_prompt(question, system), bos=True)
        return torch.cat([video_tokens.to(self.dtype), self.embed_tokens(ids)], dim=0)[None]
    before, after = mvbench_prompt_segments(question, system)
    return torch.cat([self.embed_tokens(_text_ids(self, before, bos=True)), video_tokens.to(self.dtype),
                      self.embed_tokens(_text_ids(self, after, bos=False))], dim=0)[None]


def _max_length(self) -> int:
    return min(RELEASE_MAX_LENGTH, self.config.llm.max_position_embeddings)


@torch.no_grad()
def generate_from_embeds(self, embeds: torch.Tensor, num_beams: int = 1, max_new_tokens: int = 300,
                         min_length: int = 1, repetition_penalty: float = 1.5, temperature: float = 1.0,
                         do_sample: bool = False, top_p: float = 0.9, length_penalty: float = 1.0,
                         output_scores: bool = False, seed: int | None = None, sequence_bias: dict | None = None,
                         prefix_allowed_tokens_fn=None) -> ReferenceGeneration:
    """``LlamaForCausalLM.generate(inputs_embeds=...)`` with the release's settings and "###" stop.
    ``sequence_bias`` ({token id: bias}) and ``prefix_allowed_tokens_fn`` (called with the batch
    row and the ids generated so far) pass to transformers' own logits processors: the oracle of
    the engine's ``logit_bias`` / ``allowed_token_ids`` / ``choices``."""
    max_length = _max_length(self)
    if not 0 < max_new_tokens < max_length:
        raise ValueError(f"max_new_tokens must be in 1..{max_length - 1}, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    begin = max(0, embeds.shape[1] + max_new_tokens - max_length)  # release: cut the prompt on the left
    embeds = embeds[:, begin:]
    lc = self.config.llm
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min_length, num_beams=num_beams,
        do_sample=do_sample, top_p=top_p if do_sample else None, top_k=50 if do_sample else None,
        temperature=temperature if do_sample else None, repetition_penalty=repetition_penalty,
        length_penalty=length_penalty, bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id,
        pad_token_id=lc.pad_token_id, use_cache=True, return_dict_in_generate=True,
        output_scores=output_scores, output_logits=output_scores,
        sequence_bias={(t,): float(b) for t, b in sequence_bias.items()} if sequence_bias else None)
    stops = StoppingCriteriaList([StopOnSequences(model_stop_sequences(self), first_row_only=True)])
    if seed is not None:
        torch.manual_seed(seed)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    with warnings.catch_warnings():  # penalty on generated ids only is exactly the release's behaviour
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen,
                                stopping_criteria=stops, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)
    scores = logits = None
    if output_scores and num_beams == 1:
        scores = torch.stack([s[0] for s in out.scores]).float()
        logits = torch.stack([s[0] for s in out.logits]).float()
    return ReferenceGeneration(out.sequences[0].tolist(), scores, logits, embeds.shape[1])


@torch.no_grad()
def generate_ids(self, video, question: str, num_beams: int = 1, max_new_tokens: int = 300,
                 min_length: int = 1, repetition_penalty: float = 1.5, temperature: float = 1.0,
                 do_sample: bool = False, top_p: float = 0.9, num_frames: int | None = None,
                 system: str | None = None, output_scores: bool = False, seed: int | None = None,
                 **constraints) -> ReferenceGeneration:
    """Chat generation returning raw token ids (and per-step scores/logits when asked);
    ``constraints``: ``sequence_bias`` / ``prefix_allowed_tokens_fn`` of :func:`generate_from_embeds`."""
    tokens = self.encode_video(load_frames(self, video, num_frames), question)
    embeds = chat_inputs_embeds(self, tokens, question, system)
    return generate_from_embeds(self, embeds, num_beams, max_new_tokens, min_length, repetition_penalty,
                                temperature, do_sample, top_p, output_scores=output_scores, seed=seed,
                                **constraints)


def decode_answer(self, token_ids: list[int]) -> str:
    """Release post-processing of generated ids -> answer text."""
    return postprocess_answer(decode_output(self.llama_tokenizer, token_ids, self.config.llm.eos_token_id))


def answer(self, video, question: str, num_beams: int = 1, max_new_tokens: int = 300, min_length: int = 1,
           repetition_penalty: float = 1.5, temperature: float = 1.0, do_sample: bool = False,
           top_p: float = 0.9, num_frames: int | None = None, system: str | None = None,
           seed: int | None = None) -> str:
    """Answer ``question`` about ``video`` exactly like the release's ``Chat.answer``."""
    gen = generate_ids(self, video, question, num_beams, max_new_tokens, min_length, repetition_penalty,
                       temperature, do_sample, top_p, num_frames, system, seed=seed)
    return decode_answer(self, gen.token_ids)


@torch.no_grad()
def mvbench_answer(self, video, question: str, candidates, num_frames: int | None = None, bound=None,
                   system: str = MVBENCH_SYSTEM, ask_simple: bool = False) -> str:
    """MVBench prediction like ``infer_mvbench``: ``"(" + first line`` of the greedy answer."""
    q = mvbench_question(question, candidates)
    frames = load_frames(self, video, num_frames, sampling="mvbench", bound=bound)
    per_frame = self.frame_tokens(self.encode_vision(frames), q)
    tokens = per_frame.reshape(-1, per_frame.shape[-1])  # all_token is always truthy in the release
    embeds = mvbench_inputs_embeds(self, tokens, q, system, ask_simple)
    gen = generate_from_embeds(self, embeds, num_beams=1, max_new_tokens=100, min_length=1,
                               repetition_penalty=1.0, do_sample=False)
    return mvbench_postprocess(decode_output(self.llama_tokenizer, gen.token_ids, self.config.llm.eos_token_id))
