"""Paged-KV block bookkeeping over ``stllm_engine._C.BlockAllocator`` (no tensors).

Prefix reuse: block i of a sequence is published under ``hash(hash of block i-1, its content)``
once its KV is computed. Content is each position's key: the text id, or for a video position a
negative marker derived from the sequence's ``video_key`` (video content hash, frame indices,
variant, question...) and the offset into the video; a block overlapping video positions also
hashes the ``video_key`` itself. So two requests with the same video, question and prompt share
blocks while different videos never do (the allocator verifies the content on a hit); leading
text-only blocks (text before the video, ``video_start``) are shared whatever the video, and
every block after the video inherits its identity through the chain.
Only blocks strictly before the last known token are looked up, so at least the last token is
recomputed and yields logits. Beams share blocks after ``fork``; writing into a shared last block
copies it first (``append_slot`` returns the (src, dst) pairs for the runner to copy).
"""
from __future__ import annotations

import hashlib

from stllm_engine.engine.sequence import Sequence

_MASK63 = (1 << 63) - 1


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest(), "little") & _MASK63


def _allocator_cls():
    import torch  # noqa: F401  (the extension links against libtorch)
    from stllm_engine import _C
    return _C.BlockAllocator


class BlockManager:
    """Allocates, shares and frees KV blocks of sequences.

    ``bytes_per_block``: KV bytes of one block over all layers (K and V), for the stats only.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 bytes_per_block: int = 0) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"BlockManager: num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"BlockManager: block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.bytes_per_block = bytes_per_block
        self.allocator = _allocator_cls()(num_blocks)
        self.hit_blocks = 0
        self.hit_tokens = 0
        self.queried_blocks = 0
        self.copies = 0

    # --- hashing ----------------------------------------------------------------------------
    def block_content(self, seq: Sequence, i: int, ids: list[int] | None = None) -> list[int]:
        """Keys of the positions of full block i: text ids, or for video positions a negative
        marker of the video identity and offset. ``ids``: ``seq.token_ids`` if already at hand."""
        bs = self.block_size
        start, end = i * bs, (i + 1) * bs
        lv, vs = seq.num_video_tokens, seq.video_start
        ve = vs + lv
        ids = seq.token_ids if ids is None else ids
        if end <= vs:  # text before the video
            return ids[start:end]
        if start >= ve:  # text after the video (every block when there is no video)
            return ids[start - lv:end - lv]
        out = ids[start:vs] if start < vs else []
        vdig = _digest(seq.video_key.encode()) & 0x3FFFFFFF
        out += [-1 - ((vdig + p - vs) & 0x7FFFFFFF) for p in range(max(start, vs), min(end, ve))]
        if end > ve:
            out += ids[ve - lv:end - lv]
        return out

    def overlaps_video(self, seq: Sequence, i: int) -> bool:
        """Whether block i holds at least one video position."""
        return seq.num_video_tokens > 0 and i * self.block_size < seq.video_end \
            and (i + 1) * self.block_size > seq.video_start

    def block_hash(self, seq: Sequence, i: int, prev: int, content: list[int]) -> int:
        parts = [prev.to_bytes(8, "little"), len(content).to_bytes(4, "little")]
        if self.overlaps_video(seq, i):
            parts.append(b"video:" + seq.video_key.encode() + b"\0")
        parts.append(b"".join(int(t).to_bytes(8, "little", signed=True) for t in content))
        return _digest(*parts)

    # --- allocation -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free()

    def can_allocate(self, seq: Sequence) -> bool:
        """True if all blocks of the sequence's known tokens fit (prefix hits not counted)."""
        return seq.num_blocks(self.block_size) <= self.allocator.num_free()

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its known tokens, reusing cached prefix blocks.

        Sets ``num_computed_tokens`` (and ``num_cached_tokens``) to the prefix served from cache.
        """
        if seq.block_table:
            raise RuntimeError(f"allocate: {seq} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"allocate: {seq} needs {seq.num_blocks(self.block_size)} blocks, "
                               f"{self.allocator.num_free()} free")
        bs = self.block_size
        table, hashes = [], []
        if self.enable_prefix_caching:
            prev, ids = 0, seq.token_ids
            for i in range((seq.num_tokens - 1) // bs):  # never the block holding the last token
                content = self.block_content(seq, i, ids)
                h = self.block_hash(seq, i, prev, content)
                self.queried_blocks += 1
                b = self.allocator.lookup(h, content)
                if b < 0:
                    break
                table.append(b)
                hashes.append(h)
                prev = h
        hits = len(table)
        while len(table) < seq.num_blocks(bs):
            table.append(self.allocator.allocate())
        seq.block_table = table
        seq.block_hashes = hashes
        seq.num_computed_tokens = hits * bs
        if not seq.num_preemptions:  # a re-admission's hits are mostly its own recomputed positions
            seq.num_cached_tokens = hits * bs
        self.hit_blocks += hits
        self.hit_tokens += hits * bs

    def publish(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed (call after each step)."""
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else 0
        ids = seq.token_ids if n_full > len(seq.block_hashes) else []
        for i in range(len(seq.block_hashes), n_full):
            content = self.block_content(seq, i, ids)
            h = self.block_hash(seq, i, prev, content)
            self.allocator.register(seq.block_table[i], h, content)
            seq.block_hashes.append(h)
            prev = h

    def can_append(self, seq: Sequence) -> bool:
        """True if a slot for the sequence's newest token can be provided now."""
        need = self._slot_need(seq)
        return need == 0 or self.allocator.num_free() >= 1

    def _slot_need(self, seq: Sequence) -> int:
        bs = self.block_size
        last = seq.num_tokens - 1
        if last // bs >= len(seq.block_table):
            return 1  # a new block
        if self.allocator.refcount(seq.block_table[last // bs]) > 1:
            return 1  # copy-on-write
        return 0

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Ensure position ``num_tokens - 1`` has a private slot; returns (src, dst) block copies."""
        bs = self.block_size
        last = seq.num_tokens - 1
        i = last // bs
        if i > len(seq.block_table):
            raise RuntimeError(f"append_slot: {seq} skipped a block (table {len(seq.block_table)}, pos {last})")
        if i == len(seq.block_table):
            seq.block_table.append(self.allocator.allocate())
            return []
        b = seq.block_table[i]
        if self.allocator.refcount(b) == 1:
            return []
        new = self.allocator.allocate()
        self.allocator.decref(b)
        seq.block_table[i] = new
        del seq.block_hashes[i:]
        self.copies += 1
        return [(b, new)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (and computed state)."""
        if child.block_table:
            raise RuntimeError(f"fork: child {child} already holds blocks")
        for b in parent.block_table:
            self.allocator.incref(b)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (published ones stay cached for reuse)."""
        for b in reversed(seq.block_table):  # tail first: the LRU then evicts the tail first
            self.allocator.decref(b)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # --- stats ------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = dict(self.allocator.stats())
        s.update(num_blocks=self.num_blocks, block_size=self.block_size,
                 prefix_hit_blocks=self.hit_blocks, prefix_hit_tokens=self.hit_tokens,
                 prefix_hit_bytes=self.hit_blocks * self.bytes_per_block,
                 prefix_queried_blocks=self.queried_blocks, cow_copies=self.copies)
        return s

    def check(self) -> None:
        self.allocator.check()
