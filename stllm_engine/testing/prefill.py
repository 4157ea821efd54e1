"""One LLM prefill pass of the engine's model outside the scheduler, for benchmarks and tests."""
from __future__ import annotations

import torch

from stllm_engine.model.context import AttentionContext, reset_context, set_context


@torch.no_grad()
def prefill_logits(m, x: torch.Tensor) -> torch.Tensor:
    """One prefill pass of ``m`` (an STLLMModel with a KV cache) over x [n, H] as a single
    sequence in cache slots 0..n-1: the last position's logits [1, V]."""
    n, dev = x.shape[0], x.device
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    set_context(AttentionContext(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n,
                                 max_seqlen_k=n, slot_mapping=torch.arange(n, device=dev),
                                 context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                                 block_tables=torch.arange(-(-n // m.block_size), dtype=torch.int32,
                                                           device=dev)[None]))
    try:
        return m.compute_logits(m(x, torch.arange(n, device=dev), out_rows=torch.tensor([n - 1], device=dev)))
    finally:
        reset_context()
