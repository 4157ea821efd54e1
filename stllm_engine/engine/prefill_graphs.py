"""CUDA graphs of fresh prefill passes (no sequence has cached tokens), per padded token count.

Why: at the ST-LLM-7B shape on an H100, a 593-token prefill's kernels took 12.0 ms of GPU time
and the pass 30 ms of wall time (``benchmarks/profile_e2e.py --ops``): the ~450 launches per pass
(cuBLAS GEMMs and five Triton kernels per layer, whose Python launcher costs the most) kept the GPU
waiting. This is the first prompt of every request, so it is the LLM's share of the time to
first token.

A pass of n tokens in B sequences replays the graph of n rounded up to a multiple of ``step``
(``bucket``), captured for ``max_seqs`` sequences (the first pass of a bucket runs the same padded
pass eagerly, then captures it):
  * rows n.. of the static embeds are zeros at position 0 with cache slot -1 (no KV write);
  * the static cu_seqlens [max_seqs + 2] holds the B sequences, then the padding rows as one more
    sequence (attending among themselves only), then empty ones (``cu = bucket``); the attention
    grid covers ``bucket`` query rows per sequence (blocks past a sequence's length return at
    once);
  * the LM head runs for ``max_seqs`` rows: the sampled rows, then row 0 as filler.
Passes the graphs do not cover run eagerly: a sequence with cached tokens (chunked prefill after
the first chunk, chat follow-ups, decode rows mixed in), more than ``max_seqs`` sequences, or more
than ``max_tokens`` tokens. The engine's warm-up captures every bucket at load (``capture_all``);
without it a bucket is captured on its first use. A failed capture leaves the prefill eager with
the reason in ``error``. The buckets share one memory pool (one replay at a time; outputs are
cloned).
"""
from __future__ import annotations

import warnings

import torch

from stllm_engine.engine.cuda_graphs import capture_graph, require_cuda
from stllm_engine.model.context import AttentionContext, reset_context, set_context


class PrefillGraphs:
    """The captured fresh-prefill passes of ``model`` (an STLLMModel on CUDA with its KV cache)."""

    def __init__(self, model, max_tokens: int, max_seqs: int = 8, step: int = 64):
        self._check_device(model)
        if max_tokens < 1 or max_seqs < 1 or step < 1:
            raise ValueError(f"PrefillGraphs: max_tokens, max_seqs and step must be >= 1, got "
                             f"{max_tokens}, {max_seqs}, {step}")
        self.model, self.max_seqs, self.step = model, max_seqs, step
        self.max_tokens = -(-max_tokens // step) * step
        dev, h = model.device, model.config.llm.hidden_size
        self.embeds = torch.zeros(self.max_tokens, h, dtype=model.dtype, device=dev)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.slots = torch.full((self.max_tokens,), -1, dtype=torch.int64, device=dev)
        self.cu = torch.zeros(max_seqs + 2, dtype=torch.int32, device=dev)
        self.out_rows = torch.zeros(max_seqs, dtype=torch.int64, device=dev)
        self.replay_fns: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays, self.error, self._pool = 0, None, None

    @staticmethod
    def _check_device(model) -> None:
        require_cuda(model, "PrefillGraphs")

    def bucket(self, n: int) -> int:
        return -(-n // self.step) * self.step

    def covers(self, ctx: AttentionContext, num_tokens: int, num_seqs: int) -> bool:
        """A pass under ``ctx`` of ``num_tokens`` rows in ``num_seqs`` sequences can use a graph."""
        return (self.error is None and ctx.is_prefill and not ctx.has_prefix and num_seqs <= self.max_seqs
                and 0 < num_tokens <= self.max_tokens)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
            sample_rows: torch.Tensor) -> torch.Tensor:
        """Logits [len(sample_rows), vocab] float32 of the pass (``covers`` must hold)."""
        n, s, b = embeds.shape[0], sample_rows.numel(), ctx.cu_seqlens_q.numel() - 1
        nb = self.bucket(n)
        self.embeds[:n].copy_(embeds)
        self.embeds[n:nb].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:nb].zero_()
        self.slots[:n].copy_(ctx.slot_mapping)
        self.slots[n:nb].fill_(-1)
        self.cu[:b + 1].copy_(ctx.cu_seqlens_q)
        self.cu[b + 1:].fill_(nb)  # the padding rows n..nb-1: a sequence of their own
        self.out_rows[:s].copy_(sample_rows)
        self.out_rows[s:].zero_()
        fn = self.replay_fns.get(nb)
        if fn is not None:
            fn()
            self.replays += 1
            return self.logits[nb][:s].clone()
        return self._first_pass(nb)[:s].clone()

    def capture_all(self) -> int:
        """Capture every bucket not captured yet (at load: ``warmup.py``), each over a dummy pass
        of one sequence that writes no KV (slots -1); returns how many were captured."""
        done, dev = len(self.replay_fns), self.model.device
        for nb in range(self.step, self.max_tokens + 1, self.step):
            if self.error is not None:
                break
            if nb not in self.replay_fns:
                cu = torch.tensor([0, nb], dtype=torch.int32, device=dev)
                ctx = AttentionContext(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=nb,
                                       max_seqlen_k=nb, slot_mapping=self.slots.new_full((nb,), -1))
                self.run(self.embeds.new_zeros(nb, self.embeds.shape[1]), torch.arange(nb, device=dev), ctx,
                         self.out_rows[:0])
        return len(self.replay_fns) - done

    def _first_pass(self, nb: int) -> torch.Tensor:
        """The first pass of bucket ``nb`` over the filled static buffers: the same padded pass
        eagerly (the answer; Triton compiles its specialisations here, not inside the capture),
        then the capture. Returns the eager logits [max_seqs, vocab]."""
        set_context(self._context(nb))
        try:
            logits = self._forward(nb)
            try:
                self.replay_fns[nb] = self._capture(nb)
            except Exception as e:  # noqa: BLE001  (eager prefill still works; say why)
                self.error = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the prefill pass failed, prefilling eagerly: "
                              f"{self.error}", RuntimeWarning, stacklevel=3)
        finally:
            reset_context()
        return logits

    def _capture(self, nb: int):
        """Capture bucket ``nb`` (its context is set): the replay function."""
        replay, self.logits[nb], self._pool = capture_graph(lambda: self._forward(nb), self._pool)
        return replay

    def _context(self, nb: int) -> AttentionContext:
        return AttentionContext(is_prefill=True, cu_seqlens_q=self.cu, cu_seqlens_k=self.cu,
                                max_seqlen_q=nb, max_seqlen_k=nb, slot_mapping=self.slots[:nb])

    def _forward(self, nb: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(self.embeds[:nb], self.positions[:nb],
                                                    out_rows=self.out_rows))

    def describe(self) -> str:
        if self.error is not None:
            return f"eager (graph capture failed: {self.error})"
        return (f"cuda graphs per {self.step} tokens up to {self.max_tokens}, {self.max_seqs} sequences "
                f"({len(self.replay_fns)} captured)")
