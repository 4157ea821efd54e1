"""Beam search with ``transformers``' semantics over paged, shared KV blocks.

Mirrors ``GenerationMixin._beam_search`` (early_stopping=False, one returned sequence) with the
prompt given as embeddings, so lengths count generated tokens only:
  * start: ``num_beams`` copies of the prompt, scores [0, -1e9, ...];
  * each step: log_softmax, then the logits processors (repetition penalty, min tokens) on the
    log-probs, plus the beam score; top ``2*num_beams`` candidates over (beam, token);
  * a candidate that hits a stop criterion (EOS, stop ids/strings, max_new_tokens) among the top
    ``num_beams`` becomes a finished hypothesis scored ``logprob_sum / gen_len**length_penalty``;
    the best ``num_beams`` unfinished candidates continue;
  * stop when no running beam can beat the worst kept hypothesis (scored at the current length),
    or when every candidate hit a stop criterion.
Beams are :class:`Sequence` objects: a parent chosen k times is forked k-1 times through
``BlockManager.fork`` (blocks shared; the shared last block is copied on write by
``append_slot``); parents not chosen are freed.
"""
from __future__ import annotations

from typing import Callable

import torch

from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.sampler import process_logits
from stllm_engine.engine.sequence import Sequence, SequenceStatus

NEG = -1.0e9


def clone_sequence(parent: Sequence) -> Sequence:
    """A new Sequence with the parent's tokens and state (blocks are attached by ``fork``)."""
    child = Sequence(parent.prompt_token_ids, parent.params, video_embeds=parent.video_embeds,
                     video_key=parent.video_key, request_id=parent.request_id,
                     video_start=parent.video_start, priority=parent.priority)
    child.output_token_ids = list(parent.output_token_ids)
    child.guide = parent.guide
    child.arrival = parent.arrival
    child.cumulative_logprob = parent.cumulative_logprob
    child.num_cached_tokens = parent.num_cached_tokens
    child.status = parent.status
    return child


