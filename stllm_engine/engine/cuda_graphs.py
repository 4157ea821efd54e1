"""CUDA graphs of the LLM decode pass (as nano-vllm and vLLM capture theirs).

A decode step of a 7B model is some 300 small kernel launches (per layer: RMSNorm, qkv GEMM,
rotary, KV write, paged attention, o_proj, RMSNorm, gate/up GEMM, SwiGLU, down GEMM); launched one
by one from Python the GPU waits on the launches (about 22 ms a token on an H100, where the weights
take about 5 ms to read). Captured once per batch size, a step is a few input copies and one
``replay``.

Captured: ``model(embeds, positions)`` + ``compute_logits`` for B packed one-token rows, reading
static buffers: embeds [B, H], positions [B], slot_mapping [B], context_lens [B] and block_tables
[B, max_blocks]. Batch sizes 1, 2, 4, 8, then every 16 up to ``max_batch``; a step of B rows
replays the smallest captured size >= B with the extra rows inert (slot -1: no KV write;
context 0: attention gives zeros). Block tables are copied into the first columns of the static
table; columns past a sequence's blocks are never read (its context length bounds the kernel).
Steps the graphs do not cover (more rows than ``max_batch``, a wider block table, prefill) run
eagerly. All batch sizes share one memory pool, captured largest first.

Also the capture step and device check the other graphs (``prefill_graphs.py``,
``video_graphs.py``) share: :func:`capture_graph`, :func:`require_cuda`.
"""
from __future__ import annotations

from typing import Callable

import torch

from stllm_engine.model.context import AttentionContext, reset_context, set_context


def require_cuda(model, owner: str) -> None:
    """Raise unless ``model`` runs on a CUDA device (``owner``: who needs it, for the message)."""
    if model.device.type != "cuda":
        raise ValueError(f"{owner} needs a CUDA model, got one on {model.device}")


def capture_graph(fn: Callable[[], torch.Tensor], pool, capture_error_mode: str = "thread_local"):
    """``fn()`` captured into a new CUDA graph that allocates from memory pool ``pool`` (None: a
    new pool): (replay function, ``fn``'s output tensor, the pool for the next capture). The
    default error mode lets other threads (the engine's frame decoders) use CUDA meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode):
        out = fn()
    return graph.replay, out, (graph.pool() if pool is None else pool)  # the bound replay keeps the graph


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, ... up to and including ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"graph_batch_sizes: max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    return sizes if sizes[-1] == max_batch else sizes + [max_batch]


class DecodeGraphs:
    """The captured decode passes of ``model`` (an STLLMModel on CUDA with its KV cache bound)."""

    def __init__(self, model, max_batch: int, max_blocks: int):
        self._check_device(model)
        if max_blocks < 1:
            raise ValueError(f"DecodeGraphs: max_blocks must be >= 1, got {max_blocks}")
        c, dev = model.config.llm, model.device
        self.model = model
        self.sizes = graph_batch_sizes(max_batch)
        self.max_blocks = max_blocks
        self.embeds = torch.zeros(max_batch, c.hidden_size, dtype=model.dtype, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.replay_fns: dict[int, Callable[[], None]] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0
        pool = None
        for bs in reversed(self.sizes):
            set_context(AttentionContext(is_prefill=False, slot_mapping=self.slots[:bs],
                                         context_lens=self.context_lens[:bs],
                                         block_tables=self.block_tables[:bs]))
            try:
                self.replay_fns[bs], pool = self._capture(bs, pool)
            finally:
                reset_context()

    @staticmethod
    def _check_device(model) -> None:
        require_cuda(model, "DecodeGraphs")

    def _capture(self, bs: int, pool):
        """Capture batch size ``bs`` (its context is set): (replay function, the shared pool)."""
        self._forward(bs)  # warm-up outside the capture: Triton compiles, cuBLAS chooses
        torch.cuda.synchronize(self.model.device)
        replay, self.logits[bs], pool = capture_graph(lambda: self._forward(bs), pool, "global")
        return replay, pool

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(self.embeds[:bs], self.positions[:bs]))

    def covers(self, batch: int, width: int) -> bool:
        """A decode step of ``batch`` rows with block tables ``width`` wide can replay a graph."""
        return batch <= self.sizes[-1] and width <= self.max_blocks

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The decode pass of ``embeds`` [B, H] at ``positions`` [B] under ``ctx``: logits
        [B, vocab] float32 (a new tensor; the graph's own output is overwritten by the next replay)."""
        B, w = embeds.shape[0], ctx.block_tables.shape[1]
        if not self.covers(B, w):
            raise ValueError(f"DecodeGraphs.run: {B} rows / block tables {w} wide exceed the captured "
                             f"{self.sizes[-1]} rows / {self.max_blocks} blocks")
        bs = next(s for s in self.sizes if s >= B)
        self.embeds[:B].copy_(embeds)
        self.positions[:B].copy_(positions)
        self.slots[:B].copy_(ctx.slot_mapping)
        self.slots[B:bs].fill_(-1)
        self.context_lens[:B].copy_(ctx.context_lens)
        self.context_lens[B:bs].zero_()
        self.block_tables[:B, :w].copy_(ctx.block_tables)
        self.replay_fns[bs]()
        self.replays += 1
        return self.logits[bs][:B].clone()

    def describe(self) -> str:
        return f"cuda graphs (batch {', '.join(map(str, self.sizes))}; {self.max_blocks} blocks a sequence)"
