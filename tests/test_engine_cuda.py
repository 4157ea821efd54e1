"""The engine on a CUDA GPU (Triton kernels, cuBLAS) against the transformers reference on the same
GPU: greedy token identity for every variant, beam search identity, a mixed batch equal to each
request alone, and the model runner's logits (prefill, then decode steps over permuted paged
blocks) within dtype tolerance in float32, bfloat16 and float16.

Collected only where CUDA is available (``conftest.py``); CI has no GPU. Run on a GPU machine:
``python -m pytest -q tests/test_engine_cuda.py``.
"""
from __future__ import annotations

import random

import pytest
import torch
from runner_checks import random_seq, run_step
from test_engine import make_engine, release_params, run

from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.model.stllm import STLLMModel
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_video
from stllm_engine.video import load_video
from stllm_engine.weights import load_checkpoint

if not torch.cuda.is_available():  # conftest leaves this file out of CPU runs; an explicit path lands here
    pytest.skip("the engine-on-CUDA tests need a CUDA device", allow_module_level=True)
CUDA = torch.device("cuda")
VARIANTS = [("eva", "all"), ("eva", "mean"), ("eva", "residual"),
            ("btadapter", "all"), ("btadapter", "mean"), ("btadapter", "residual")]
Q = "what is moving in the video?"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # relative to max |logit|


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=20, size=(96, 72))


def frames_of(video, ref):
    return load_video(video, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames


@pytest.mark.parametrize("vit,vi", VARIANTS)
def test_greedy_tokens_match_reference_on_cuda(folders, video, vit, vi):
    f = folders(vit, vi)
    ref = ReferenceSTLLM.from_pretrained(f, device=CUDA)
    frames = frames_of(video, ref)
    want = ref.generate_ids(frames, Q, max_new_tokens=12).token_ids
    eng = make_engine(f, CUDA, max_num_batched_tokens=24 if vit == "btadapter" else 2048)  # chunked prefill too
    out, out_file = run(eng, [(frames, Q, release_params(ref), {}), (video, Q, release_params(ref), {})])
    assert out.error is None and out.token_ids == want
    assert out_file.token_ids == want
    eng.block_manager.check()
    assert eng.block_manager.stats()["used_blocks"] == 0
    assert eng.model.device.type == "cuda" and eng.kernels()["decode_attention"] == "triton paged"
    assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0, eng.kernels()["decode_pass"]


def test_enforce_eager_gives_the_graphs_tokens(folders, video):
    f = folders("eva", "all")
    ref = ReferenceSTLLM.from_pretrained(f, device=CUDA)
    p = release_params(ref, max_new_tokens=10)
    reqs = [(video, Q, p, {}), (video, "which color is the square?", p, {}), (video, "how many shapes?", p, {}),
            (video, Q, p, {})]  # the repeat's Q-Former pass replays the first one's graph
    graphs, eager = make_engine(f, CUDA), make_engine(f, CUDA, enforce_eager=True)
    assert eager.runner.graphs is None and eager.kernels()["decode_pass"] == "eager"
    assert eager.runner.graph_error is None
    assert eager.video_graphs is None and eager.kernels()["video_pass"] == "eager"
    assert [o.token_ids for o in run(graphs, reqs)] == [o.token_ids for o in run(eager, reqs)]
    assert graphs.runner.graphs.replays > 0
    assert eager.runner.prefill_graphs is None and graphs.runner.prefill_graphs.error is None
    assert graphs.runner.prefill_graphs.replays > 0, graphs.kernels()["prefill_pass"]
    vg = graphs.video_graphs
    assert not vg.errors and vg.replays["qformer"] >= 1 and len(vg.graphs["vision"]) >= 1, vg.describe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vit", ["eva", "btadapter"])
def test_video_graphs_replay_the_eager_passes_on_cuda(folders, vit, dtype):
    """ViT and Q-Former graphs (captured on the first call of a shape) against eager passes, on
    new frames and new questions of a captured length each time."""
    from stllm_engine.engine.video_graphs import VideoGraphs

    model = STLLMModel.from_checkpoint(load_checkpoint(folders(vit, "all"), progress=False), CUDA, dtype)
    g = VideoGraphs(model)
    t, s = model.config.num_frames, model.config.vision.image_size
    gen = torch.Generator(device=CUDA).manual_seed(0)
    outs = []
    for _ in range(3):  # eager + capture, then two replays
        frames = torch.randn(t, 3, s, s, device=CUDA, generator=gen)
        got, want = g.encode_vision(frames), model.encode_vision(frames)
        assert got.dtype == dtype and got.shape == want.shape
        assert (got.float() - want.float()).abs().max() <= TOL[dtype] * want.float().abs().max()
        outs.append(got)
    assert not torch.equal(outs[1], outs[2]) and g.replays["vision"] == 2
    questions = ["what is moving?", "what is red?", "where is it?"]
    assert len({model.qformer_ids(q).numel() for q in questions}) == 1
    toks = []
    for q in questions:
        got, want = g.encode_video(outs[0], q), model.encode_video(outs[0], q)
        assert (got.float() - want.float()).abs().max() <= TOL[dtype] * want.float().abs().max()
        toks.append(got)
    assert not torch.equal(toks[1], toks[2]) and g.replays["qformer"] == 2 and not g.errors


def test_beam_search_matches_reference_on_cuda(folders, video):
    f = folders("eva", "all")
    ref = ReferenceSTLLM.from_pretrained(f, device=CUDA)
    frames = frames_of(video, ref)
    embeds = ref.chat_inputs_embeds(ref.encode_video(frames, Q), Q)
    want = ref.generate_from_embeds(embeds, max_new_tokens=8, num_beams=3)
    p = SamplingParams(min_new_tokens=1, stop=[], stop_token_ids=ref.stop_sequences, max_new_tokens=8,
                       num_beams=3)
    (out,) = run(make_engine(f, CUDA), [(frames, Q, p, {})])
    assert out.token_ids == want.token_ids


def test_mixed_batch_equals_each_alone_on_cuda(folders, video, tmp_path):
    f = folders("eva", "all")
    reqs = [
        (video, Q, SamplingParams(max_new_tokens=9), {}),
        (video, "which color is the square?", SamplingParams(max_new_tokens=6, repetition_penalty=1.0), {}),
        (video, Q, SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, top_p=0.9, seed=5), {}),
        (str(tmp_path / "missing.mp4"), Q, SamplingParams(), {}),
        (video, "how many shapes?", SamplingParams(max_new_tokens=8, temperature=1.2, seed=7), {"keep_ratio": 0.5}),
    ]
    batched = run(make_engine(f, CUDA, max_num_batched_tokens=40), reqs)
    solo = make_engine(f, CUDA)
    for b, r in zip(batched, reqs):
        (a,) = run(solo, [r])
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason and b.error == a.error
    assert batched[3].error and "missing.mp4" in batched[3].error
    assert all(o.error is None for i, o in enumerate(batched) if i != 3)