class BeamGroup:
    """The beams of one request. ``rows`` are the running beams (logits come in this order).

    is_stop(tokens) -> bool: whether generated ``tokens`` end with a stop id sequence / string
    (EOS is checked here, per candidate); max_len: generated-length cap (max_new_tokens, or less
    near the model's maximum positions); broadcast_stop: the release's "###" criterion judges the
    best candidate only and stops every candidate with it (``StoppingCriteriaSub`` reads row 0).
    """

    def __init__(self, root: Sequence, block_manager: BlockManager, eos_token_id: int | None,
                 is_stop: Callable[[list[int]], bool], max_len: int, broadcast_stop: bool = True) -> None:
        nb = root.params.num_beams
        self.num_beams = nb
        self.bm = block_manager
        self.eos_token_id = eos_token_id
        self.is_stop = is_stop
        self.max_len = max_len
        self.broadcast_stop = broadcast_stop
        self.length_penalty = float(root.params.length_penalty)
        self.rows: list[Sequence] = [root] * nb
        self.scores = torch.full((nb,), NEG, dtype=torch.float32)
        self.scores[0] = 0.0
        self.fin_scores = torch.full((nb,), NEG, dtype=torch.float32)
        self.fin_tokens: list[list[int]] = [[] for _ in range(nb)]
        self.fin_flags = torch.zeros(nb, dtype=torch.bool)
        self.unsatisfied = True
        self.cur_len = len(root.output_token_ids)
        self.done = False

    @property
    def sequences(self) -> list[Sequence]:
        """Distinct running Sequence objects."""
        seen, out = set(), []
        for s in self.rows:
            if id(s) not in seen:
                seen.add(id(s))
                out.append(s)
        return out

    def step(self, logits: torch.Tensor) -> list[tuple[int, int]]:
        """Consume logits [num_beams, V] of ``rows``; returns block copies for the next step."""
        nb = self.num_beams
        if logits.shape[0] != nb:
            raise ValueError(f"beam step: {logits.shape[0]} logit rows for {nb} beams")
        V = logits.shape[-1]
        lp = torch.log_softmax(logits.float().cpu(), dim=-1)  # beam bookkeeping lives on the CPU
        lp = torch.stack([process_logits(lp[i], self.rows[i], self.eos_token_id) for i in range(nb)])
        acc = (lp + self.scores[:, None]).reshape(-1)
        k = 2 * nb  # transformers' beams_to_keep = max(2, 1 + number of EOS ids) * num_beams
        vals, idx = torch.topk(acc, k)
        parents = (idx // V).tolist()
        toks = (idx % V).tolist()
        cands = [self.rows[p].output_token_ids + [t] for p, t in zip(parents, toks)]
        hits = self._hits(cands)

        run_scores = vals + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_scores, nb).indices.tolist()

        top_mask = torch.zeros(k, dtype=torch.bool)
        top_mask[:nb] = True
        just_fin = hits & top_mask
        fin_new = vals / ((self.cur_len + 1) ** self.length_penalty)
        fin_new = fin_new + float(not self.unsatisfied) * NEG
        fin_new = fin_new + (~just_fin).to(torch.float32) * NEG
        merged = torch.cat([self.fin_scores, fin_new])
        keep = torch.topk(merged, nb).indices.tolist()
        all_tokens = self.fin_tokens + cands
        all_flags = torch.cat([self.fin_flags, just_fin])
        self.fin_scores = merged[keep]
        self.fin_tokens = [all_tokens[i] for i in keep]
        self.fin_flags = all_flags[keep]

        self.cur_len += 1
        new_scores = run_scores[nxt]
        best = new_scores[0] / (self.cur_len ** self.length_penalty)
        worst = torch.where(self.fin_flags, self.fin_scores.min(), torch.tensor(NEG))
        self.unsatisfied = self.unsatisfied and bool(torch.any(best > worst))
        self.done = (not self.unsatisfied) or bool(hits.all())
        self.scores = new_scores
        if self.done:
            self.release()
            return []
        return self._advance([parents[j] for j in nxt], [toks[j] for j in nxt])

    def _hits(self, cands: list[list[int]]) -> torch.Tensor:
        k = len(cands)
        if self.cur_len + 1 >= self.max_len:  # MaxLengthCriteria: every candidate
            return torch.ones(k, dtype=torch.bool)
        ignore_eos = self.rows[0].params.ignore_eos
        eos = [not ignore_eos and c[-1] == self.eos_token_id for c in cands]
        if self.broadcast_stop:
            stop = [self.is_stop(cands[0])] * k
        else:
            stop = [self.is_stop(c) for c in cands]
        return torch.tensor([a or b for a, b in zip(eos, stop)], dtype=torch.bool)

    def _advance(self, parent_rows: list[int], tokens: list[int]) -> list[tuple[int, int]]:
        old = self.rows
        used: dict[int, int] = {}
        new_rows: list[Sequence] = []
        for p in parent_rows:
            seq = old[p]
            if id(seq) in used:
                child = clone_sequence(seq)
                self.bm.fork(seq, child)
                new_rows.append(child)
            else:
                used[id(seq)] = 1
                new_rows.append(seq)
        kept = {id(s) for s in new_rows}
        for s in {id(s): s for s in old}.values():
            if id(s) not in kept:
                self.bm.free(s)
                s.finish("beam_pruned")
        self.rows = new_rows  # before append_slot: a failure there must still free every beam
        copies: list[tuple[int, int]] = []
        for seq, t in zip(new_rows, tokens):
            seq.append_token(t)
            seq.status = SequenceStatus.RUNNING
            copies += self.bm.append_slot(seq)
        return copies

    def best(self) -> list[int]:
        """Generated ids of the best finished hypothesis."""
        return list(self.fin_tokens[0])

    def release(self) -> None:
        """Free every running beam's blocks."""
        for s in self.sequences:
            if s.block_table:
                self.bm.free(s)
        self.rows = []
