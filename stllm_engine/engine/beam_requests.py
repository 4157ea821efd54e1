"""Beam-search requests of LLMEngine (a mixin: it uses the engine's runner, block manager,
tokenizer and output helpers).

A beam request prefills through the scheduler like any other; its first sampled row starts a
:class:`BeamGroup` (the sequence leaves the scheduler), and every later step runs all its beams in
one runner call before the scheduled batch. Forks share KV blocks copy-on-write. When the pool is
short of the blocks a beam step may need (one per beam), room is made in scheduling order
(priority, then arrival): first the last scheduled sequences are preempted, then beam requests
that come after this one; if only earlier beam requests hold blocks, this one yields. A preempted
beam request frees every beam and goes back to the queue in its place; its prompt is prefilled
again (mostly prefix-cache hits) and its beam search restarts, which gives the same result (it is
deterministic). So beam requests that each fit the pool alone also finish side by side; one fails
only when it runs alone and still lacks blocks.
"""
from __future__ import annotations

import time

import torch

from stllm_engine.engine.beam_search import BeamGroup
from stllm_engine.engine.request import Request
from stllm_engine.engine.scheduler import order
from stllm_engine.outputs import ModelStepError
from stllm_engine.sampling_params import SamplingParams, newest_stop, stop_at


class BeamRequests:
    def _beam_is_stop(self, params: SamplingParams):
        def is_stop(tokens: list[int]) -> bool:
            if len(tokens) < params.min_new_tokens:
                return False
            if any(tokens[len(tokens) - len(s):] == s for s in params.stop_token_ids if len(tokens) >= len(s)):
                return True
            if params.stop:  # an occurrence the newest token completed, as for one sequence
                return newest_stop(self._beam_text, tokens, params.stop) is not None
            return False
        return is_stop

    def _first_stop(self, ids: list[int], params: SamplingParams) -> tuple[list[int], tuple[int, str] | None]:
        """The best beam up to the first token (from ``min_new_tokens`` on) that completes a stop
        string, and that occurrence: the search stops on the top candidate's stop strings, so
        the best beam may run past one of its own; it ends there, as one sequence would."""
        if not params.stop:
            return ids, None
        start = max(1, params.min_new_tokens)
        prev = self._beam_text(ids[:start - 1]) if start > 1 else ""
        for k in range(start, len(ids) + 1):  # (each prefix decoded once)
            text = self._beam_text(ids[:k])
            hit = stop_at(text, len(prev), params.stop)
            if hit:
                return ids[:k], hit
            prev = text
        return ids, None

    def _beam_text(self, ids: list[int]) -> str:
        """A beam's text as its stop strings are matched (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _start_beams(self, req: Request, logits_row: torch.Tensor, outs: list) -> None:
        seq = req.seq
        self.scheduler.running.remove(seq)
        self._on_token(req, time.perf_counter())
        max_len = min(req.params.max_new_tokens, self.max_positions - seq.num_prompt_tokens)
        req.beams = BeamGroup(seq, self.block_manager, self.eos_token_id, self._beam_is_stop(req.params),
                              max_len, broadcast_stop=self.config.beam_stop_first_row)
        self._beam_consume(req, logits_row.expand(req.params.num_beams, -1), outs)

    def _beam_step(self, req: Request, outs: list) -> None:
        rows = req.beams.rows
        try:
            logits = self.runner.run([(s, 1) for s in rows])
        except Exception as e:  # noqa: BLE001
            self._fail(req, ModelStepError(e))
            return
        for s in req.beams.sequences:
            s.num_computed_tokens = s.num_tokens
            self.block_manager.publish(s)
        self._beam_consume(req, logits, outs)

    def _forget_beams(self, req: Request) -> None:
        """Drop every beam of ``req`` from ``_by_seq`` but its root (pruned beams included)."""
        for sid in [k for k, v in self._by_seq.items() if v is req and k != req.seq.seq_id]:
            del self._by_seq[sid]

    def _requeue_beams(self, req: Request) -> None:
        """Preempt a beam request by recompute: free every beam and queue its prompt again."""
        root = req.seq
        self._forget_beams(req)
        req.beams.release()
        req.beams = None
        self.block_manager.free(root)  # a pruned root was freed already: a no-op then
        root.output_token_ids = []
        root.cumulative_logprob = 0.0
        root.finish_reason = None
        self.scheduler.requeue(root)

    def _make_beam_room(self, req: Request) -> bool:
        """Free one block per beam for ``req``'s step (a fork or copy-on-write each): preempt what
        comes after ``req`` in scheduling order (priority, then arrival), last first - scheduled
        sequences and other beam requests alike. False when only requests before it hold the
        rest: ``req`` is requeued instead (it fails only when it holds every block itself)."""
        sch, mine = self.scheduler, order(req.seq)
        while self.block_manager.num_free_blocks < req.params.num_beams:
            others = [r for r in self._requests.values() if r.beams is not None and r is not req]
            last_seq = max(sch.running, key=order) if sch.running else None
            last_beams = max(others, key=lambda r: order(r.seq)) if others else None
            seq_key = order(last_seq) if last_seq is not None else None
            beam_key = order(last_beams.seq) if last_beams is not None else None
            if seq_key is not None and seq_key > mine and (beam_key is None or seq_key > beam_key):
                sch.preempt_last()
            elif beam_key is not None and beam_key > mine:
                self._requeue_beams(last_beams)
            elif sch.running or others:
                self._requeue_beams(req)
                return False
            else:
                break  # it holds every block itself: g.step fails if it runs out
        return True

    def _beams_yield_to_priority(self) -> None:
        """Before scheduling: while the waiting head has no blocks and a beam request of a lower
        priority (a larger value) runs outside the scheduler, requeue the lowest such one (as
        the scheduler preempts its own lower-priority sequences for the head)."""
        sch = self.scheduler
        while sch.waiting:
            head = sch.waiting[0]
            lower = [r for r in self._requests.values() if r.beams is not None and r.seq.priority > head.priority]
            if not lower or self.block_manager.can_allocate(head):  # (the cheap test first: every step)
                return
            self._requeue_beams(max(lower, key=lambda r: order(r.seq)))

    def _beam_consume(self, req: Request, logits: torch.Tensor, outs: list) -> None:
        if not self._make_beam_room(req):
            return
        g = req.beams
        try:
            copies = g.step(logits)
            self.runner.copy_blocks(copies)
        except RuntimeError as e:  # out of KV blocks while forking beams
            self._fail(req, RuntimeError(f"beam search ran out of KV blocks: {e}"))
            return
        for s in g.sequences:
            self._by_seq[s.seq_id] = req
        if g.done:
            req.token_ids, cut = self._first_stop(g.best(), req.params)
            text = self._beam_text(req.token_ids)
            if cut:
                i, req.checker.stop_string = cut  # the output's stop_reason, as for one sequence
                text = text[:i]
            ended = cut is not None or g.is_stop(req.token_ids) or (
                req.token_ids[-1:] == [self.eos_token_id] and not req.params.ignore_eos)
            req.finish_reason = "stop" if ended or len(req.token_ids) < g.max_len else "length"
            req.beams = None
            req.final_text = text
            self._forget_beams(req)
            self._by_seq.pop(req.seq.seq_id, None)
            outs.append(self._output(req, text))
            self._requests.pop(req.request_id, None)
