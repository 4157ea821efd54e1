"""Text before the video (``video_start``) and the release's MVBench inference through the engine.

Layout [BOS + text | video tokens | text]: sequence positions, runner input assembly (chunked
prefill across both text/video boundaries == one-shot == transformers), block keys/hashes (leading
text-only blocks shared across videos, blocks overlapping a video only with the same video), left
truncation, beam-search clones; ``STLLM.mvbench_answer`` / ``mvbench_generate`` against
``ReferenceSTLLM.mvbench_answer`` (exact strings and token ids) on tiny checkpoints, tensor frames
and a real encoded video; ``EngineAnswerer`` against ``ReferenceAnswerer``.
"""
import json
import random

import pytest
import torch

from stllm_engine.api import STLLM
from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.llm_engine import truncate_left
from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.engine.sequence import Sequence
from stllm_engine.evaluation.answerers import EngineAnswerer, ReferenceAnswerer
from stllm_engine.model import STLLMModel
from stllm_engine.prompts import mvbench_prompt_segments, mvbench_question
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.videos import write_video
from stllm_engine.weights import load_checkpoint

Q = "Which way does the red square move?"
C = ["left", "right", "up"]
BS = 8


# --- fixtures ---------------------------------------------------------------------------------
_REFS: dict = {}


def reference(folder) -> ReferenceSTLLM:
    if folder not in _REFS:
        _REFS[folder] = ReferenceSTLLM.from_pretrained(folder)
    return _REFS[folder]


