"""Helpers shared by the model-runner tests on CPU and CUDA: random sequences (video embeddings +
prompt ids), one runner step that grows block tables from a pool of free blocks first, and the
CPU stand-in for a captured CUDA-graph pass."""
from __future__ import annotations

import torch

from stllm_engine.engine.sequence import Sequence
from stllm_engine.model.context import get_context, reset_context, set_context


def random_seq(model, lv: int, n_text: int, seed: int) -> Sequence:
    """A sequence of ``lv`` random video embeddings then ``n_text`` random prompt ids."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(lv, model.config.llm.hidden_size, generator=g) if lv else None
    ids = torch.randint(3, model.config.llm.vocab_size, (n_text,), generator=g).tolist()
    return Sequence(ids, video_embeds=video, video_key=f"v{seed}" if lv else "")


def run_step(runner, free: list[int], items) -> torch.Tensor:
    """Give each (seq, n) of ``items`` blocks from ``free`` for its n new positions, run the step,
    advance the sequences; the logits."""
    bs = runner.block_size
    for seq, n in items:
        while len(seq.block_table) * bs < seq.num_computed_tokens + n:
            seq.block_table.append(free.pop())
    logits = runner.run(items)
    for seq, n in items:
        seq.num_computed_tokens += n
    return logits


def eager_replay(graphs, key: int):
    """Stand-in for the replay of ``graphs``' (DecodeGraphs / PrefillGraphs) pass ``key`` captured
    now: reruns ``graphs._forward(key)`` eagerly into ``graphs.logits[key]`` under the attention
    context current at 'capture' (what a capture bakes in: views of the static buffers)."""
    ctx = get_context()

    def replay():
        set_context(ctx)
        try:
            graphs.logits[key] = graphs._forward(key)
        finally:
            reset_context()
    return replay
