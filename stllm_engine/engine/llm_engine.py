"""LLMEngine: requests in, one scheduled model step at a time, outputs out.

add_request: video -> frames (``load_video``) -> vision cache / ``encode_vision`` ->
``encode_video(question)`` -> optional keep-ratio token dropping -> prompt ids -> Sequence.
add_mvbench_request: the release's MVBench layout instead (BOS + text | every frame's tokens |
text); add_prepared: ready video tokens and ids, with ``video_start`` ids before the video.
step: schedule -> ``ModelRunner.run`` -> sample (or a beam step) -> append -> stop checks -> free.
A bad request (unreadable video, bad parameters, prompt that cannot fit) finishes alone with
``finish_reason="error"`` and a message; a failing model step fails only the requests in it.
Beam-search requests prefill through the scheduler, then decode their beams together in a
separate runner call each step (``beam_requests.py``). Config: ``engine_config.py``; per-request
records and the release's left truncation: ``request.py``.
"""
from __future__ import annotations

import time

import torch

from stllm_engine.engine.beam_requests import BeamRequests
from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.cpu_malloc import tune_malloc
from stllm_engine.engine.engine_config import (MAX_BLOCKS_PER_SLOT, EngineConfig, default_kv_cache_memory,  # noqa: F401
                                                kv_bytes_per_block)
from stllm_engine.engine.frame_loader import FrameLoader
from stllm_engine.engine.guided import ChoiceGuide, TokenBytes
from stllm_engine.engine.request import Request, truncate_left  # noqa: F401 (re-exported)
from stllm_engine.engine.sampler import Sampler, StopChecker
from stllm_engine.engine.scheduler import Scheduler
from stllm_engine.engine.sequence import Sequence, SequenceStatus, check_priority
from stllm_engine.engine.video_prep import (PreparedVideo, check_prepare_args, decode_video, finish_frames,
                                            needs_decoding, plan_hit, prepare_video, record_plan)
from stllm_engine.engine.metrics import EngineMetrics
from stllm_engine.engine.vision_cache import VisionCache
from stllm_engine.engine.warmup import warm_up
from stllm_engine.outputs import Logprob, ModelStepError, RequestOutput, error_text
from stllm_engine.prompts import (MVBENCH_SYSTEM, chat_turns_prompt, mvbench_prompt_segments, mvbench_question,
                                  mvbench_simple_prompt)
from stllm_engine.sampling_params import SamplingParams

def _import_video_stack() -> None:
    """PyAV and decord (~40 + ~70 ms to import), in that order (:func:`stllm_engine.video.decode.
    import_decord`): PyAV decodes most files' pixels, reads GIFs, and is the fallback decoder."""
    import stllm_engine.video  # noqa: F401

    for name in ("av", "decord"):
        try:
            __import__(name)
        except ImportError:  # the other one serves
            pass


def _check_question(question) -> None:
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")


