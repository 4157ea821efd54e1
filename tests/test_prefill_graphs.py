"""The fresh-prefill CUDA graphs' host side, on the CPU: buckets, which passes they cover, and the
static-buffer bookkeeping (padding rows as a sequence of their own that writes no KV, sample rows
padded with filler, empty trailing sequences) checked by a stand-in whose "replay" runs the
captured pass eagerly over the static buffers. The captures themselves run in
tests/test_engine_cuda.py on a GPU."""
from __future__ import annotations

import random

import pytest
import torch
from runner_checks import eager_replay, random_seq, run_step
from test_engine import make_engine

from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.engine.prefill_graphs import PrefillGraphs
from stllm_engine.model import STLLMModel
from stllm_engine.model.context import AttentionContext
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

NUM_BLOCKS, BLOCK = 48, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pgraphs") / "ckpt", vit="eva", video_input="all",
                                 seed=4, llm_num_kv_heads=2, llm_vocab_size=512)


@pytest.fixture(scope="module")
def ckpt(folder):
    return load_checkpoint(folder, progress=False)


class EagerReplays(PrefillGraphs):
    """PrefillGraphs whose 'replay' runs the captured pass on the static buffers."""

    @staticmethod
    def _check_device(model) -> None:
        pass

    def _capture(self, nb):
        return eager_replay(self, nb)


def runner_of(ckpt, graphs: bool, **kw):
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    model.allocate_kv_cache(NUM_BLOCKS, BLOCK)
    runner = ModelRunner(model)
    if graphs:
        runner.prefill_graphs = EagerReplays(model, **{"max_tokens": 256, "max_seqs": 3, "step": 64, **kw})
    return runner


def test_cpu_models_are_not_captured(ckpt, folder):
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    model.allocate_kv_cache(8, 4)
    with pytest.raises(ValueError, match="CUDA"):
        PrefillGraphs(model, 128)
    assert ModelRunner(model, prefill_graph_tokens=128).prefill_graphs is None
    kernels = make_engine(folder).kernels()
    assert kernels["prefill_pass"] == "eager"
    assert kernels["prefill_mlp"] == "gate_up gemm + swiglu"  # float32: the fused SwiGLU is bf16 only


def test_buckets_and_what_the_graphs_cover(ckpt):
    g = runner_of(ckpt, True, max_tokens=200).prefill_graphs
    assert g.max_tokens == 256 and [g.bucket(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    fresh = AttentionContext(is_prefill=True)
    assert g.covers(fresh, 256, 3) and not g.covers(fresh, 257, 3) and not g.covers(fresh, 10, 4)
    assert not g.covers(AttentionContext(is_prefill=True, has_prefix=True), 10, 1)
    assert not g.covers(AttentionContext(is_prefill=False), 1, 1)
    with pytest.raises(ValueError, match="max_seqs"):
        EagerReplays(g.model, 64, max_seqs=0)


def _prefill_run(ckpt, graphs: bool):
    """Three fresh prefill steps (ragged sequences; the second and third in the first one's
    bucket, one with a sequence that does not sample), then a decode step; returns the logits
    of every step, the KV cache and the runner."""
    runner = runner_of(ckpt, graphs)
    free = list(range(NUM_BLOCKS))
    random.Random(1).shuffle(free)
    out = []
    a, b, c = random_seq(runner.model, 6, 5, 1), random_seq(runner.model, 0, 60, 2), random_seq(runner.model, 0, 1, 3)
    out.append(run_step(runner, free, [(a, a.num_tokens), (b, b.num_tokens), (c, c.num_tokens)]))  # 72 rows
    d, e = random_seq(runner.model, 9, 40, 4), random_seq(runner.model, 0, 30, 5)
    out.append(run_step(runner, free, [(d, d.num_tokens), (e, 20)]))  # 69 rows; e does not sample yet
    f = random_seq(runner.model, 0, 64, 6)
    out.append(run_step(runner, free, [(f, f.num_tokens)]))  # exactly one bucket: no padding rows
    for s in (a, b, c, d, f):
        s.append_token(7)
    out.append(run_step(runner, free, [(s, 1) for s in (a, b, c, d, f)]))  # decode: not a prefill graph
    out.append(run_step(runner, free, [(e, 10)]))  # e's second chunk has a prefix: eager
    return out, runner.model.kv_cache.clone(), runner


def test_replays_equal_eager_prefills(ckpt):
    eager, kv_eager, _ = _prefill_run(ckpt, graphs=False)
    replayed, kv_replayed, runner = _prefill_run(ckpt, graphs=True)
    g = runner.prefill_graphs
    assert sorted(g.replay_fns) == [64, 128] and g.replays == 1  # step 2 replays step 1's bucket
    assert [x.shape[0] for x in replayed] == [3, 1, 1, 5, 1]
    for x, y in zip(eager, replayed):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_replayed, kv_eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(kv_replayed != 0, kv_eager != 0)  # the padding rows wrote no slot


def test_capture_all_writes_no_kv_and_a_failed_capture_stays_eager(ckpt):
    runner = runner_of(ckpt, True)
    g = runner.prefill_graphs
    assert g.capture_all() == 4 and sorted(g.replay_fns) == [64, 128, 192, 256] and g.capture_all() == 0
    assert not runner.model.kv_cache.any()
    assert g.describe() == "cuda graphs per 64 tokens up to 256, 3 sequences (4 captured)"

    class Failing(EagerReplays):
        def _capture(self, nb):
            raise RuntimeError("operation not permitted when stream is capturing")

    want = runner_of(ckpt, False)
    runner = runner_of(ckpt, False)
    runner.prefill_graphs = Failing(runner.model, 256, 3)
    seq, twin = random_seq(runner.model, 4, 9, 8), random_seq(runner.model, 4, 9, 8)
    with pytest.warns(RuntimeWarning, match="prefill pass failed.*not permitted"):
        got = run_step(runner, list(range(NUM_BLOCKS)), [(seq, seq.num_tokens)])
    torch.testing.assert_close(got, run_step(want, list(range(NUM_BLOCKS)), [(twin, twin.num_tokens)]),
                               rtol=1e-5, atol=1e-5)
    assert not runner.prefill_graphs.covers(AttentionContext(is_prefill=True), 10, 1)
    assert runner.prefill_mode().startswith("eager (graph capture failed: RuntimeError")
