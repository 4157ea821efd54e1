"""Continuous batching: which sequences run this step, and how many of their tokens.

One step mixes decodes (1 token each) and prefill chunks under ``max_num_batched_tokens`` and
``max_num_seqs``. Running sequences are served first in arrival order (a long prefill admitted
earlier keeps its place and advances by a chunk every step), then waiting ones strictly in order
(the head of the queue is never skipped, so nothing starves). When a running sequence needs a
block and none is free, the newest running sequence is preempted by recompute: its blocks are
freed and it goes back to the front of the queue; its outputs are prefilled again with its prompt
(published blocks usually come back as prefix-cache hits).
"""
from __future__ import annotations

from collections import deque
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


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"Scheduler: max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"Scheduler: max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # --- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        bm = self.block_manager
        need = (seq.num_prompt_tokens + seq.params.max_new_tokens + bm.block_size - 1) // bm.block_size
        if need > bm.num_blocks:
            raise ValueError(f"request {seq.request_id!r} needs up to {need} KV blocks "
                             f"({seq.num_prompt_tokens} prompt + {seq.params.max_new_tokens} new tokens, "
                             f"block size {bm.block_size}) but the KV pool has only {bm.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

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
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        if batch is not None:
            batch.preempted.append(seq)

    def preempt_newest(self) -> Sequence | None:
        """Preempt (free, back to the front of the queue) the newest running sequence; for
        callers outside ``schedule`` that need blocks, e.g. beams forking. None if none runs."""
        if not self.running:
            return None
        seq = self.running.pop()
        self._preempt(seq)
        return seq

    def has_work(self) -> bool:
        """Any sequence waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            if not seq.is_prefill:  # decode: needs a private slot for its newest token
                while not bm.can_append(seq):
                    if queue:
                        self._preempt(queue.pop(), batch)  # newest first
                    else:
                        break
                if not bm.can_append(seq):
                    self._preempt(seq, batch)
                    continue
                batch.copies += bm.append_slot(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.items.append((seq, n))
            budget -= n
            kept.append(seq)
        kept += queue  # not scheduled this step (budget spent), keep their order
        self.running = kept
        # preempted ones were pushed to the front in reverse age order; restore arrival order
        if len(batch.preempted) > 1:
            pre = [self.waiting.popleft() for _ in batch.preempted]
            for s in sorted(pre, key=lambda s: s.seq_id, reverse=True):
                self.waiting.appendleft(s)

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch.preempted and seq in batch.preempted:
                break  # no room this step for what was just preempted
            if not bm.can_allocate(seq):
                break  # FCFS: the head waits, nobody overtakes it
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            n = min(seq.num_uncomputed_tokens, budget)
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