# ---------------------------------------------------------------- runner logits per dtype
NUM_BLOCKS = 40


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("runner") / "ckpt", vit="eva",
                                 video_input="all", seed=1, llm_num_kv_heads=2, llm_vocab_size=512)


@pytest.mark.parametrize("dtype,block_size,graphs", [(torch.float32, 4, False), (torch.float32, 16, True),
                                                     (torch.bfloat16, 16, True), (torch.float16, 8, True),
                                                     (torch.bfloat16, 8, False)])
def test_runner_logits_match_hf_on_cuda(gqa_folder, dtype, block_size, graphs):
    """Decode steps of 3 sequences: eager, or replaying the batch-4 graph with one inert row."""
    model = STLLMModel.from_checkpoint(load_checkpoint(gqa_folder, progress=False), CUDA, dtype)
    model.allocate_kv_cache(NUM_BLOCKS, block_size)
    runner = ModelRunner(model, graph_batch=4 if graphs else None, graph_blocks=16,
                         prefill_graph_tokens=128 if graphs else None)
    assert (runner.graphs is not None) == graphs, runner.graph_error
    if graphs:  # the fresh prefill below replays a captured bucket (64 rows: 28 tokens + padding)
        assert runner.prefill_graphs.capture_all() == 2 and not model.kv_cache.any()
    if graphs:
        assert runner.graphs.sizes == [1, 2, 4]
    hf = ReferenceSTLLM.from_pretrained(gqa_folder, dtype=dtype, device=CUDA).llm
    free = list(range(NUM_BLOCKS))
    random.Random(block_size).shuffle(free)                  # permuted block tables

    def hf_logits(seq):
        parts = [seq.video_embeds.to(CUDA, dtype)] if seq.num_video_tokens else []
        parts.append(model.embed_tokens(torch.tensor(seq.token_ids, device=CUDA)).to(dtype))
        with torch.no_grad():
            return hf(inputs_embeds=torch.cat(parts)[None]).logits[0, -1].float()

    seqs = [random_seq(model, 6, 5, 1), random_seq(model, 0, 7, 2), random_seq(model, 9, 1, 3)]
    logits = run_step(runner, free, [(s, s.num_tokens) for s in seqs])
    assert logits.shape == (3, 512) and logits.dtype == torch.float32 and logits.device.type == "cuda"
    for _ in range(3):
        for i, s in enumerate(seqs):
            want = hf_logits(s)
            err, tol = (logits[i] - want).abs().max().item(), TOL[dtype] * want.abs().max().item()
            assert err <= tol, f"{dtype}: max diff {err} > {tol}"
            s.append_token(int(logits[i].argmax()))
        logits = run_step(runner, free, [(s, 1) for s in seqs])
    if graphs:
        assert runner.graphs.replays == 3 and runner.prefill_graphs.replays == 1
        assert runner.prefill_graphs.error is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames,seqlen,head_dim", [(3, 257, 88), (1, 1, 64), (5, 50, 40)])
def test_uniform_attention_paths_agree_on_cuda(dtype, frames, seqlen, head_dim, monkeypatch):
    """The ViT's frames attention (``uniform=True``): torch SDPA (default) and the Triton kernel
    (``STLLM_CUDA_ATTENTION=triton``) both match a float32 twin within the dtype's tolerance."""
    from stllm_engine import ops

    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(frames * seqlen, 4, head_dim, device=CUDA, generator=g).to(dtype) for _ in range(3))
    cu = torch.arange(0, frames + 1, device=CUDA, dtype=torch.int32) * seqlen
    qh, kh, vh = (t.float().view(frames, seqlen, 4, head_dim).transpose(1, 2) for t in (q, k, v))
    want = torch.softmax(qh @ kh.transpose(-1, -2) * head_dim ** -0.5, -1) @ vh
    want = want.transpose(1, 2).reshape(q.shape)
    tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for backend in ("auto", "triton"):
        monkeypatch.setenv("STLLM_CUDA_ATTENTION", backend)
        got = ops.varlen_attention(q, k, v, cu, cu, seqlen, seqlen, False, uniform=True)
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert got.dtype == dtype and err < tol, (backend, err)
