"""Bounded LRU cache of vision-tower outputs (ViT (+BT-Adapter) + ln_vision), by bytes.

Key: (video content hash, frame indices, model variant, dtype). The question does not enter the
key: the instruction-aware Q-Former runs after this cache. An entry larger than the whole budget is
not stored.

It also keeps, in the same LRU and byte budget, the video tokens the Q-Former made for a question
(key: features key + question + token mode): the Q-Former is deterministic, so the same question
again (a repeated prompt, or a stateless multi-turn client resending the conversation, whose video
tokens are the first question's) skips it too; ``token_hits`` / ``token_misses`` count those.

Beside the features it remembers sampling plans: (content hash, sampling request) -> the frame
indices a decode chose. A repeat request for the same file then finds its features without
opening the video at all (no probe, no decode): the second question on a video skips frame
decoding and the ViT, as the Q-Former is all that depends on the question.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch


def vision_key(content_hash: str, indices, variant: str, dtype: torch.dtype | str) -> tuple:
    return (str(content_hash), tuple(int(i) for i in indices), str(variant), str(dtype))


class VisionCache:
    def __init__(self, capacity_bytes: int) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"VisionCache: capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.decodes_skipped = 0
        self.token_hits = 0
        self.token_misses = 0
        self._plans: OrderedDict[Hashable, tuple[int, ...]] = OrderedDict()

    PLAN_ENTRIES = 4096

    def plan(self, request: Hashable) -> tuple[int, ...] | None:
        """Frame indices a previous decode chose for ``request`` (content hash + sampling), or None."""
        indices = self._plans.get(request)
        if indices is not None:
            self._plans.move_to_end(request)
        return indices

    def put_plan(self, request: Hashable, indices) -> None:
        self._plans[request] = tuple(int(i) for i in indices)
        self._plans.move_to_end(request)
        while len(self._plans) > self.PLAN_ENTRIES:
            self._plans.popitem(last=False)

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def get(self, key: Hashable) -> torch.Tensor | None:
        t = self._entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return t

    def count_hit(self) -> None:
        """Count a request whose ViT the cache spared without :meth:`get` (its Q-Former tokens hit)."""
        self.hits += 1

    def get_tokens(self, key: Hashable) -> torch.Tensor | None:
        """Video tokens stored by :meth:`put_tokens` (counted in token_hits / token_misses)."""
        t = self._entries.get(("tokens", key))
        if t is None:
            self.token_misses += 1
            return None
        self._entries.move_to_end(("tokens", key))
        self.token_hits += 1
        return t

    def put_tokens(self, key: Hashable, value: torch.Tensor) -> bool:
        return self.put(("tokens", key), value)

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """Like get, without counting a hit/miss or refreshing the entry."""
        return self._entries.get(key)

    def put(self, key: Hashable, value: torch.Tensor) -> bool:
        """Store (most recent); evicts least recently used entries to fit. False if too large."""
        size = self.nbytes(value)
        if size > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self.nbytes(old)
        while self._entries and self.bytes + size > self.capacity_bytes:
            _, ev = self._entries.popitem(last=False)
            self.bytes -= self.nbytes(ev)
            self.evictions += 1
        self._entries[key] = value
        self.bytes += size
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._plans.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, bytes=self.bytes, entries=len(self._entries),
                    evictions=self.evictions, capacity_bytes=self.capacity_bytes,
                    decodes_skipped=self.decodes_skipped, token_hits=self.token_hits,
                    token_misses=self.token_misses)
