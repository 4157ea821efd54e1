"""The CUDA-graph decode path's host side, on the CPU: batch sizes, refusals, and the static-buffer
bookkeeping (padding to a captured size with inert rows, block tables narrower than the static
table) checked by a stand-in whose "replay" runs the captured function eagerly. The captures
themselves run in tests/test_engine_cuda.py on a GPU."""
from __future__ import annotations

import random

import pytest
import torch
from runner_checks import eager_replay, random_seq, run_step

from stllm_engine.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from stllm_engine.engine.engine_config import EngineConfig
from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.model import STLLMModel
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint


@pytest.mark.parametrize("max_batch,want", [(1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]),
                                            (20, [1, 2, 4, 8, 16, 20]), (64, [1, 2, 4, 8, 16, 32, 48, 64])])
def test_graph_batch_sizes(max_batch, want):
    assert graph_batch_sizes(max_batch) == want


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("graphs") / "ckpt", vit="eva", video_input="all",
                                   seed=3, llm_num_kv_heads=2, llm_vocab_size=512)
    return load_checkpoint(folder, progress=False)


def test_cpu_models_are_not_captured(ckpt):
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    model.allocate_kv_cache(8, 4)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, 4, 8)
    runner = ModelRunner(model, graph_batch=4)           # CUDA only: a CPU runner stays eager
    assert runner.graphs is None and runner.graph_error is None and runner.decode_mode() == "eager"


class EagerReplays(DecodeGraphs):
    """DecodeGraphs whose 'replay' runs the captured function on the static buffers."""

    @staticmethod
    def _check_device(model) -> None:
        pass

    def _capture(self, bs, pool):
        return eager_replay(self, bs), pool


def _decode_run(ckpt, graphs: bool, block_size=4, num_blocks=24):
    """Prefill 3 sequences, then 4 decode steps (3 rows, padded to the batch-4 'graph');
    returns (per-step logits, the KV cache, replays)."""
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    model.allocate_kv_cache(num_blocks, block_size)
    runner = ModelRunner(model)
    if graphs:
        runner.graphs = EagerReplays(model, 4, 10)
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    seqs = [random_seq(model, 5, 4, 1), random_seq(model, 0, 2, 2), random_seq(model, 9, 3, 3)]
    steps = [run_step(runner, free, [(s, s.num_tokens) for s in seqs])]
    for _ in range(4):
        for i, s in enumerate(seqs):
            s.append_token(int(steps[-1][i].argmax()))
        steps.append(run_step(runner, free, [(s, 1) for s in seqs]))
    return steps, model.kv_cache.clone(), runner.graphs.replays if graphs else 0


def test_padded_replays_equal_eager_decoding(ckpt):
    eager, kv_eager, _ = _decode_run(ckpt, graphs=False)
    replayed, kv_replayed, replays = _decode_run(ckpt, graphs=True)
    assert replays == 4                                  # every decode step went through the graphs
    for a, b in zip(eager, replayed):
        assert a.shape == b.shape == (3, 512)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the inert padding row wrote nothing: the same slots hold K/V, every other slot is still zero
    torch.testing.assert_close(kv_replayed, kv_eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(kv_replayed != 0, kv_eager != 0)


def test_steps_the_graphs_do_not_cover_run_eagerly(ckpt):
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    model.allocate_kv_cache(24, 4)
    graphs = EagerReplays(model, 2, 3)
    assert graphs.covers(2, 3) and not graphs.covers(3, 3) and not graphs.covers(1, 4)
    runner = ModelRunner(model)
    runner.graphs = graphs
    seq = random_seq(model, 0, 13, 5)                          # 14 positions: 4 blocks > 3
    seq.block_table.extend(range(4))
    runner.run([(seq, 13)])
    seq.num_computed_tokens = 13
    seq.append_token(7)
    runner.run([(seq, 1)])
    assert graphs.replays == 0
    with pytest.raises(ValueError, match="exceed the captured"):
        graphs.run(torch.zeros(3, model.config.llm.hidden_size), torch.zeros(3, dtype=torch.int64),
                   type("Ctx", (), {"block_tables": torch.zeros(3, 1, dtype=torch.int32)})())
