"""One generation stream: prompt text ids, video tokens, generated ids, and its KV bookkeeping.

Positions run 0..num_tokens-1 over [text before the video | video tokens | text after | outputs].
``video_start`` (S) text ids come first (0 for the chat layout, the MVBench layout puts BOS + a
text segment there). Position p < S is fed from ``token_ids[p]``, S <= p < S + Lv from
``video_embeds[p - S]``, any later position from ``token_ids[p - Lv]``. The KV of positions
< ``num_computed_tokens`` is in the cache; the scheduler asks the runner for the next chunk.
Torch-free apart from holding ``video_embeds`` (an opaque tensor here).
"""
from __future__ import annotations

import enum
import itertools
from typing import Any

from stllm_engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def check_priority(priority) -> int:
    """A scheduling priority (an int, lower runs first), or ValueError."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an int (lower runs first), got {priority!r}")
    return priority


class Sequence:
    """State of one sequence (one beam of a beam-search request is one Sequence too)."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams | None = None, *,
                 video_embeds: Any = None, video_key: str = "", request_id: str | None = None,
                 seq_id: int | None = None, video_start: int = 0, priority: int = 0) -> None:
        self.seq_id = next(_ids) if seq_id is None else seq_id
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt_token_ids = list(prompt_token_ids)
        self.video_embeds = video_embeds
        self.num_video_tokens = 0 if video_embeds is None else int(video_embeds.shape[0])
        if self.num_video_tokens and not video_key:
            raise ValueError("a Sequence with video_embeds needs a video_key (its prefix-cache identity)")
        self.video_key = video_key
        if isinstance(video_start, bool) or not isinstance(video_start, int) \
                or not 0 <= video_start <= len(self.prompt_token_ids):
            raise ValueError(f"video_start must be an int in 0..{len(self.prompt_token_ids)} (the number "
                             f"of prompt ids before the video), got {video_start!r}")
        if video_start and not self.num_video_tokens:
            raise ValueError(f"video_start={video_start} given for a Sequence without video_embeds")
        self.video_start = video_start
        self.num_prompt_tokens = self.num_video_tokens + len(self.prompt_token_ids)
        if self.num_prompt_tokens == 0:
            raise ValueError("a Sequence needs at least one prompt position (video or text)")
        self.params = params if params is not None else SamplingParams()
        self.guide = None  # guided.ChoiceGuide when params.choices is set (the engine attaches it)
        self.priority = check_priority(priority)
        self.arrival = self.seq_id  # the scheduler's arrival number, set when it is added
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt positions served from the prefix cache at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the leading full blocks already published
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.cumulative_logprob = 0.0  # beam search score before length penalty
        self.num_preemptions = 0

    # --- lengths ----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def video_end(self) -> int:
        """First position after the video tokens (``video_start + num_video_tokens``)."""
        return self.video_start + self.num_video_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """All text ids in position order: prompt ids (before and after the video), then outputs."""
        return self.prompt_token_ids + self.output_token_ids

    def text_slice(self, i: int, j: int) -> list[int]:
        """``token_ids[i:j]`` (0 <= i <= j) without building the whole list."""
        n = len(self.prompt_token_ids)
        if j <= n:
            return self.prompt_token_ids[i:j]
        if i >= n:
            return self.output_token_ids[i - n:j - n]
        return self.prompt_token_ids[i:] + self.output_token_ids[:j - n]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def position_key(self, p: int) -> int:
        """Prefix-cache identity of position p: a text id (>= 0) or a video marker (< 0).

        Video markers only distinguish offsets into the video; the video identity enters the block
        hash through ``video_key``.
        """
        v = p - self.video_start
        if v < 0:
            return self.prompt_token_ids[p]
        if v < self.num_video_tokens:
            return -1 - v
        return self.token_ids[p - self.num_video_tokens]

    # --- updates ----------------------------------------------------------------------------
    def append_token(self, token_id: int, logprob: float = 0.0) -> None:
        self.output_token_ids.append(int(token_id))
        self.cumulative_logprob += logprob

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")
