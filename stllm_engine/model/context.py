"""The per-step attention context (nano-vllm style).

The model runner fills one :class:`AttentionContext` before each forward pass; every attention
layer of the LLM reads it through :func:`get_context` instead of threading metadata through each
``forward``. Shapes: B sequences in the step, N packed new tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    """Metadata of one LLM step.

    is_prefill: packed varlen pass (any chunk longer than one token, or a first chunk);
        False: every sequence decodes one token over its cache.
    cu_seqlens_q: int32 [B+1] prefix sums of the new tokens per sequence (prefill).
    cu_seqlens_k: int32 [B+1] prefix sums of the keys per sequence (prefill; == q without prefix).
    max_seqlen_q / max_seqlen_k: longest query chunk / key context (prefill).
    slot_mapping: int64 [N] cache slot of every new token (block_id * block_size + offset; -1 skips).
    context_lens: int32 [B] tokens in the cache per sequence after this step (prefix + new).
    block_tables: int32 [B, max_blocks] the block ids of each sequence.
    has_prefix: some sequence already has tokens in the cache (chunked prefill, multi-turn,
        decode mixed into a prefill pass): prefill attention reads the paged cache.
    """

    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    has_prefix: bool = False


_CONTEXT = AttentionContext()


def get_context() -> AttentionContext:
    """The context of the current step."""
    return _CONTEXT


def set_context(ctx: AttentionContext | None = None, **fields) -> AttentionContext:
    """Install ``ctx`` (or a new context built from ``fields``) as the current one."""
    global _CONTEXT
    if ctx is not None and fields:
        raise TypeError("set_context takes either a context or fields, not both")
    _CONTEXT = ctx if ctx is not None else AttentionContext(**fields)
    return _CONTEXT


def reset_context() -> None:
    """Drop the current context (the model then runs nothing that needs one)."""
    global _CONTEXT
    _CONTEXT = AttentionContext()
