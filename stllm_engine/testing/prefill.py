"""One LLM prefill pass of the engine's model outside the scheduler, for benchmarks and tests."""
from __future__ import annotations

import torch

from stllm_engine.model.context import AttentionContext, reset_context, set_context


def prefill_context(m, n: int, device) -> AttentionContext:
    """The context of a fresh prefill of one n-token sequence in cache slots 0..n-1."""
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    return AttentionContext(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n,
                            max_seqlen_k=n, slot_mapping=torch.arange(n, device=device),
                            context_lens=torch.tensor([n], dtype=torch.int32, device=device),
                            block_tables=torch.arange(-(-n // m.block_size), dtype=torch.int32,
                                                      device=device)[None])


@torch.no_grad()
def prefill_logits(m, x: torch.Tensor, graphs=None) -> torch.Tensor:
    """One prefill pass of ``m`` (an STLLMModel with a KV cache) over x [n, H] as a single
    sequence in cache slots 0..n-1: the last position's logits [1, V]. ``graphs``: a
    :class:`~stllm_engine.engine.prefill_graphs.PrefillGraphs` of ``m`` to run the pass."""
    n, dev = x.shape[0], x.device
    ctx, rows = prefill_context(m, n, dev), torch.tensor([n - 1], device=dev)
    if graphs is not None:
        return graphs.run(x, torch.arange(n, device=dev), ctx, rows)
    set_context(ctx)
    try:
        return m.compute_logits(m(x, torch.arange(n, device=dev), out_rows=rows))
    finally:
        reset_context()