class LLMEngine(BeamRequests):
    def __init__(self, model, tokenizer, config: EngineConfig | None = None) -> None:
        from stllm_engine.engine.model_runner import ModelRunner

        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        self.bytes_per_block = kv_bytes_per_block(model, cfg.block_size)
        self.max_positions = model.config.llm.max_position_embeddings
        self.max_length = min(cfg.max_length, self.max_positions)
        blocks_per_seq = -(-self.max_length // cfg.block_size)
        num_blocks = cfg.num_kv_blocks
        if num_blocks is None:  # sized from memory (the device's default when not given)
            memory = cfg.kv_cache_memory or default_kv_cache_memory(
                model.device, self.bytes_per_block, MAX_BLOCKS_PER_SLOT * cfg.max_num_seqs * blocks_per_seq,
                seq_blocks=blocks_per_seq)
            num_blocks = memory // self.bytes_per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={memory} bytes holds no KV block "
                                 f"({self.bytes_per_block} bytes each at block_size {cfg.block_size})")
        model.allocate_kv_cache(num_blocks, cfg.block_size)
        # no sequence outgrows max_length, so no block table is wider than this
        self.runner = ModelRunner(model, graph_batch=None if cfg.enforce_eager else cfg.max_num_seqs,
                                  graph_blocks=blocks_per_seq,
                                  prefill_graph_tokens=None if cfg.enforce_eager else cfg.max_num_batched_tokens)
        self.video_graphs = None  # CUDA: the ViT and Q-Former passes as graphs, captured per shape
        if model.device.type == "cuda" and not cfg.enforce_eager:
            from stllm_engine.engine.video_graphs import VideoGraphs

            self.video_graphs = VideoGraphs(model)
        self.num_kv_blocks = num_blocks
        self.eos_token_id = tokenizer.eos_token_id
        self.sampler = Sampler(self.eos_token_id)
        self._token_bytes: TokenBytes | None = None  # built on the first request with choices
        self.frame_loader = FrameLoader(cfg.frame_workers)
        _import_video_stack()  # decord & co. load now, not inside the first request's TTFT
        # CPU: freed activations stay mapped between passes (process-wide; see cpu_malloc.py)
        self.malloc = tune_malloc() if model.device.type == "cpu" else "default"
        self.reset_state()
        self.warmup_s = warm_up(self) if cfg.resolved_warmup(model.device) else None

    def reset_state(self) -> None:
        """Empty KV pool (no cached prefixes), empty vision cache, zero counters; only while no
        request is live (e.g. after :func:`~stllm_engine.engine.warmup.warm_up`)."""
        if getattr(self, "_requests", None):
            raise RuntimeError("reset_state needs an idle engine (requests are live)")
        cfg = self.config
        self.block_manager = BlockManager(self.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                          self.bytes_per_block)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.resolved_long_prefill_token_threshold())
        self.vision_cache = VisionCache(cfg.vision_cache_bytes)
        self.metrics = EngineMetrics()
        self._requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        self._pending: list[RequestOutput] = []
        self._next_id = 0

    # --- requests ---------------------------------------------------------------------------
    def prompt_ids(self, question: str, system: str | None = None, history=()) -> list[int]:
        """BOS + system + "###Human: " + question + " ###Assistant: " as the release tokenizes it;
        with ``history`` ((question, answer) pairs before this question) the multi-turn
        conversation of :func:`chat_turns_prompt`.

        The release re-assigns the tokenizer's bos to "</s>" on this path, so the first id is EOS
        (see ``stllm_engine.reference.chat``)."""
        return self.bos_ids(chat_turns_prompt(question, history, system))

    def bos_ids(self, text: str) -> list[int]:
        """BOS + ``text``, as the release tokenizes a prompt segment with BOS: its BOS is "</s>" (EOS's id)."""
        return [self.tokenizer.eos_token_id] + list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def mvbench_prompt_ids(self, question: str, system: str = MVBENCH_SYSTEM,
                           ask_simple: bool = False) -> tuple[list[int], int]:
        """(ids, video_start) of the release's MVBench prompt for an already formatted
        ``mvbench_question``: BOS (``</s>``, as :meth:`prompt_ids`) + text before the video, then
        the text after it (no BOS); the video goes at position ``video_start``. ``ask_simple``:
        the published script's layout, video first then BOS + :func:`mvbench_simple_prompt`."""
        if ask_simple:
            return self.bos_ids(mvbench_simple_prompt(question, system)), 0
        before, after = mvbench_prompt_segments(question, system)
        head = self.bos_ids(before)
        return head + list(self.tokenizer(after, add_special_tokens=False).input_ids), len(head)

    def prepare_video(self, video, question: str, **kw) -> PreparedVideo:
        """Video tokens for ``question`` now, on this thread: decoding (if any) may use
        ``config.decode_threads`` parallel readers, as no model pass runs meanwhile."""
        return prepare_video(self.model, self.vision_cache, video, question,
                             decode_workers=self.config.resolved_decode_threads(),
                             graphs=self.video_graphs, **kw)

    def add_request(self, video, question: str, params: SamplingParams | None = None, *,
                    request_id: str | None = None, system: str | None = None, history=None,
                    num_frames: int | None = None, keep_ratio: float = 1.0, keep_mode: str = "even",
                    keep_seed: int = 0, sampling: str = "uniform", priority: int = 0) -> str:
        """Queue one question about one video; returns its request id (errors end up in its output).
        ``priority``: lower values are scheduled first and may preempt running requests of higher
        values (vLLM's convention; equal priorities are first come, first served).

        ``history``: earlier (question, answer) turns of a conversation about this video, oldest
        first. As in :meth:`STLLM.chat`, the video tokens are then the first question's (the
        Q-Former reads the first question) and the prompt is the whole conversation, so a
        follow-up sent with its history (a stateless HTTP client) reuses the previous turn's KV
        blocks from the prefix cache."""
        def build(req: Request) -> None:
            _check_question(question)
            turns = () if history is None else history
            ids = self.prompt_ids(question, system, turns)  # checks the history (chat_turns_prompt)
            self._prepare_then(req, video, turns[0][0] if turns else question, lambda pv: self._admit(
                req, pv.tokens, pv.key, ids), num_frames=num_frames,
                keep_ratio=keep_ratio, keep_mode=keep_mode, keep_seed=keep_seed, sampling=sampling)
        return self._queue(request_id, params, build, priority)

    def add_mvbench_request(self, video, question: str, candidates, params: SamplingParams | None = None, *,
                            request_id: str | None = None, num_frames: int | None = None, bound=None,
                            system: str | None = MVBENCH_SYSTEM, video_tokens: str = "frames",
                            priority: int = 0, ask_simple: bool = False) -> str:
        """Queue an MVBench multiple-choice question the release's way (``infer_mvbench``): MVBench
        frame sampling (``bound`` in seconds), the formatted question into the Q-Former, every
        frame's tokens concatenated whatever the variant (``video_tokens="own"``: the checkpoint's
        projector instead), BOS + text | video | text (``ask_simple``: video | BOS + text, the
        published ``test_mvbench.sh`` layout). ``system=None``: ``MVBENCH_SYSTEM``."""
        def build(req: Request) -> None:
            _check_question(question)
            if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
                raise TypeError(f"candidates must be a list of str, got {candidates!r}")
            q = mvbench_question(question, list(candidates))
            ids, video_start = self.mvbench_prompt_ids(q, MVBENCH_SYSTEM if system is None else system,
                                                       bool(ask_simple))
            self._prepare_then(req, video, q, lambda pv: self._admit(req, pv.tokens, pv.key, ids, video_start),
                               num_frames=num_frames, sampling="mvbench", bound=bound, video_tokens=video_tokens)
        return self._queue(request_id, params, build, priority)

    def _queue(self, request_id: str | None, params, build, priority: int = 0) -> str:
        """Register a request, check its params, then ``build(req)`` admits it; any error fails
        this request only (its output carries the message)."""
        rid = self._new_id(request_id)
        req = Request(rid, params, time.perf_counter())
        self._requests[rid] = req
        try:
            if params is not None and not isinstance(params, SamplingParams):
                raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
            req.params = params or SamplingParams()
            req.priority = check_priority(priority)  # now, not after the video decoded
            req.guide = self._guide(req.params)
            build(req)
        except Exception as e:  # noqa: BLE001 - any bad input fails this request only
            self._fail(req, e)
        return rid

    def _guide(self, p: SamplingParams):
        """Check a request's token ids against the vocabulary; its choices' guide (or None)."""
        vocab = self.model.config.llm.vocab_size
        for name, ids in (("logit_bias", p.logit_bias or ()), ("allowed_token_ids", p.allowed_token_ids or ())):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name}: token id {bad[0]} is outside the vocabulary "
                                 f"({vocab} tokens)")
        if p.choices is None:
            return None
        if self.eos_token_id is None:
            raise ValueError("SamplingParams.choices needs a tokenizer with an EOS token (it ends the choice)")
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        guide = ChoiceGuide(p.choices, self._token_bytes, self.eos_token_id)
        guide.allowed([])  # every choice can start: fails here, not at the first step
        return guide

    def _prepare_timed(self, req: Request, video, question: str, **kw) -> PreparedVideo:
        pv = self.prepare_video(video, question, **kw)
        t = req.timings
        t.frame_decode, t.vision, t.qformer = pv.frame_decode_s, pv.vision_s, pv.qformer_s
        t.vision_cache_hit, t.video_tokens_cache_hit = pv.cache_hit, pv.tokens_hit
        return pv

    def _prepare_then(self, req: Request, video, question: str, admit, **kw) -> None:
        """Prepare the video tokens and ``admit(pv)``: now when nothing needs decoding (frames
        given, features cached, no frame workers) or the engine is idle (nothing to overlap the
        decode with: decoding inline gave a ~7% lower TTFT than handing it to a thread), else
        after a background decode (``frame_loader.py``), collected by a later ``step``."""
        if not self.frame_loader.enabled or not needs_decoding(video) or self._idle():
            admit(self._prepare_timed(req, video, question, **kw))
            return
        n = check_prepare_args(self.model, **kw)  # bad options fail now, not after a decode
        sampling, bound = kw.get("sampling", "uniform"), kw.get("bound")
        if plan_hit(self.model, self.vision_cache, video, n, sampling, bound):
            admit(self._prepare_timed(req, video, question, **kw))
            return

        def then(decoded, seconds: float) -> None:
            t = time.perf_counter()
            frames = finish_frames(self.model, decoded)
            seconds += time.perf_counter() - t
            record_plan(self.vision_cache, video, frames.content_hash, n, sampling, bound, frames.indices)
            admit(self._prepare_timed(req, frames, question, **kw))
            req.timings.frame_decode = seconds
        self.frame_loader.submit(req.request_id, lambda: decode_video(self.model, video, n, sampling, bound), then)

    def add_prepared(self, video_tokens: torch.Tensor | None, video_key: str, prompt_token_ids: list[int],
                     params: SamplingParams | None = None, *, request_id: str | None = None,
                     video_start: int = 0) -> str:
        """Queue a request whose video tokens and prompt ids are already built (multi-turn chat);
        the first ``video_start`` ids go before the video tokens, the rest after them."""
        return self._queue(request_id, params, lambda req: self._admit(
            req, video_tokens, video_key, list(prompt_token_ids), video_start))

    def _new_id(self, request_id: str | None) -> str:
        generated = False
        while request_id is None or (generated and request_id in self._requests):
            request_id, generated = f"req-{self._next_id}", True  # skips a caller's own "req-N"
            self._next_id += 1
        request_id = str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def _admit(self, req: Request, tokens, key: str, ids: list[int], video_start: int = 0) -> None:
        p = req.params
        lv = 0 if tokens is None else int(tokens.shape[0])
        total = lv + len(ids)
        if total == 0:
            raise ValueError("empty prompt: no video tokens and no text")
        vocab = self.model.config.llm.vocab_size
        if ids and max(ids) >= vocab:
            raise ValueError(f"the LLaMA tokenizer gave id {max(ids)}, outside the checkpoint's vocabulary "
                             f"({vocab} embedding rows): the tokenizer does not match the checkpoint")
        over = total + p.max_new_tokens - self.max_length
        if over > 0:
            if not self.config.truncate_prompt or over >= total:
                raise ValueError(f"context too long: {total} prompt tokens + max_new_tokens {p.max_new_tokens} "
                                 f"> max length {self.max_length} (max_position_embeddings "
                                 f"{self.max_positions}); lower max_new_tokens or use fewer frames")
            tokens, key, ids, video_start = truncate_left(tokens, key, ids, video_start, over)
            req.num_truncated = over
        seq = Sequence(ids, p, video_embeds=tokens, video_key=key if tokens is not None else "",
                       request_id=req.request_id, video_start=video_start, priority=req.priority)
        seq.guide = req.guide
        self.scheduler.add(seq)
        req.seq = seq
        req.logprobs = [] if p.logprobs is not None else None
        req.checker = StopChecker(self.tokenizer, seq, self.eos_token_id, self.max_positions)
        self._by_seq[seq.seq_id] = req

    def _fail(self, req: Request, e: BaseException) -> None:
        req.error = error_text(e)
        req.exception = e.with_traceback(None)  # kept with the output: no frames (activations) pinned
        req.finish_reason = "error"
        self._release(req)
        self._pending.append(self._output(req, ""))
        self._requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state; its final output (finish_reason "abort") comes with the next step."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self.frame_loader.cancel(request_id)
        self._release(req)
        self._pending.append(self._output(req, ""))
        self._requests.pop(request_id, None)
        return True

    def progress(self, request_id: str) -> dict | None:
        """Where an unfinished request stands, for progress displays: ``{"phase": "video"}`` while
        its frames decode and its video encodes, ``{"phase": "prefill", "done": n, "total": N}``
        (prompt positions computed, chunk by chunk for long videos), ``{"phase": "decode",
        "done": k, "total": max_new_tokens}`` (tokens generated; beam search: of the best beam so
        far); None for an unknown or finished request."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if req.beams is not None:
            seqs = req.beams.sequences
            return {"phase": "decode", "done": max((s.num_output_tokens for s in seqs), default=0),
                    "total": req.params.max_new_tokens}
        seq = req.seq
        if seq is None:
            return {"phase": "video"}
        if seq.num_computed_tokens < seq.num_prompt_tokens and not seq.output_token_ids:
            return {"phase": "prefill", "done": seq.num_computed_tokens, "total": seq.num_prompt_tokens}
        return {"phase": "decode", "done": seq.num_output_tokens, "total": req.params.max_new_tokens}

    def _release(self, req: Request) -> None:
        if req.beams is not None:
            req.beams.release()
            req.beams = None
        if req.seq is not None and req.seq.params.num_beams > 1:
            self._forget_beams(req)  # live and pruned beams (a failed or aborted search too)
        if req.seq is not None:
            if not req.seq.is_finished:
                if self.scheduler.abort(req.seq.seq_id) is None and req.seq.block_table:
                    self.block_manager.free(req.seq)
            self._by_seq.pop(req.seq.seq_id, None)
            self.sampler.forget(req.seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._pending)

    # --- stepping ---------------------------------------------------------------------------
    def _model_busy(self) -> bool:
        """A model step has work: scheduled sequences or running beam groups."""
        return self.scheduler.has_work() or any(r.beams is not None for r in self._requests.values())

    def _idle(self) -> bool:
        return not self._model_busy() and not len(self.frame_loader)

    def _collect_frames(self) -> None:
        """Admit the requests whose background decode finished (waits for one when nothing else
        could run this step, instead of spinning)."""
        for rid, then, frames, seconds, err in self.frame_loader.collect(block=not self._model_busy()):
            req = self._requests.get(rid)
            if req is None:  # aborted while decoding
                continue
            try:
                if err is not None:
                    raise err
                then(frames, seconds)
            except Exception as e:  # noqa: BLE001 - this request only
                self._fail(req, e)

    def step(self) -> list[RequestOutput]:
        """Run one model step; returns outputs of the requests that progressed or ended."""
        if len(self.frame_loader):
            self._collect_frames()
        outs, self._pending = self._pending, []
        touched: dict[str, str] = {}
        for req in [r for r in self._requests.values() if r.beams is not None]:
            if req.beams is not None:  # not requeued by an earlier beam request's step
                self._beam_step(req, outs)
        self._beams_yield_to_priority()
        batch = self.scheduler.schedule()
        if batch:
            self.runner.copy_blocks(batch.copies)
            t0 = time.perf_counter()
            try:
                logits = self.runner.run(batch.items)
            except Exception as e:  # noqa: BLE001 - fail the requests of this step only
                for seq, _ in batch.items:
                    req = self._by_seq.get(seq.seq_id)
                    if req is not None:
                        self._fail(req, ModelStepError(e))
                return outs + self._drain()
            if logits.is_cuda:  # the pass's kernels, not their launches (the sampler waits anyway)
                torch.cuda.synchronize(logits.device)
            dt = time.perf_counter() - t0
            for seq, n in batch.items:
                if seq.num_output_tokens == 0 or n > 1:
                    self._by_seq[seq.seq_id].timings.prefill += dt
            sampled = self.scheduler.update(batch)
            rows = {s.seq_id: i for i, s in enumerate(sampled)}
            plain = [s for s in sampled if s.params.num_beams == 1]
            tokens = self._sample(logits[[rows[s.seq_id] for s in plain]], plain) if plain else []
            self._record_logprobs(logits, rows, plain, tokens)
            now = time.perf_counter()
            for seq, tok in zip(plain, tokens):
                req = self._by_seq[seq.seq_id]
                if isinstance(tok, Exception):
                    self._fail(req, RuntimeError(f"sampling failed: {type(tok).__name__}: {tok}"))
                    continue
                seq.append_token(tok)
                self._on_token(req, now)
                try:
                    reason = req.checker.update()
                    delta = req.checker.delta(reason is not None)
                except Exception as e:  # noqa: BLE001 - e.g. the tokenizer cannot decode: this request only
                    self._fail(req, RuntimeError(f"detokenizing failed: {type(e).__name__}: {e}"))
                    continue
                if reason:
                    self.scheduler.finish(seq, reason)
                    req.finish_reason = reason
                touched[req.request_id] = delta
            for seq in sampled:
                if seq.params.num_beams > 1 and seq.status == SequenceStatus.RUNNING:  # not preempted since
                    self._start_beams(self._by_seq[seq.seq_id], logits[rows[seq.seq_id]], outs)
        for rid, delta in touched.items():
            req = self._requests[rid]
            outs.append(self._output(req, delta))
            if req.finish_reason:
                self._finish(req)
        return outs + self._drain()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list:
        """Token per sequence; if the batch fails (e.g. NaN logits), retry one by one so that only
        the failing sequences get the exception instead of a token."""
        try:
            return self.sampler(logits, seqs)
        except Exception:  # noqa: BLE001
            out = []
            for i, s in enumerate(seqs):
                try:
                    out.append(self.sampler(logits[i:i + 1], [s])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    def _record_logprobs(self, logits: torch.Tensor, rows: dict, seqs: list[Sequence], tokens: list) -> None:
        """Append each sampled token's log-probability (and its step's top ``params.logprobs``)
        to its request, for the sequences that asked: a log-softmax of the raw logits."""
        want = [(s, t) for s, t in zip(seqs, tokens) if s.params.logprobs is not None and not isinstance(t, Exception)]
        if not want:
            return
        lp = torch.log_softmax(logits[[rows[s.seq_id] for s, _ in want]].float(), dim=-1)
        k = max(s.params.logprobs for s, _ in want)
        top_v, top_i = torch.topk(lp, k, dim=-1) if k else (None, None)
        chosen = lp.gather(1, torch.tensor([[t] for _, t in want], device=lp.device))[:, 0].tolist()
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        for j, (seq, tok) in enumerate(want):
            n = seq.params.logprobs
            top = list(zip(top_i[j][:n], top_v[j][:n])) if n else []
            self._by_seq[seq.seq_id].logprobs.append(Logprob(int(tok), chosen[j], top))

    def _drain(self) -> list[RequestOutput]:
        outs, self._pending = self._pending, []
        return outs

    def _on_token(self, req: Request, now: float) -> None:
        if req.first_token_at is None:
            req.first_token_at = now
            req.timings.ttft = now - req.arrival

    def _finish(self, req: Request) -> None:
        self._release(req)
        self._requests.pop(req.request_id, None)

    # --- outputs ----------------------------------------------------------------------------
    def _output(self, req: Request, delta: str) -> RequestOutput:
        seq, t = req.seq, req.timings
        now = time.perf_counter()
        finished = req.finish_reason is not None
        beam_done = req.final_text is not None
        ids = list(req.token_ids) if beam_done or seq is None else list(seq.output_token_ids)
        if beam_done:
            text = req.final_text
        else:
            text = req.checker.text if req.checker is not None and req.error is None else ""
        if finished:
            t.total = now - req.arrival
            if req.first_token_at is not None:
                t.decode = now - req.first_token_at
                t.num_decode_tokens = max(0, len(ids) - 1)
        out = RequestOutput(
            request_id=req.request_id, text=text, delta=delta, token_ids=ids, finished=finished,
            finish_reason=req.finish_reason,
            stop_reason=req.checker.stop_string if finished and req.checker is not None else None,
            logprobs=None if req.logprobs is None else list(req.logprobs),
            error=req.error, exception=req.exception, num_prompt_tokens=seq.num_prompt_tokens if seq else 0,
            num_cached_tokens=seq.num_cached_tokens if seq else 0,
            num_preemptions=seq.num_preemptions if seq else 0, num_truncated_prompt_tokens=req.num_truncated,
            timings=t)
        if finished and not req.counted:
            req.counted = True
            self.metrics.observe(out)
        return out

    def stats(self) -> dict:
        return {"kv": self.block_manager.stats(), "vision_cache": self.vision_cache.stats(),
                "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "requests": self.metrics.as_dict(), "kernels": self.kernels()}

    def kernels(self) -> dict:
        """Which kernel paths this engine's model runs (for /health and benchmark reports)."""
        from stllm_engine.model import cpu_decode, fused_swiglu
        from stllm_engine.ops.attention import cpu_prefill_attention_kernel, cuda_attention_kernel

        device, dtype = self.model.device, self.model.dtype
        on_cpu = device.type == "cpu"
        return {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "prefill_attention": cpu_prefill_attention_kernel(dtype) if on_cpu else "triton",
                "vision_attention": cpu_prefill_attention_kernel(dtype) if on_cpu else cuda_attention_kernel(uniform=True),
                "decode_attention": "c++ paged" if on_cpu else "triton paged", "malloc": self.malloc,
                "decode_pass": ("c++ layer loop" if cpu_decode.enabled() else "python layer loop") if on_cpu
                else self.runner.decode_mode(),
                "prefill_pass": "eager" if on_cpu else self.runner.prefill_mode(),
                "prefill_mlp": fused_swiglu.describe(self.model) if on_cpu else "gate_up gemm + triton swiglu",
                "video_pass": "eager" if self.video_graphs is None else self.video_graphs.describe()}
