"""Beam-search requests of LLMEngine (a mixin: it uses the engine's runner, block manager,
tokenizer and output helpers).

A beam request prefills through the scheduler like any other; its first sampled row starts a
:class:`BeamGroup` (the sequence leaves the scheduler), and every later step runs all its beams in
one runner call before the scheduled batch. Forks share KV blocks copy-on-write. When the pool is
short of the blocks a beam step may need (one per beam), the newest scheduled sequences are
preempted (recomputed later); only when nothing is left to preempt does the beam request fail.
"""
from __future__ import annotations

import time

import torch

from stllm_engine.engine.beam_search import BeamGroup
from stllm_engine.engine.request import Request
from stllm_engine.outputs import MODEL_FAILURE
from stllm_engine.sampling_params import SamplingParams


class BeamRequests:
    def _beam_is_stop(self, params: SamplingParams):
        def is_stop(tokens: list[int]) -> bool:
            if len(tokens) < params.min_new_tokens:
                return False
            if any(tokens[len(tokens) - len(s):] == s for s in params.stop_token_ids if len(tokens) >= len(s)):
                return True
            if params.stop:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                return any(s in text for s in params.stop)
            return False
        return is_stop

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
            self._fail(req, RuntimeError(f"{MODEL_FAILURE}: {type(e).__name__}: {e}"))
            return
        for s in req.beams.sequences:
            s.num_computed_tokens = s.num_tokens
            self.block_manager.publish(s)
        self._beam_consume(req, logits, outs)

    def _beam_consume(self, req: Request, logits: torch.Tensor, outs: list) -> None:
        g = req.beams
        # a step can need one new (or copied-on-write) block per beam: make room by preempting
        # the last running sequences in scheduling order (recomputed later) rather than failing
        while self.block_manager.num_free_blocks < req.params.num_beams:
            if self.scheduler.preempt_last() is None:
                break
        try:
            copies = g.step(logits)
            self.runner.copy_blocks(copies)
        except RuntimeError as e:  # out of KV blocks while forking beams
            self._fail(req, RuntimeError(f"beam search ran out of KV blocks: {e}"))
            return
        for s in g.sequences:
            self._by_seq[s.seq_id] = req
        if g.done:
            req.token_ids = g.best()
            text = self.tokenizer.decode(req.token_ids, skip_special_tokens=True)
            cut = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
            text = text[:min(cut)] if cut else text
            ended = g.is_stop(req.token_ids) or (req.token_ids[-1:] == [self.eos_token_id]
                                                 and not req.params.ignore_eos)
            req.finish_reason = "stop" if ended or len(req.token_ids) < g.max_len else "length"
            req.beams = None
            req.final_text = text
            for sid in [k for k, v in self._by_seq.items() if v is req]:
                del self._by_seq[sid]
            outs.append(self._output(req, text))
            self._requests.pop(req.request_id, None)
