"""ModelRunner: turns one scheduled step into packed model inputs and returns logits.

A step is a list of ``(sequence, n)``: the sequence computes positions
``[num_computed_tokens, num_computed_tokens + n)``. With S = ``video_start`` and Lv video tokens,
position p < S is fed from ``token_ids[p]``, S <= p < S + Lv from ``video_embeds[p - S]``, later
positions from ``token_ids[p - Lv]`` (text through the embedding table).
All sequences are packed into one [N, H] pass (no padding):

* every n == 1: a decode pass (``paged_decode_attention``);
* otherwise one prefill pass; decodes mixed in run as length-1 queries over their cache
  (``paged_prefill_attention`` whenever any sequence has a prefix in the cache, else
  ``varlen_attention``).

Logits come back (float32, batch order) only for sequences whose chunk reaches their last known
token, i.e. the ones that sample. Copy-on-write block copies are made by :meth:`copy_blocks`
before :meth:`run` (``ScheduledBatch.copies``). On CUDA, decode passes replay CUDA graphs
(``cuda_graphs.py``) when the runner is built with ``graph_batch``, and fresh prefill passes (no
cached prefix) replay graphs per padded token count (``prefill_graphs.py``) when it is built with
``prefill_graph_tokens``. On the CPU a pass runs on the model's
``thread_policy`` threads (decode vs prefill, see ``stllm_engine/model/threads.py``) and the
LLM's weights are pre-packed for oneDNN (``stllm_engine/model/packed_linear.py``).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from stllm_engine.model import cpu_decode
from stllm_engine.model.context import AttentionContext, reset_context, set_context
from stllm_engine.model.fused_swiglu import pack_swiglu
from stllm_engine.model.packed_linear import pack_linears, pack_qformer, pack_vision
from stllm_engine.model.threads import ThreadPolicy, cpu_threads

MAX_PREFILL_GRAPH_TOKENS = 4096  # longer fresh prefill passes run eagerly (graph memory grows with it)


class ModelRunner:
    """Runs an :class:`~stllm_engine.model.STLLMModel` over scheduled steps.

    ``config`` (optional) may carry ``block_size`` and ``num_kv_blocks`` (or ``num_blocks``): the KV
    cache is allocated here when the model has none yet. ``graph_batch`` (CUDA only): capture the
    decode pass as CUDA graphs for up to that many sequences whose block tables are at most
    ``graph_blocks`` wide (default: the model's positions); a capture that fails leaves the runner
    eager, with the reason in ``graph_error``. ``prefill_graph_tokens`` (CUDA only): fresh prefill
    passes of up to that many tokens (at most ``MAX_PREFILL_GRAPH_TOKENS``) replay graphs
    captured per 64 tokens on first use (``prefill_graphs``).
    """

    def __init__(self, model, config: Any = None, graph_batch: int | None = None,
                 graph_blocks: int | None = None, prefill_graph_tokens: int | None = None):
        self.model = model
        self.config = config
        if model.kv_cache is None and config is not None:
            num_blocks = getattr(config, "num_kv_blocks", None) or getattr(config, "num_blocks", None)
            block_size = getattr(config, "block_size", None)
            if num_blocks and block_size:
                model.allocate_kv_cache(num_blocks, block_size)
        if model.kv_cache is None:
            raise ValueError("ModelRunner needs a model with a KV cache (allocate_kv_cache) or a "
                             "config with block_size and num_kv_blocks")
        self.block_size = model.block_size
        self.num_blocks = model.kv_cache.shape[2]
        self.num_packed = pack_linears(model)  # CPU: LLM weights pre-packed for oneDNN (inference)
        self.num_fused_swiglu = pack_swiglu(model)  # CPU bf16 + AMX: prefill gate_up GEMM + SwiGLU in one kernel
        self.num_packed_vision = pack_vision(model)  # CPU: vision GEMMs packed, fc1 + GELU fused
        self.num_packed_qformer = pack_qformer(model)  # the same for the Q-Former and projector
        cpu_decode.enabled()  # a bad STLLM_CPU_COMPILED_DECODE fails here, not in the first decode step
        self.graphs, self.graph_error = None, None
        if graph_batch and model.device.type == "cuda":
            from stllm_engine.engine.cuda_graphs import DecodeGraphs

            blocks = graph_blocks or -(-model.config.llm.max_position_embeddings // self.block_size)
            try:
                self.graphs = DecodeGraphs(model, graph_batch, blocks)
            except Exception as e:  # noqa: BLE001  (eager decoding still works; say why)
                self.graph_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the decode pass failed, decoding eagerly: "
                              f"{self.graph_error}", RuntimeWarning, stacklevel=2)
        self.prefill_graphs = None
        if prefill_graph_tokens and model.device.type == "cuda":
            from stllm_engine.engine.prefill_graphs import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(model, min(prefill_graph_tokens, MAX_PREFILL_GRAPH_TOKENS))

    def copy_blocks(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write, e.g. beam search forks)."""
        pairs = list(pairs)
        for s, d in pairs:
            if not (0 <= s < self.num_blocks and 0 <= d < self.num_blocks):
                raise ValueError(f"copy_blocks: block pair ({s}, {d}) outside 0..{self.num_blocks - 1}")
        self.model.copy_blocks(pairs)

    @torch.no_grad()
    def run(self, batch) -> torch.Tensor:
        """batch: list of (seq, num_new_tokens) or a ScheduledBatch -> logits [num_sampled, vocab]."""
        items = list(getattr(batch, "items", batch))
        if not items:
            raise ValueError("ModelRunner.run: empty batch")
        embeds, positions, ctx, sample_rows = self._prepare(items)
        if self.graphs is not None and not ctx.is_prefill and self.graphs.covers(*ctx.block_tables.shape):
            return self.graphs.run(embeds, positions, ctx).index_select(0, sample_rows)
        pg = self.prefill_graphs
        if pg is not None and pg.covers(ctx, embeds.shape[0], len(items)):
            return pg.run(embeds, positions, ctx, sample_rows)
        policy = getattr(self.model, "thread_policy", None) or ThreadPolicy(None, None)
        with cpu_threads(policy.threads(decode=not ctx.is_prefill), self.model.device):
            set_context(ctx)
            try:
                hidden = self.model(embeds, positions, out_rows=sample_rows)
            finally:
                reset_context()
            return self.model.compute_logits(hidden)

    def prefill_mode(self) -> str:
        """How fresh prefill passes run: "eager", or their CUDA graphs (for stats / reports)."""
        return "eager" if self.prefill_graphs is None else self.prefill_graphs.describe()

    def decode_mode(self) -> str:
        """How decode passes run: "eager", or the captured CUDA graphs (for stats / reports)."""
        if self.graphs is not None:
            return self.graphs.describe()
        return "eager" + (f" (graph capture failed: {self.graph_error})" if self.graph_error else "")

    # --- input building ---------------------------------------------------------------------
    def _prepare(self, items):
        model, bs = self.model, self.block_size
        device, dtype = model.device, model.dtype
        positions, slots, cu_q, ctx_lens, tables = [], [], [0], [], []
        text_ids, text_rows, video_parts, sample_rows = [], [], [], []
        for seq, n in items:
            start = seq.num_computed_tokens
            end = start + n
            if n < 1 or end > seq.num_tokens:
                raise ValueError(f"{seq}: cannot compute {n} new positions from {start} "
                                 f"(it has {seq.num_tokens})")
            table = list(seq.block_table)
            if len(table) * bs < end:
                raise ValueError(f"{seq}: block table of {len(table)} blocks of {bs} cannot hold "
                                 f"{end} positions")
            row0 = cu_q[-1]
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            lv, vs = seq.num_video_tokens, seq.video_start
            ve = vs + lv
            if start < vs:  # text before the video
                a = min(end, vs)
                text_ids.extend(seq.prompt_token_ids[start:a])
                text_rows.extend(range(row0, row0 + a - start))
            if start < ve and end > vs:  # video
                a = max(start, vs)
                video_parts.append((row0 + a - start, seq.video_embeds[a - vs:min(end, ve) - vs]))
            if end > ve:  # text after the video, then outputs
                a = max(start, ve)
                text_ids.extend(seq.text_slice(a - lv, end - lv))
                text_rows.extend(range(row0 + a - start, row0 + n))
            cu_q.append(row0 + n)
            ctx_lens.append(end)
            tables.append(table)
            if end == seq.num_tokens:
                sample_rows.append(row0 + n - 1)
        n_total = cu_q[-1]
        embeds = torch.empty(n_total, model.config.llm.hidden_size, dtype=dtype, device=device)
        for row0, part in video_parts:
            embeds[row0:row0 + part.shape[0]] = part.to(device, dtype)
        if text_ids:
            ids = torch.tensor(text_ids, dtype=torch.long, device=device)
            embeds[torch.tensor(text_rows, device=device)] = model.embed_tokens(ids).to(dtype)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
        is_prefill = any(n != 1 for n in lens)
        cu = torch.tensor(cu_q, dtype=torch.int32, device=device)
        ctx = AttentionContext(
            is_prefill=is_prefill,
            cu_seqlens_q=cu,
            cu_seqlens_k=torch.tensor([0] + list(_cumsum(ctx_lens)), dtype=torch.int32, device=device),
            max_seqlen_q=max(lens),
            max_seqlen_k=max(ctx_lens),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            has_prefix=any(seq.num_computed_tokens > 0 for seq, _ in items),
        )
        pos_t = torch.tensor(positions, dtype=torch.int64, device=device)
        return embeds, pos_t, ctx, torch.tensor(sample_rows, dtype=torch.long, device=device)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total