def frames(seed, t=8, size=56):
    return torch.randn(t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_llm(folder, **kw):
    kw.setdefault("block_size", BS)
    kw.setdefault("num_kv_blocks", 160)
    return STLLM.from_pretrained(folder, dtype="float32", **kw)


def reference_ids(ref, video, question, candidates, num_beams=1, max_new_tokens=100, ask_simple=False):
    """The reference's MVBench generation (its ``mvbench_answer`` steps) returning token ids."""
    q = mvbench_question(question, candidates)
    per_frame = ref.frame_tokens(ref.encode_vision(video), q)
    embeds = ref.mvbench_inputs_embeds(per_frame.reshape(-1, per_frame.shape[-1]), q, ask_simple=ask_simple)
    return ref.generate_from_embeds(embeds, num_beams=num_beams, max_new_tokens=max_new_tokens, min_length=1,
                                    repetition_penalty=1.0, do_sample=False)


def assert_clean(llm):
    bm = llm.engine.block_manager
    bm.check()
    assert bm.stats()["used_blocks"] == 0
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


# --- Sequence layout --------------------------------------------------------------------------
@pytest.mark.parametrize("vs,lv,n_text", [(0, 5, 4), (1, 5, 4), (3, 1, 3), (4, 6, 4), (2, 3, 2)])
def test_position_key_follows_the_layout(vs, lv, n_text):
    ids = list(range(100, 100 + n_text))
    seq = Sequence(ids, video_embeds=torch.zeros(lv, 2), video_key="v", video_start=vs)
    seq.append_token(7)
    keys = [seq.position_key(p) for p in range(seq.num_tokens)]
    assert keys == ids[:vs] + [-1 - i for i in range(lv)] + ids[vs:] + [7]
    assert seq.video_end == vs + lv and seq.num_prompt_tokens == lv + n_text
    for i in range(seq.num_tokens - lv + 1):
        for j in range(i, seq.num_tokens - lv + 1):
            assert seq.text_slice(i, j) == seq.token_ids[i:j]


@pytest.mark.parametrize("vs,video,msg", [(-1, 3, "video_start"), (5, 3, "video_start"), (2, 0, "without video"),
                                          (1.0, 3, "video_start"), (True, 3, "video_start")])
def test_bad_video_start_is_named(vs, video, msg):
    with pytest.raises(ValueError, match=msg):
        Sequence([1, 2, 3, 4], video_embeds=torch.zeros(video, 2) if video else None,
                 video_key="v" if video else "", video_start=vs)


# --- runner: chunked prefill across the boundaries ---------------------------------------------
@pytest.fixture(scope="module")
def runner_folder(folders):
    return folders("eva", "all")


def _runner(folder, block_size, num_blocks=48):
    model = STLLMModel.from_checkpoint(load_checkpoint(folder, progress=False), "cpu", torch.float32)
    model.allocate_kv_cache(num_blocks, block_size)
    return ModelRunner(model)


def _layout_seq(model, vs, lv, n_after, seed):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(lv, model.config.llm.hidden_size, generator=g)
    ids = torch.randint(3, model.config.llm.vocab_size, (vs + n_after,), generator=g).tolist()
    return Sequence(ids, SamplingParams(), video_embeds=video, video_key=f"v{seed}", video_start=vs)


def _run_chunks(runner, seq, chunks, seed):
    free = list(range(runner.num_blocks))
    random.Random(seed).shuffle(free)  # permuted block tables
    out = []
    for n in chunks:
        while len(seq.block_table) * runner.block_size < seq.num_computed_tokens + n:
            seq.block_table.append(free.pop())
        out.append(runner.run([(seq, n)]))
        seq.num_computed_tokens += n
    return out[-1], free


def _hf_last_logits(ref, seq):
    vs = seq.video_start
    parts = [ref.embed_tokens(seq.token_ids[:vs]), seq.video_embeds, ref.embed_tokens(seq.token_ids[vs:])]
    with torch.no_grad():
        return ref.llm(inputs_embeds=torch.cat(parts)[None]).logits[0, -1].float()


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("vs,lv,n_after,cuts", [
    (5, 7, 6, [4, 1, 1, 5, 1, 1, 5]),  # edges one before / at / after both boundaries
    (5, 7, 6, [5, 7, 6]),  # chunks exactly the three segments
    (1, 9, 3, [1, 1, 8, 1, 2]),  # BOS alone before the video
    (6, 4, 1, [3, 7, 1]),  # one text id after the video; chunks spanning a whole segment
    (3, 5, 0, [2, 6]),  # the video is last
])
def test_chunked_prefill_across_boundaries_equals_one_shot(runner_folder, block_size, vs, lv, n_after, cuts):
    assert sum(cuts) == vs + lv + n_after
    one = _runner(runner_folder, block_size)
    seq = _layout_seq(one.model, vs, lv, n_after, seed=vs * 31 + lv)
    want, _ = _run_chunks(one, seq, [seq.num_tokens], seed=1)
    chunked = _runner(runner_folder, block_size)
    seq2 = _layout_seq(chunked.model, vs, lv, n_after, seed=vs * 31 + lv)
    got, free = _run_chunks(chunked, seq2, cuts, seed=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = reference(runner_folder)
    expect = _hf_last_logits(ref, seq2)
    assert (got[0] - expect).abs().max() <= 1e-4 * expect.abs().max()
    for _ in range(3):  # decode steps over the paged cache written in chunks
        seq2.append_token(int(got[0].argmax()))
        if len(seq2.block_table) * block_size < seq2.num_tokens:
            seq2.block_table.append(free.pop())
        got = chunked.run([(seq2, 1)])
        seq2.num_computed_tokens += 1
        expect = _hf_last_logits(ref, seq2)
        assert (got[0] - expect).abs().max() <= 1e-4 * expect.abs().max()


# --- block keys and hashes --------------------------------------------------------------------
def _seq(vs, lv, n_text, key, base=100):
    return Sequence([base + i for i in range(n_text)], SamplingParams(max_new_tokens=4),
                    video_embeds=torch.zeros(lv, 2), video_key=key, video_start=vs)


def _hashes(bm, seq):
    prev, out = 0, []
    for i in range(seq.num_tokens // bm.block_size):
        content = bm.block_content(seq, i)
        assert len(content) == bm.block_size
        prev = bm.block_hash(seq, i, prev, content)
        out.append(prev)
    return out


@pytest.mark.parametrize("bs", [1, 4, 8])
@pytest.mark.parametrize("vs", [0, 3, 4, 8, 9])
def test_block_keys_and_hashes_with_text_before_the_video(bs, vs):
    bm = BlockManager(64, bs)
    a, b, a2 = _seq(vs, 6, vs + 7, "video-a"), _seq(vs, 6, vs + 7, "video-b"), _seq(vs, 6, vs + 7, "video-a")
    for i in range(a.num_tokens // bs):
        content = bm.block_content(a, i)
        for o, k in enumerate(content):
            p = i * bs + o
            if a.video_start <= p < a.video_end:
                assert k < 0  # video marker
            else:
                assert k == a.position_key(p) >= 0
        assert bm.overlaps_video(a, i) == any(a.video_start <= i * bs + o < a.video_end for o in range(bs))
    ha, hb = _hashes(bm, a), _hashes(bm, b)
    leading = vs // bs  # blocks entirely before the video
    assert ha[:leading] == hb[:leading]
    assert all(x != y for x, y in zip(ha[leading:], hb[leading:]))  # every block from the video on differs
    assert _hashes(bm, a2) == ha
    # the same keys with the video elsewhere never collide past the shared leading text
    shifted = _seq(vs + 1, 6, vs + 7, "video-a")
    assert all(x != y for x, y in zip(ha[leading:], _hashes(bm, shifted)[leading:]))


@pytest.mark.parametrize("bs,vs", [(4, 9), (8, 8), (8, 3)])
def test_prefix_cache_shares_only_leading_text_blocks_across_videos(bs, vs):
    bm = BlockManager(64, bs)
    a = _seq(vs, 10, vs + 9, "video-a")
    bm.allocate(a)
    a.num_computed_tokens = a.num_tokens
    bm.publish(a)
    b = _seq(vs, 10, vs + 9, "video-b")
    bm.allocate(b)
    assert b.num_cached_tokens == vs // bs * bs
    assert b.block_table[:vs // bs] == a.block_table[:vs // bs]
    assert not set(b.block_table[vs // bs:]) & set(a.block_table)
    c = _seq(vs, 10, vs + 9, "video-a")
    bm.allocate(c)
    assert c.num_cached_tokens == (c.num_tokens - 1) // bs * bs > b.num_cached_tokens
    for s in (a, b, c):
        bm.free(s)
    bm.check()
    assert bm.stats()["used_blocks"] == 0


# --- left truncation --------------------------------------------------------------------------
@pytest.mark.parametrize("vs,lv,n_text,over", [(4, 5, 7, 2), (4, 5, 7, 4), (4, 5, 7, 6), (4, 5, 7, 9),
                                                (4, 5, 7, 11), (0, 5, 3, 2), (0, 5, 3, 7), (3, 0, 6, 4)])
def test_truncate_left_cuts_the_flat_layout(vs, lv, n_text, over):
    ids = list(range(100, 100 + n_text))
    tokens = torch.arange(lv, dtype=torch.float32)[:, None] if lv else None
    vs = vs if lv else 0
    flat = [("t", i) for i in ids[:vs]] + [("v", float(j)) for j in range(lv)] + [("t", i) for i in ids[vs:]]
    t2, key, ids2, vs2 = truncate_left(tokens, "k", ids, vs, over)
    lv2 = 0 if t2 is None else t2.shape[0]
    got = [("t", i) for i in ids2[:vs2]] + [("v", float(x)) for x in (t2[:, 0].tolist() if lv2 else [])] \
        + [("t", i) for i in ids2[vs2:]]
    assert got == flat[over:]
    assert (key != "k") == (lv2 < lv)
    assert vs2 == 0 or lv2 == lv


def mvbench_layout(ref, question, candidates):
    """(prompt length, video start) of the reference's BOS + text | every frame's tokens | text."""
    tok, q = ref.llama_tokenizer, mvbench_question(question, candidates)
    before, after = (len(tok(t, add_special_tokens=False).input_ids) for t in mvbench_prompt_segments(q))
    return 1 + before + ref.config.num_frames * ref.config.qformer.num_query_tokens + after, 1 + before


@pytest.mark.parametrize("over,where", [(30, "text"), (70, "video")])  # what the left cut reaches
def test_left_truncation_matches_reference(folders, over, where):
    prompt, vs = mvbench_layout(reference(folders("eva", "all")), Q, C)
    assert (over < vs) == (where == "text") and over < vs + 48
    f = folders("eva", "all", llm_max_position_embeddings=prompt + 20 - over)
    ref, llm = reference(f), make_llm(f)
    video = frames(3)
    gen = reference_ids(ref, video, Q, C, max_new_tokens=20)
    (out,) = llm.mvbench_generate([(video, Q, C)], llm.mvbench_params(max_new_tokens=20))
    assert out.num_prompt_tokens == gen.prompt_length == prompt - over
    assert out.token_ids == gen.token_ids
    assert_clean(llm)


# --- MVBench through the engine ---------------------------------------------------------------
@pytest.mark.parametrize("vit,vi,budget,q,c", [
    ("eva", "all", 2048, Q, C),
    ("btadapter", "residual", 24, "How many times does it flash?", ["2", "3"]),  # chunked prefill
])
def test_mvbench_answer_equals_reference(folders, vit, vi, budget, q, c):
    f = folders(vit, vi)
    ref, llm = reference(f), make_llm(f, max_num_batched_tokens=budget)
    video = frames(len(q))
    want = ref.mvbench_answer(video, q, c)
    got = llm.mvbench_answer(video, q, c)
    assert got == want and got.startswith("(")
    gen = reference_ids(ref, video, q, c)
    out = llm.last_output
    assert out.token_ids == gen.token_ids and out.num_prompt_tokens == gen.prompt_length
    assert out.finish_reason == ("length" if len(gen.token_ids) == 100 else "stop")
    assert (out.num_prompt_tokens, llm.engine.mvbench_prompt_ids(mvbench_question(q, c))[1]) == \
        mvbench_layout(ref, q, c)
    assert_clean(llm)


@pytest.mark.parametrize("vit,vi,budget", [("eva", "all", 2048), ("btadapter", "residual", 24)])
def test_mvbench_ask_simple_equals_reference(folders, vit, vi, budget):
    """Release audit: the published test_mvbench.sh runs --ask_simple (get_context_emb_sim):
    the video tokens first, then BOS + the text after "</Video>\\n". Engine == reference there,
    and the layout is that one: video at 0, then BOS (</s>) and mvbench_simple_prompt's ids."""
    from stllm_engine.prompts import mvbench_simple_prompt

    f = folders(vit, vi)
    ref, llm = reference(f), make_llm(f, max_num_batched_tokens=budget)
    video = frames(5)
    want = ref.mvbench_answer(video, Q, C, ask_simple=True)
    assert llm.mvbench_answer(video, Q, C, ask_simple=True) == want
    gen = reference_ids(ref, video, Q, C, ask_simple=True)
    assert llm.last_output.token_ids == gen.token_ids and llm.last_output.num_prompt_tokens == gen.prompt_length
    q = mvbench_question(Q, C)
    ids, vs = llm.engine.mvbench_prompt_ids(q, ask_simple=True)
    tok = ref.llama_tokenizer
    assert vs == 0 and ids == [tok.eos_token_id] + tok(mvbench_simple_prompt(q), add_special_tokens=False).input_ids
    assert gen.prompt_length == len(ids) + ref.config.num_frames * ref.config.qformer.num_query_tokens
    assert_clean(llm)


def test_mvbench_generate_batches_and_isolates_errors(folders, tmp_path_factory):
    f = folders("eva", "all")
    ref, llm = reference(f), make_llm(f, max_num_batched_tokens=64)
    clip = write_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=24, size=(96, 72), fps=8)
    items = [(frames(0), Q, C),
             dict(video=str(clip) + ".missing", question=Q, candidates=C),
             dict(video=clip, question="What appears first?", candidates=["circle", "square"], bound=(0.5, 2.5),
                  num_frames=6),
             dict(video=frames(1), question=Q, candidates=[])]
    outs = llm.mvbench_generate(items)  # continuous batching, chunked prefills of 64 positions
    assert [o.error is None for o in outs] == [True, False, True, False]
    assert "missing" in outs[1].error and "candidate" in outs[3].error
    assert llm.mvbench_text(outs[0]) == ref.mvbench_answer(frames(0), Q, C)
    assert llm.mvbench_text(outs[2]) == ref.mvbench_answer(clip, "What appears first?", ["circle", "square"],
                                                           bound=(0.5, 2.5), num_frames=6)
    assert outs[2].num_prompt_tokens == mvbench_layout(ref, "What appears first?", ["circle", "square"])[0] - 2 * 6
    with pytest.raises(RuntimeError, match="failed"):
        llm.mvbench_text(outs[1])
    with pytest.raises(ValueError, match="item 0"):
        llm.mvbench_generate([(frames(0), Q)])
    with pytest.raises(ValueError, match="unknown keys"):
        llm.mvbench_generate([dict(video=frames(0), question=Q, candidates=C, keep_ratio=0.5)])
    assert_clean(llm)


def test_mvbench_prefix_cache_shares_system_text_not_videos(folders):
    f = folders("eva", "all")
    llm = make_llm(f)
    eng = llm.engine
    ids, vs = eng.mvbench_prompt_ids(mvbench_question(Q, C))
    assert ids[0] == eng.tokenizer.eos_token_id and vs > BS and vs % BS
    leading = vs // BS * BS  # positions of the text-only blocks before the video
    short = llm.mvbench_params(max_new_tokens=3)

    def ask(video, q=Q, **kw):
        hits = eng.stats()["kv"]["prefix_hit_blocks"]
        (out,) = llm.mvbench_generate([dict(video=video, question=q, candidates=C, **kw)], short)
        assert out.error is None
        return out, eng.stats()["kv"]["prefix_hit_blocks"] - hits

    a, hits = ask(frames(0))
    assert a.num_cached_tokens == 0 and hits == 0
    b, hits = ask(frames(1))  # another video, same system text and question
    assert b.num_cached_tokens == leading and hits == vs // BS
    c, hits = ask(frames(0), "Which shape is the largest?")  # same frames, other Q-Former question
    assert c.num_cached_tokens == leading and hits == vs // BS
    d, hits = ask(frames(0))  # same video and question: all but the last token's block
    assert d.num_cached_tokens == (d.num_prompt_tokens - 1) // BS * BS > leading + 48
    assert d.token_ids == a.token_ids
    e, hits = ask(frames(1), system="Look closely.\n")
    assert e.num_cached_tokens == 0 and hits == 0
    vc = eng.stats()["vision_cache"]
    # ViT skipped 3 times: c's features, d's and e's video tokens (same question; token hits too)
    assert vc["hits"] == 3 and vc["token_hits"] == 2
    assert_clean(llm)


def test_beam_search_with_text_before_the_video(folders):
    f = folders("btadapter", "residual")
    ref, llm = reference(f), make_llm(f)
    video = frames(5)
    want = reference_ids(ref, video, Q, C, num_beams=2, max_new_tokens=8)
    (out,) = llm.mvbench_generate([(video, Q, C)], llm.mvbench_params(num_beams=2, max_new_tokens=8))
    assert out.token_ids == want.token_ids
    assert_clean(llm)


@pytest.mark.parametrize("video_tokens", ["release", "own"])
def test_engine_answerer_equals_reference_answerer(folders, video_tokens):
    f = folders("btadapter", "residual")
    eng = EngineAnswerer(str(f), video_tokens=video_tokens, num_kv_blocks=160, block_size=BS)
    refa = ReferenceAnswerer(str(f), video_tokens=video_tokens)
    assert eng.image_size == refa.image_size == 56 and eng.num_frames == refa.num_frames
    item = (frames(7), "What happens last?", ["it stops", "it turns", "it grows"])
    want = refa.mvbench_answer(*item)
    assert eng.mvbench_answer(*item) == want
    assert eng.mvbench_answers([item, item]) == [want, want]  # batched, same prefill twice
    with pytest.raises(ValueError, match="video_tokens"):
        EngineAnswerer(str(f), video_tokens="mean")


def test_evaluation_cli_engine_backend_equals_reference_backend(folders, tmp_path):
    from stllm_engine.datasets import build_dataset
    from stllm_engine.evaluation.mvbench import main

    data = build_dataset(tmp_path / "data", 0, 1, seed=3, num_frames=16, size=64, tasks=["Moving Direction"])
    f = str(folders("eva", "all"))
    args = ["--data", str(data), "--model", f, "--limit", "1"]
    eng = main(args + ["--backend", "engine", "--out", str(tmp_path / "engine.json")])
    ref = main(args + ["--backend", "reference"])
    assert len(eng.records) == 1 and eng.records[0]["pred"].startswith("(")
    assert [r["pred"] for r in eng.records] == [r["pred"] for r in ref.records]
    assert (tmp_path / "engine.json").exists()
    simple = ["--ask-simple", "--segments", "0"]  # the published test_mvbench.sh protocol
    eng = main(args + simple + ["--backend", "engine", "--out", str(tmp_path / "simple.json")])
    ref = main(args + simple + ["--backend", "reference"])
    assert [r["pred"] for r in eng.records] == [r["pred"] for r in ref.records]
    meta = json.loads((tmp_path / "simple.json").read_text())
    assert meta["ask_simple"] is True and meta["segments"] == 0
