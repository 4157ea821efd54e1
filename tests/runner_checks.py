"""Helpers shared by the model-runner tests on CPU and CUDA: random sequences (video embeddings +
prompt ids) and one runner step that grows block tables from a pool of free blocks first."""
from __future__ import annotations

import torch

from stllm_engine.engine.sequence import Sequence


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
