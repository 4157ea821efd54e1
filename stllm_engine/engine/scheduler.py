"""Continuous batching: which sequences run this step, and how many of their tokens.

One step mixes decodes (1 token each) and prefill chunks under ``max_num_batched_tokens`` and
``max_num_seqs``. Sequences are ordered by (priority, arrival): a lower ``priority`` value first
(vLLM's convention; all 0 by default), then first come first served. Running sequences are served
first, decodes before prefill chunks and each in that order (a long prefill admitted earlier
keeps its place and advances by a chunk every step, and the running answers keep decoding beside
it; while the head of the queue could be admitted, a prefill chunk takes at most
``long_prefill_token_threshold`` tokens, so a short request that arrives during a long video's
prefill starts in the next step instead of after it, as vLLM's threshold does), then waiting ones strictly in order (the head of the queue is never skipped, so among equal
priorities nothing starves; a lower priority waits while higher ones keep coming). When a running
sequence needs a block and none is free, the last running sequence in that order is preempted by
recompute: its blocks are freed and it goes back to the queue in its place; its outputs are
prefilled again with its prompt (published blocks usually come back as prefix-cache hits). A
waiting sequence of a higher priority than running ones that has no room (blocks or
``max_num_seqs``) preempts them, lowest priority first.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """items: (sequence, number of new positions to compute); copies: (src, dst) block copies
    to make before the step (copy-on-write); preempted: sequences sent back to the queue."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def order(seq: Sequence) -> tuple[int, int]:
    """Scheduling order: priority (lower first), then arrival (``Scheduler.add`` order)."""
    return seq.priority, seq.arrival


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, long_prefill_token_threshold: int | None = None) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"Scheduler: max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"Scheduler: max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by ``order``
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._arrivals = itertools.count()

    # --- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        bm = self.block_manager
        need = (seq.num_prompt_tokens + seq.params.max_new_tokens + bm.block_size - 1) // bm.block_size
        if need > bm.num_blocks:
            raise ValueError(f"request {seq.request_id!r} needs up to {need} KV blocks "
                             f"({seq.num_prompt_tokens} prompt + {seq.params.max_new_tokens} new tokens, "
                             f"block size {bm.block_size}) but the KV pool has only {bm.num_blocks}")
        seq.status = SequenceStatus.WAITING
        seq.arrival = next(self._arrivals)
        bisect.insort(self.waiting, seq, key=order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence in any state, free its blocks, mark it finished ("abort")."""
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                break
        else:
            for seq in self.running:
                if seq.seq_id == seq_id:
                    self.running.remove(seq)
                    break
            else:
                return None
        self.block_manager.free(seq)
        seq.finish("abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a running sequence finished and release its blocks."""
        seq.finish(reason)
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)

    # --- one step ---------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, batch: ScheduledBatch | None = None) -> None:
        self.block_manager.free(seq)
        self.requeue(seq)
        if batch is not None:
            batch.preempted.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Put a preempted sequence that holds no blocks back in the queue, in its place (its
        arrival is kept); e.g. the prompt of a beam-search request whose beams were freed."""
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=order)

    def preempt_last(self) -> Sequence | None:
        """Preempt (free, back to the queue) the last running sequence in scheduling order (the
        lowest priority, newest); for callers outside ``schedule`` that need blocks, e.g. beams
        forking. None if none runs."""
        if not self.running:
            return None
        seq = max(self.running, key=order)
        self.running.remove(seq)
        self._preempt(seq)
        return seq

    def _make_room_for_priority(self, batch: ScheduledBatch) -> None:
        """Preempt running sequences of a lower priority than the waiting head while it has no
        room (blocks or ``max_num_seqs``), lowest first."""
        bm = self.block_manager
        while self.waiting and self.running:
            head, last = self.waiting[0], max(self.running, key=order)
            if last.priority <= head.priority:
                return
            if len(self.running) < self.max_num_seqs and bm.can_allocate(head):
                return
            self.running.remove(last)
            self._preempt(last, batch)

    def has_work(self) -> bool:
        """Any sequence waiting or running."""
        return bool(self.waiting or self.running)

    def _chunk_cap(self) -> int:
        """The most tokens one prefill chunk takes now: the threshold while the queue's head
        could be admitted (a free slot and its blocks), else the whole budget."""
        if (self.waiting and len(self.running) < self.max_num_seqs
                and self.block_manager.can_allocate(self.waiting[0])):
            return self.long_prefill_token_threshold
        return self.max_num_batched_tokens

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self._make_room_for_priority(batch)
        cap = self._chunk_cap()
        # decodes first (a token each), then prefill chunks, each group in order: a long prefill
        # never stalls the running answers (as vLLM's chunked prefill)
        queue = sorted(self.running, key=lambda s: (s.is_prefill, order(s)))
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            if not seq.is_prefill:  # decode: needs a private slot for its newest token
                while not bm.can_append(seq):
                    victim = max(queue, key=order, default=None)
                    if victim is None or order(victim) < order(seq):
                        break
                    queue.remove(victim)
                    self._preempt(victim, batch)  # the last in order first
                if not bm.can_append(seq):
                    self._preempt(seq, batch)
                    continue
                batch.copies += bm.append_slot(seq)
            n = min(seq.num_uncomputed_tokens, budget, cap)
            batch.items.append((seq, n))
            budget -= n
            kept.append(seq)
        kept += queue  # not scheduled this step (budget spent)
        self.running = sorted(kept, key=order)

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch.preempted and seq in batch.preempted:
                break  # no room this step for what was just preempted
            if not bm.can_allocate(seq):
                break  # the head waits, nobody overtakes it
            self.waiting.pop(0)
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            n = min(seq.num_uncomputed_tokens, budget, self._chunk_cap())
            batch.items.append((seq, n))
            budget -= n
            self.running.append(seq)
        return batch

    def update(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance computed counts after the runner ran ``batch``; returns the sequences that
        produced logits (their chunk reached their last known token), in batch order."""
        sampled = []
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            self.block_manager.publish(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled
