"""The public Python API: ``STLLM.from_pretrained(folder).answer(video, question)``.

``answer`` follows the release's chat: greedy, repetition penalty 1.5, min_new_tokens 1, stop on
"###" (as text and as the tokenizer's "###" id sequences), 300 new tokens; the answer text is
post-processed like the release (leading <unk>/<s> dropped, cut at EOS and "###", text after
"Assistant:", stripped). ``generate`` runs many requests with continuous batching and returns
:class:`RequestOutput` objects in request order; ``stream`` yields text pieces; ``chat`` keeps a
multi-turn session whose earlier turns are served from the KV prefix cache.

``mvbench_answer`` follows the release's MVBench inference (``infer_mvbench``): MVBench frame
sampling, BOS + text | every frame's tokens | text, greedy, repetition penalty 1.0, 100 new tokens,
"###" stop ids, ``"(" +`` the first line of the answer; ``mvbench_generate`` batches many.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from stllm_engine.engine.llm_engine import EngineConfig, LLMEngine
from stllm_engine.outputs import RequestFailedError, RequestOutput, error_text
from stllm_engine.prompts import (MVBENCH_SYSTEM, SEP, chat_turns_prompt, decode_output, mvbench_postprocess,
                                  release_answer)
from stllm_engine.sampling_params import SamplingParams

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}
_REQUEST_KEYS = {"system", "history", "num_frames", "keep_ratio", "keep_mode", "keep_seed", "sampling", "priority"}
_MVBENCH_KEYS = ("video", "question", "candidates", "num_frames", "bound", "system", "video_tokens", "ask_simple",
                 "params")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stop_id_sequences(tokenizer, text: str = SEP) -> list[list[int]]:
    """Id sequences of ``text`` that end generation: its word-start encoding and its in-word BPE
    encoding (for Vicuna "###": [835] and [2277, 29937])."""
    seqs = [list(tokenizer.encode(text, add_special_tokens=False))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "tokenize"):
        seqs.append([t.id for t in backend.model.tokenize(text)])
    out: list[list[int]] = []
    for s in seqs:
        if s and s not in out:
            out.append(s)
    return out


class STLLM:
    """An engine bound to one checkpoint. Build with :meth:`from_pretrained`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.stop_token_ids = stop_id_sequences(self.tokenizer)
        self.last_output: RequestOutput | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, kv_cache_memory: int | None = None,
                        block_size: int = 16, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                        vision_cache_bytes: int = 256 << 20, num_kv_blocks: int | None = None,
                        enable_prefix_caching: bool = True, qformer_tokenizer: str | Path | None = None,
                        video_input: str | None = None, **engine_kw) -> "STLLM":
        """Load an official-layout folder; the KV pool holds ``kv_cache_memory`` bytes
        (None: on the CPU room for 4 max_length sequences, at least 256 MiB; on a GPU the free
        memory less 8 GiB, at least half of it, at most 4 x max_num_seqs max_length sequences; see
        ``default_kv_cache_memory``) or ``num_kv_blocks`` blocks of ``block_size`` positions. ``qformer_tokenizer``: the
        Q-Former's BERT tokenizer (folder or vocab.txt) when the checkpoint has no
        ``qformer_tokenizer/`` (the release's folders do not ship it: use bert-base-uncased).
        ``video_input``: "all" | "mean" | "residual" instead of the folder's own (``mean``, the
        paper's baseline, has no checkpoint of its own: it runs on an ``all`` folder)."""
        from stllm_engine.model.stllm import STLLMModel
        from stllm_engine.tokenizers import load_llama_tokenizer
        from stllm_engine.weights import load_checkpoint

        if isinstance(dtype, str):
            if dtype.removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype.removeprefix("torch.")]
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        ckpt = load_checkpoint(path, dtype=dtype, video_input=video_input)
        model = STLLMModel.from_checkpoint(ckpt, device, dtype, qformer_tokenizer=qformer_tokenizer, consume=True)
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              vision_cache_bytes=vision_cache_bytes, enable_prefix_caching=enable_prefix_caching,
                              **engine_kw)
        return cls(LLMEngine(model, load_llama_tokenizer(path), config))

    # --- parameters -------------------------------------------------------------------------
    def params(self, **kw) -> SamplingParams:
        """Release-chat SamplingParams with overrides (``do_sample``/``min_length`` accepted as the
        release names them)."""
        unknown = set(kw) - _PARAM_NAMES - {"do_sample", "min_length"}
        if unknown:
            raise TypeError(f"unknown generation parameters: {sorted(unknown)}")
        do_sample = kw.pop("do_sample", None)
        if "min_length" in kw:
            kw["min_new_tokens"] = kw.pop("min_length")
        if do_sample and kw.get("temperature", 0) == 0:
            kw["temperature"] = 1.0
        if do_sample is False:
            kw["temperature"] = 0.0
        base = dict(min_new_tokens=1, stop_token_ids=self.stop_token_ids)
        if kw.get("num_beams", 1) > 1:  # the release's beams end only on "###" ids ending the top beam;
            base["stop"] = []          # a "###" anywhere in its text chose another beam than the release
        base.update(kw)
        return SamplingParams(**base)

    def _split(self, kw: dict) -> tuple[SamplingParams, dict]:
        req = {k: kw.pop(k) for k in list(kw) if k in _REQUEST_KEYS}
        params = kw.pop("params", None)
        if params is not None and kw:
            raise TypeError("pass either params=SamplingParams(...) or keyword parameters, not both")
        return (params if params is not None else self.params(**kw)), req

    def postprocess(self, out: RequestOutput) -> str:
        """Release answer text of a finished output (raises if the request failed)."""
        if out.error is not None:
            raise RequestFailedError(out)
        return release_answer(self.tokenizer, out.token_ids, out.stop_reason)

    # --- one request ------------------------------------------------------------------------
    def _run_until_done(self, rids: list[str]) -> dict[str, RequestOutput]:
        want, done = set(rids), {}
        while want - set(done):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with requests {sorted(want - set(done))} unfinished")
            for o in self.engine.step():
                if o.finished and o.request_id in want:
                    done[o.request_id] = o
        return done

    def answer(self, video, question: str, **kw) -> str:
        """Answer one question (release chat semantics); the full output is in ``last_output``."""
        params, req = self._split(kw)
        rid = self.engine.add_request(video, question, params, **req)
        out = self._run_until_done([rid])[rid]
        self.last_output = out
        return self.postprocess(out)

    def generate(self, requests: list, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run many requests together; each is ``(video, question)`` or a dict with ``video``,
        ``question`` and optional ``params``/``system``/``num_frames``/``keep_ratio``... Results
        come in request order; a failed request has ``error`` set and does not affect others."""
        default = params if params is not None else self.params()
        items = []
        for i, r in enumerate(requests):  # every item checked before any is queued
            if isinstance(r, dict):
                r = dict(r)
                try:
                    video, question = r.pop("video"), r.pop("question")
                except KeyError as e:
                    raise ValueError(f"request {i} lacks {e.args[0]!r}") from None
                p = r.pop("params", default)
                bad = set(r) - _REQUEST_KEYS
                if bad:
                    raise ValueError(f"request {i} has unknown keys {sorted(bad)}")
                items.append((video, question, p, r))
            elif isinstance(r, (tuple, list)) and len(r) == 2:
                items.append((r[0], r[1], default, {}))
            else:
                raise ValueError(f"request {i} must be (video, question) or a dict with 'video' and "
                                 f"'question', got {type(r).__name__}")
        rids = self._add_all(lambda it: self.engine.add_request(it[0], it[1], it[2], **it[3]), items)
        done = self._run_until_done(rids)
        return [done[r] for r in rids]

    def _add_all(self, add, items: list) -> list[str]:
        """Queue every item; if one is refused, abort those already queued and re-raise (a call
        that raises leaves nothing running)."""
        rids: list[str] = []
        try:
            for it in items:
                rids.append(add(it))
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return rids

    def stream(self, video, question: str, **kw) -> Iterator[str]:
        """Yield the output's text (``RequestOutput.text``) in pieces as it is generated (stop
        strings never streamed); :meth:`answer` returns that text after the release's
        post-processing (cut after "Assistant:", stripped). Stopping the iteration early (break,
        ``close()``) aborts the request and frees its KV blocks."""
        params, req = self._split(kw)
        if params.num_beams > 1:
            raise ValueError("stream does not support beam search (num_beams > 1)")
        rid = self.engine.add_request(video, question, params, **req)
        finished = False
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine went idle before request {rid} finished")
                for o in self.engine.step():
                    if o.request_id != rid:
                        continue
                    finished = o.finished
                    if o.error is not None:
                        raise RequestFailedError(o)
                    if o.delta:
                        yield o.delta
                    if o.finished:
                        self.last_output = o
                        return
        finally:
            if not finished:  # the caller stopped iterating (break, close, an exception): abort
                self.engine.abort(rid)

    # --- MVBench ----------------------------------------------------------------------------
    def mvbench_params(self, **kw) -> SamplingParams:
        """The release's MVBench generation: greedy, repetition penalty 1.0, 1..100 new tokens,
        stop on the "###" ids only (like the reference's stopping criterion), with overrides."""
        base = dict(temperature=0.0, repetition_penalty=1.0, max_new_tokens=100, min_new_tokens=1,
                    stop=[], stop_token_ids=self.stop_token_ids)
        base.update(kw)
        return SamplingParams(**base)

    def mvbench_text(self, out: RequestOutput) -> str:
        """MVBench prediction of a finished output: ``"(" +`` first line (raises if it failed)."""
        if out.error is not None:
            raise RequestFailedError(out)
        return mvbench_postprocess(decode_output(self.tokenizer, out.token_ids, self.tokenizer.eos_token_id))

    def mvbench_generate(self, items: list, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Many MVBench questions at once (continuous batching). Each item is ``(video, question,
        candidates)`` or a dict with those keys and optional ``num_frames``/``bound``/``system``/
        ``video_tokens``/``ask_simple``/``params``. Outputs come in item order; a failed item has ``error`` set,
        the others are intact. Turn outputs into predictions with :meth:`mvbench_text`."""
        default = params if params is not None else self.mvbench_params()
        queued = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                if not isinstance(item, (tuple, list)) or len(item) != 3:
                    raise ValueError(f"MVBench item {i} must be (video, question, candidates) or a dict")
                item = dict(zip(_MVBENCH_KEYS, item))
            bad = set(item) - set(_MVBENCH_KEYS)
            missing = {"video", "question", "candidates"} - set(item)
            if bad or missing:
                raise ValueError(f"MVBench item {i}: unknown keys {sorted(bad)}, missing {sorted(missing)}")
            item = dict(item)
            video, question, candidates = item.pop("video"), item.pop("question"), item.pop("candidates")
            p = item.pop("params", default)
            queued.append((video, question, candidates, p, item))
        rids = self._add_all(lambda it: self.engine.add_mvbench_request(*it[:4], **it[4]), queued)
        done = self._run_until_done(rids)
        return [done[r] for r in rids]

    def mvbench_answer(self, video, question: str, candidates: list[str], num_frames: int | None = None,
                       bound=None, system: str = MVBENCH_SYSTEM, *, video_tokens: str = "frames",
                       ask_simple: bool = False) -> str:
        """MVBench prediction like ``ReferenceSTLLM.mvbench_answer``, e.g. ``"(B) slows down"``;
        ``video``: frames [T, 3, S, S], ``VideoFrames`` or a ``load_video`` source (MVBench
        sampling, ``bound`` = (start, end) seconds). ``video_tokens="own"``: the checkpoint's
        projector instead of every frame's tokens. ``ask_simple``: the published script's prompt
        layout (video tokens first; ``mvbench_simple_prompt``). The full output is in ``last_output``."""
        (out,) = self.mvbench_generate([dict(video=video, question=question, candidates=candidates,
                                             num_frames=num_frames, bound=bound, system=system,
                                             video_tokens=video_tokens, ask_simple=ask_simple)])
        self.last_output = out
        return self.mvbench_text(out)

    def chat(self, video, system: str | None = None, **video_kw) -> "ChatSession":
        """A multi-turn conversation about one video."""
        return ChatSession(self, video, system, video_kw)


class ChatSession:
    """Turns about one video. The video tokens are encoded once, with the first question
    (instruction-aware Q-Former), and every later prompt extends the previous one, so its KV comes
    from the prefix cache."""

    def __init__(self, llm: STLLM, video, system: str | None, video_kw: dict[str, Any]) -> None:
        bad = set(video_kw) - (_REQUEST_KEYS - {"system", "history"})
        if bad:
            raise TypeError(f"unknown chat options {sorted(bad)}")
        self.llm = llm
        self.video = video
        self.system = system
        self.video_kw = video_kw
        self.history: list[tuple[str, str]] = []
        self.outputs: list[RequestOutput] = []
        self._prepared = None

    def prompt_text(self, question: str) -> str:
        return chat_turns_prompt(question, self.history, self.system)

    def ask(self, question: str, **kw) -> str:
        eng = self.llm.engine
        params, req = self.llm._split(kw)
        if req:
            raise TypeError(f"per-turn options {sorted(req)} are fixed for the session; pass them to chat()")
        try:  # bad input raises RequestFailedError, as from answer()
            if not isinstance(question, str):
                raise TypeError(f"question must be a str, got {type(question).__name__}")
            if self._prepared is None:
                self._prepared = eng.prepare_video(self.video, question, **self.video_kw)
            ids = eng.bos_ids(self.prompt_text(question))
        except Exception as e:  # noqa: BLE001
            raise RequestFailedError(RequestOutput(f"chat-turn-{len(self.history)}", finished=True,
                                                   finish_reason="error", error=error_text(e), exception=e)) from e
        rid = eng.add_prepared(self._prepared.tokens, self._prepared.key, ids, params)
        out = self.llm._run_until_done([rid])[rid]
        self.outputs.append(out)
        self.llm.last_output = out
        answer = self.llm.postprocess(out)
        self.history.append((question, answer))
        return answer
