"""LLMEngine end to end on tiny checkpoints against the transformers reference: greedy token
identity for every variant, beam search identity, batch == alone, stop/max/min tokens, abort,
preemption with a tiny KV pool, prefix- and vision-cache hits, per-request errors."""
import pytest
import torch

from stllm_engine.engine.llm_engine import EngineConfig, LLMEngine
from stllm_engine.model.stllm import STLLMModel
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.videos import write_video
from stllm_engine.tokenizers import load_llama_tokenizer
from stllm_engine.video import load_video
from stllm_engine.weights import load_checkpoint

VARIANTS = [("eva", "all"), ("eva", "mean"), ("eva", "residual"),
            ("btadapter", "all"), ("btadapter", "mean"), ("btadapter", "residual")]
Q = "what is moving in the video?"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=20, size=(96, 72))


def make_engine(folder, device="cpu", **cfg):
    model = STLLMModel.from_checkpoint(load_checkpoint(folder), device, torch.float32)
    cfg.setdefault("block_size", 8)
    cfg.setdefault("num_kv_blocks", 96)
    return LLMEngine(model, load_llama_tokenizer(folder), EngineConfig(**cfg))


def run(engine, reqs):
    """reqs: list of (video, question, params, kw); returns finished outputs in order."""
    rids = [engine.add_request(v, q, p, **kw) for v, q, p, kw in reqs]
    done = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            if o.finished:
                assert o.request_id not in done
                done[o.request_id] = o
    assert set(done) == set(rids)
    return [done[r] for r in rids]


def assert_clean(engine):
    engine.block_manager.check()
    s = engine.block_manager.stats()
    assert s["used_blocks"] == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert len(engine.frame_loader) == 0 and not engine.has_unfinished_requests()


def release_params(ref, **kw):
    """Engine params equal to the reference's chat defaults (token-level '###' stop)."""
    kw.setdefault("max_new_tokens", 12)
    return SamplingParams(min_new_tokens=1, stop=[], stop_token_ids=ref.stop_sequences, **kw)


@pytest.mark.parametrize("vit,vi", VARIANTS)
def test_greedy_tokens_match_reference(folders, video, vit, vi):
    f = folders(vit, vi)
    ref = ReferenceSTLLM.from_pretrained(f)
    frames = load_video(video, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames
    want = ref.generate_ids(frames, Q, max_new_tokens=12).token_ids
    eng = make_engine(f, max_num_batched_tokens=24 if vit == "btadapter" else 2048)  # chunked prefill too
    out, out_file = run(eng, [(frames, Q, release_params(ref), {}), (video, Q, release_params(ref), {})])
    assert out.token_ids == want and out.error is None
    assert out_file.token_ids == want  # same frames through load_video inside the engine
    assert out.finish_reason == ("length" if len(want) == 12 else "stop")
    assert_clean(eng)


@pytest.mark.parametrize("vit,vi,num_beams", [("eva", "all", 3), ("btadapter", "residual", 2)])
def test_beam_search_matches_reference(folders, video, vit, vi, num_beams):
    f = folders(vit, vi)
    ref = ReferenceSTLLM.from_pretrained(f)
    frames = load_video(video, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames
    embeds = ref.chat_inputs_embeds(ref.encode_video(frames, Q), Q)
    eng = make_engine(f)
    greedy = ref.generate_from_embeds(embeds, max_new_tokens=8).token_ids
    # stop sequences made of tokens this tiny model emits, so that beams finish early
    for stops, lp in ((ref.stop_sequences, 1.0), ([[greedy[2]]], 1.0), ([greedy[1:3]], 1.0),
                      ([[greedy[4]]], -1.0)):
        ref._stop_sequences = stops
        want = ref.generate_from_embeds(embeds, max_new_tokens=8, num_beams=num_beams, length_penalty=lp)
        p = SamplingParams(min_new_tokens=1, stop=[], stop_token_ids=stops, max_new_tokens=8,
                           num_beams=num_beams, length_penalty=lp)
        (out,) = run(eng, [(frames, Q, p, {})])
        assert out.token_ids == want.token_ids, (stops, lp)
    assert eng.block_manager.stats()["cow_copies"] > 0
    assert_clean(eng)


def test_mixed_batch_equals_each_alone(folders, video, tmp_path):
    f = folders("eva", "all")
    eng = make_engine(f, max_num_batched_tokens=40)
    reqs = [
        (video, Q, SamplingParams(max_new_tokens=9), {}),
        (video, "which color is the square?", SamplingParams(max_new_tokens=6, repetition_penalty=1.0), {}),
        (video, Q, SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, top_p=0.9, seed=5), {}),
        (str(tmp_path / "missing.mp4"), Q, SamplingParams(), {}),
        (video, Q, SamplingParams(max_new_tokens=5, num_beams=2), {}),
        (video, "how many shapes?", SamplingParams(max_new_tokens=8, temperature=1.2, seed=7), {"keep_ratio": 0.5}),
    ]
    batched = run(eng, reqs)
    assert eng.scheduler.num_preemptions == 0
    solo = make_engine(f)
    alone = [run(solo, [r])[0] for r in reqs]
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason and b.error == a.error
    assert batched[3].error and "missing.mp4" in batched[3].error and batched[3].finish_reason == "error"
    assert all(o.error is None for i, o in enumerate(batched) if i != 3)
    assert_clean(eng)


@pytest.fixture(scope="module")
def eva_all(folders):
    f = folders("eva", "all")
    return f, ReferenceSTLLM.from_pretrained(f)


def test_stop_max_and_min_tokens(eva_all, video):
    f, ref = eva_all
    eng = make_engine(f)
    (free,) = run(eng, [(video, Q, SamplingParams(max_new_tokens=8), {})])
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    (stopped,) = run(eng, [(video, Q, SamplingParams(max_new_tokens=8, stop_token_ids=[[stop_tok]]), {})])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first + 1]
    (late,) = run(eng, [(video, Q, SamplingParams(max_new_tokens=8, min_new_tokens=first + 2,
                                                  stop_token_ids=[[stop_tok]]), {})])
    assert len(late.token_ids) > first + 1
    text = eng.tokenizer.decode(free.token_ids[:5], skip_special_tokens=True)
    stop_str = text[-3:] if text[-3:].strip() else text[-5:]
    (by_text,) = run(eng, [(video, Q, SamplingParams(max_new_tokens=8, stop=[stop_str]), {})])
    assert by_text.finish_reason == "stop" and stop_str not in by_text.text
    assert len(by_text.token_ids) <= 5
    assert_clean(eng)


def test_abort_in_flight_leaves_others_intact(eva_all, video):
    f, _ = eva_all
    eng = make_engine(f, max_num_batched_tokens=16)
    p = SamplingParams(max_new_tokens=10)
    keep = eng.add_request(video, Q, p)
    waiting = eng.add_request(video, "other question?", p)
    decoding = eng.add_request(video, "third?", p)
    outs = {}
    for _ in range(12):  # the first prompt is prefilled in chunks; the others wait or run
        for o in eng.step():
            outs[o.request_id] = o
    assert eng.abort(decoding) and eng.abort(waiting)
    assert not eng.abort("no-such-request")
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[decoding].finish_reason == "abort" and outs[waiting].finish_reason == "abort"
    (alone,) = run(make_engine(f), [(video, Q, p, {})])
    assert outs[keep].token_ids == alone.token_ids and outs[keep].finish_reason == "length"
    assert_clean(eng)


def test_preemption_with_tiny_kv_pool(eva_all, video):
    f, _ = eva_all
    reqs = [(video, q, SamplingParams(max_new_tokens=14, repetition_penalty=1.2), {})
            for q in ("a?", "b b?", "c c c?")]
    big = run(make_engine(f), reqs)
    # room for the first two prompts (+1 block) only: they are admitted, then outgrow the pool
    blocks = sum(-(-o.num_prompt_tokens // 8) for o in big[:2]) + 1
    eng = make_engine(f, num_kv_blocks=blocks, enable_prefix_caching=False)
    small = run(eng, reqs)
    assert eng.scheduler.num_preemptions > 0 and sum(o.num_preemptions for o in small) > 0
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert_clean(eng)


def test_a_preempted_request_counts_only_its_first_admission_cache_hits(eva_all, video):
    """With prefix caching on, a preempted request finds its own published blocks again when it
    comes back; those are recomputed positions, not prompt positions served from the cache (it
    reported 80 cached tokens for a 68-token prompt)."""
    f, _ = eva_all
    reqs = [(video, q, SamplingParams(max_new_tokens=40, ignore_eos=True, stop=[]), {}) for q in ("a?", "b b?")]
    big = run(make_engine(f), reqs)
    blocks = sum(-(-o.num_prompt_tokens // 8) for o in big) + 2
    eng = make_engine(f, num_kv_blocks=blocks)
    small = run(eng, reqs)
    assert sum(o.num_preemptions for o in small) > 0 and eng.block_manager.hit_tokens > 0
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert [o.num_cached_tokens for o in small] == [0, 0]  # their Q-Former tokens differ: no shared prefix
    assert eng.metrics.cached_prompt_tokens == 0
    assert_clean(eng)


def test_vision_cache_hits_count_alike_for_files_bytes_and_arrays(eva_all, video):
    """Three times the same video and question: the ViT runs once whatever the source, and
    ``hits`` says so (bytes and arrays counted 0 hits, their Q-Former tokens hitting first)."""
    import numpy as np

    f, _ = eva_all
    frames = load_video(video, num_frames=4, preprocess=False).frames
    p = SamplingParams(max_new_tokens=2)
    for source in (video, open(video, "rb").read(), np.ascontiguousarray(frames)):
        eng = make_engine(f)
        outs = [run(eng, [(source, Q, p, {})])[0] for _ in range(3)]
        assert [o.timings.vision_cache_hit for o in outs] == [False, True, True]
        s = eng.stats()["vision_cache"]
        assert (s["hits"], s["misses"], s["token_hits"]) == (2, 1, 2), type(source)


def test_generated_ids_skip_an_id_a_caller_chose(eva_all, video):
    """A caller's own "req-N" made the next generated id collide: ValueError to a caller who
    passed no id."""
    f, _ = eva_all
    eng = make_engine(f)
    p = SamplingParams(max_new_tokens=2)
    taken = eng.add_request(video, Q, p, request_id=f"req-{eng._next_id}")
    other = eng.add_request(video, Q, p)
    assert other != taken and other.startswith("req-")
    while eng.has_unfinished_requests():
        eng.step()
    assert_clean(eng)


def test_prefix_and_vision_cache_hits(eva_all, video):
    f, _ = eva_all
    eng = make_engine(f)
    p = SamplingParams(max_new_tokens=6)
    (a,) = run(eng, [(video, Q, p, {})])
    assert a.num_cached_tokens == 0 and not a.timings.vision_cache_hit
    (b,) = run(eng, [(video, Q, p, {})])
    assert b.token_ids == a.token_ids
    assert b.num_cached_tokens == (b.num_prompt_tokens - 1) // 8 * 8 > 0
    assert b.timings.vision_cache_hit and b.timings.vision == pytest.approx(0, abs=0.05)
    assert b.timings.video_tokens_cache_hit and not a.timings.video_tokens_cache_hit  # same question
    (c,) = run(eng, [(video, "a different question", p, {})])
    assert c.timings.vision_cache_hit and c.num_cached_tokens == 0  # Q-Former tokens differ
    assert not c.timings.video_tokens_cache_hit
    s = eng.stats()
    assert s["vision_cache"]["hits"] == 2 and s["vision_cache"]["misses"] == 1
    assert s["vision_cache"]["token_hits"] == 1 and s["vision_cache"]["token_misses"] == 2
    assert s["kv"]["prefix_hit_tokens"] == b.num_cached_tokens
    assert_clean(eng)


def test_cached_video_tokens_skip_the_qformer_and_equal_a_fresh_run(eva_all, video, monkeypatch):
    """The same question on the same video again (a stateless client resending a conversation)
    reuses its video tokens: the Q-Former does not run, and the answer equals an engine without
    caches; keep_ratio still masks the reused tokens."""
    f, _ = eva_all
    eng = make_engine(f)
    calls = []
    real = type(eng.model).encode_video
    monkeypatch.setattr(type(eng.model), "encode_video", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    p = SamplingParams(max_new_tokens=6)
    (a,) = run(eng, [(video, Q, p, {})])
    (b,) = run(eng, [(video, Q, p, {})])
    assert len(calls) == 1 and b.timings.video_tokens_cache_hit and b.token_ids == a.token_ids
    (half,) = run(eng, [(video, Q, p, {"keep_ratio": 0.5})])
    assert len(calls) == 1 and half.timings.video_tokens_cache_hit
    fresh = make_engine(f, vision_cache_bytes=0, enable_prefix_caching=False)
    (want_half,) = run(fresh, [(video, Q, p, {"keep_ratio": 0.5})])
    assert len(calls) == 2  # the cache-less engine ran its Q-Former
    assert half.token_ids == want_half.token_ids and half.num_prompt_tokens == want_half.num_prompt_tokens
    assert half.num_prompt_tokens < a.num_prompt_tokens
    assert_clean(eng)


def test_vision_cache_hit_skips_decoding(eva_all, tmp_path, monkeypatch):
    """A repeat request for the same file and sampling finds its features without decoding; new
    content at the same path, or another frame count, decodes again."""
    import stllm_engine.engine.video_prep as vp

    f, _ = eva_all
    eng = make_engine(f)
    path = write_video(tmp_path / "v.mp4", num_frames=12, size=(64, 48), seed=5)
    decodes = []
    real = vp._frames_of
    monkeypatch.setattr(vp, "_frames_of", lambda *a, **k: decodes.append(a[2]) or real(*a, **k))
    p = SamplingParams(max_new_tokens=3)
    first, second = (run(eng, [(path, q, p, {})])[0] for q in ("one?", "two?"))
    assert decodes == [8] and second.timings.vision_cache_hit and not first.timings.vision_cache_hit
    assert eng.stats()["vision_cache"]["decodes_skipped"] == 1
    (other_n,) = run(eng, [(path, "one?", p, {"num_frames": 4})])
    assert decodes == [8, 4] and not other_n.timings.vision_cache_hit
    write_video(path, num_frames=12, size=(64, 48), seed=6)  # same path, new content
    (fresh,) = run(eng, [(path, "one?", p, {})])
    assert decodes == [8, 4, 8] and not fresh.timings.vision_cache_hit
    assert eng.stats()["vision_cache"]["decodes_skipped"] == 1
    assert_clean(eng)


def test_background_decodes_remember_their_plan_and_never_hash_on_the_engine_thread(eva_all, video, tmp_path,
                                                                                     monkeypatch):
    """A new file decoded in the background (the engine busy) is hashed off the engine thread,
    and its sampling plan is remembered: a later request for it skips decoding."""
    import threading

    from stllm_engine.video import sources

    f, _ = eva_all
    eng = make_engine(f)
    path = write_video(tmp_path / "late.mp4", num_frames=12, size=(64, 48), seed=7)
    where = []
    real = sources.content_hash
    monkeypatch.setattr(sources, "content_hash", lambda src: where.append(
        (threading.current_thread().name, getattr(src.path, "name", None))) or real(src))
    p = SamplingParams(max_new_tokens=3)
    outs = run(eng, [(video, Q, p, {}), (path, Q, p, {})])  # the second decodes while the first runs
    late = [name for name, file in where if file == "late.mp4"]
    assert late and all(name.startswith("stllm-frames") for name in late)
    assert all(o.finish_reason == "length" for o in outs)
    (again,) = run(eng, [(path, "another question?", p, {})])
    assert again.timings.vision_cache_hit and eng.stats()["vision_cache"]["decodes_skipped"] == 1
    assert_clean(eng)


def test_timings_are_filled(eva_all, video):
    f, _ = eva_all
    (o,) = run(make_engine(f), [(video, Q, SamplingParams(max_new_tokens=5), {})])
    t = o.timings
    assert t.frame_decode > 0 and t.vision > 0 and t.qformer > 0 and t.prefill > 0
    assert 0 < t.ttft <= t.total and t.num_decode_tokens == 4 and t.decode_tokens_per_s > 0


def test_left_truncation_matches_reference(folders, video):
    f = folders("eva", "all", llm_max_position_embeddings=96)
    ref = ReferenceSTLLM.from_pretrained(f)
    frames = load_video(video, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames
    gen = ref.generate_ids(frames, Q, max_new_tokens=40)
    eng = make_engine(f)
    (out,) = run(eng, [(frames, Q, release_params(ref, max_new_tokens=40), {})])
    assert out.num_prompt_tokens == gen.prompt_length < 48 + 40
    assert out.token_ids == gen.token_ids
    # the output says how much was cut: prompt + max_new_tokens now fills the 96 positions exactly
    assert out.num_truncated_prompt_tokens > 0 and out.num_prompt_tokens + 40 == 96
    (less,) = run(eng, [(frames, Q, release_params(ref, max_new_tokens=4), {})])  # fewer new tokens: less cut
    assert less.num_truncated_prompt_tokens == out.num_truncated_prompt_tokens - 36
    assert less.num_prompt_tokens + less.num_truncated_prompt_tokens == \
        out.num_prompt_tokens + out.num_truncated_prompt_tokens
    strict = make_engine(f, truncate_prompt=False)
    (err,) = run(strict, [(frames, Q, SamplingParams(max_new_tokens=40), {})])
    assert err.finish_reason == "error" and "context too long" in err.error


def test_bad_requests_fail_alone(folders, video, tmp_path):
    f = folders("btadapter", "all")
    eng = make_engine(f)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video")
    good = SamplingParams(max_new_tokens=4)
    reqs = [(video, Q, good, {}), (junk, Q, good, {}), (torch.zeros(65, 3, 56, 56), Q, good, {}),
            (video, Q, "greedy please", {}), (video, 42, good, {}), (video, Q, good, {"keep_ratio": 0.0}),
            (torch.zeros(2, 3, 7, 7), Q, good, {})]
    outs = run(eng, reqs)
    assert outs[0].error is None and len(outs[0].token_ids) == 4
    assert all(o.finish_reason == "error" and o.error for o in outs[1:])
    assert "at most 64 frames" in outs[2].error
    assert "SamplingParams" in outs[3].error and "question" in outs[4].error
    assert "keep_ratio" in outs[5].error and "frames" in outs[6].error
    eng.add_request(video, Q, good, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request(video, Q, good, request_id="dup")
    assert eng.abort("dup")
    eng.step()
    assert_clean(eng)


def test_beams_preempt_others_instead_of_failing(eva_all, video):
    """A beam request in a pool too small for it and a greedy request together: beam steps
    preempt the greedy one (recomputed later) and both give their alone results."""
    f, _ = eva_all
    beam, greedy = SamplingParams(max_new_tokens=8, num_beams=3), SamplingParams(max_new_tokens=8)
    reqs = [(video, Q, beam, {}), (video, "which shape?", greedy, {})]
    alone = [run(make_engine(f), [r])[0] for r in reqs]
    P = max(o.num_prompt_tokens for o in alone)
    blocks = 2 * -(-P // 8) + 2  # both prompts fit; the beams' forks and the greedy growth do not
    eng = make_engine(f, num_kv_blocks=blocks, enable_prefix_caching=False)
    together = run(eng, reqs)
    assert [o.error for o in together] == [None, None]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert eng.scheduler.num_preemptions > 0
    assert_clean(eng)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_beam_requests_that_fit_alone_finish_together(eva_all, video, prefix_caching):
    """Beam requests that each fit the KV pool alone but not side by side: the later ones are
    preempted (beams freed, prompt queued again, search restarted) instead of failing, and every
    request gives its alone result; a greedy request among them too."""
    f, _ = eva_all
    reqs = [(video, Q, SamplingParams(max_new_tokens=8, num_beams=3), {}),
            (video, "which shape is it?", SamplingParams(max_new_tokens=8, num_beams=2), {}),
            (video, "what colour?", SamplingParams(max_new_tokens=8), {}),
            (video, "where does it go?", SamplingParams(max_new_tokens=8, num_beams=3), {})]
    P = run(make_engine(f), reqs[:1])[0].num_prompt_tokens  # the longest question
    blocks = 2 * -(-P // 8) + 3  # two prompts fit side by side, their beams' growth does not
    cfg = dict(num_kv_blocks=blocks, enable_prefix_caching=prefix_caching)
    alone = [run(make_engine(f, **cfg), [r])[0] for r in reqs]
    assert [o.error for o in alone] == [None] * 4
    eng = make_engine(f, **cfg)
    together = run(eng, reqs)
    assert [o.error for o in together] == [None] * 4
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert eng.scheduler.num_preemptions > 0
    assert_clean(eng)


def _drive(eng, after: dict | None = None) -> dict:
    """Step until idle; {request_id: (step it finished, output)}. ``after``: {step: fn(eng)}."""
    done, step = {}, 0
    while eng.has_unfinished_requests():
        if after and step in after:
            after[step](eng)
        for o in eng.step():
            if o.finished:
                done[o.request_id] = (step, o)
        step += 1
        assert step < 5000
    return done


def test_beam_requests_leave_no_sequences_behind(eva_all, video):
    """An aborted search, one that ran out of blocks and a finished one leave no entry in the
    engine's sequence map (pruned beams pinned dead requests and their video tokens)."""
    f, _ = eva_all
    eng = make_engine(f)
    rid = eng.add_request(video, Q, SamplingParams(max_new_tokens=12, num_beams=3, min_new_tokens=12))
    _drive(eng, {6: lambda e: e.abort(rid)})
    run(eng, [(video, Q, SamplingParams(max_new_tokens=6, num_beams=3), {})])
    P = run(make_engine(f), [(video, Q, SamplingParams(max_new_tokens=1), {})])[0].num_prompt_tokens
    tight = make_engine(f, num_kv_blocks=-(-P // 8) + 1, enable_prefix_caching=False)
    (out,) = run(tight, [(video, Q, SamplingParams(max_new_tokens=4, num_beams=3), {})])
    assert "ran out of KV blocks" in out.error
    for e in (eng, tight):
        assert e._by_seq == {}
        assert_clean(e)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_higher_priority_request_preempts_a_beam_search(eva_all, video, num_beams):
    """A priority -5 request arriving while a priority 5 request runs (greedy or a beam search,
    which runs outside the scheduler) in a pool without room for both runs at once; both give
    their alone results."""
    f, _ = eva_all
    lo_req = (video, "a?", SamplingParams(max_new_tokens=12, num_beams=num_beams), {"priority": 5})
    hi_req = (video, Q, SamplingParams(max_new_tokens=3), {"priority": -5})
    alone = [run(make_engine(f), [r])[0] for r in (lo_req, hi_req)]
    blocks = -(-alone[0].num_prompt_tokens // 8) + 5  # the low request and its beams, not a second prompt
    eng = make_engine(f, num_kv_blocks=blocks, enable_prefix_caching=False)
    ids = {}
    ids["lo"] = eng.add_request(*lo_req[:3], **lo_req[3])
    done = _drive(eng, {3: lambda e: ids.setdefault("hi", e.add_request(*hi_req[:3], **hi_req[3]))})
    (lo_step, lo), (hi_step, hi) = done[ids["lo"]], done[ids["hi"]]
    assert hi_step < lo_step and hi.num_preemptions == 0
    assert [lo.token_ids, hi.token_ids] == [a.token_ids for a in alone]
    assert_clean(eng)


def test_a_lower_priority_beam_search_does_not_preempt_a_higher_one(eva_all, video):
    f, _ = eva_all
    lo_req = (video, "a?", SamplingParams(max_new_tokens=12, num_beams=3), {"priority": 5})
    hi_req = (video, Q, SamplingParams(max_new_tokens=12), {"priority": -5})
    alone = [run(make_engine(f), [r])[0] for r in (lo_req, hi_req)]
    for blocks in (28, 31, 33):
        eng = make_engine(f, num_kv_blocks=blocks, enable_prefix_caching=False)
        ids = {"lo": eng.add_request(*lo_req[:3], **lo_req[3])}
        done = _drive(eng, {2: lambda e: ids.setdefault("hi", e.add_request(*hi_req[:3], **hi_req[3]))})
        (_, lo), (_, hi) = done[ids["lo"]], done[ids["hi"]]
        assert hi.num_preemptions == 0, blocks
        assert [lo.token_ids, hi.token_ids] == [a.token_ids for a in alone]
        assert_clean(eng)


def test_new_video_decodes_in_the_background(eva_all, video, tmp_path, monkeypatch):
    """add_request returns while a new video decodes; running requests keep producing tokens in
    the meantime; the new one joins once its frames are ready, with the same result as alone; a
    request aborted while decoding never runs."""
    import threading

    import stllm_engine.engine.llm_engine as le

    f, _ = eva_all
    gate, real = threading.Event(), le.decode_video

    def gated(*a, **k):
        assert gate.wait(30), "test gate never opened"
        return real(*a, **k)

    p = SamplingParams(max_new_tokens=6)
    new_video = write_video(tmp_path / "new.mp4", num_frames=10, size=(64, 48), seed=8)
    (alone,) = run(make_engine(f), [(new_video, Q, p, {})])
    eng = make_engine(f)
    first = eng.add_request(video, Q, p)
    while not eng.scheduler.has_work():
        eng.step()  # the first request's decode finishes and it is admitted
    monkeypatch.setattr(le, "decode_video", gated)
    late = eng.add_request(new_video, Q, p)
    doomed = eng.add_request(write_video(tmp_path / "d.mp4", num_frames=10, size=(64, 48), seed=9), Q, p)
    assert len(eng.frame_loader) == 2 and eng.abort(doomed) and len(eng.frame_loader) == 1
    outs: dict[str, list] = {}
    for _ in range(4):
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    assert len(outs[first]) >= 3 and late not in outs  # the running request did not wait
    assert outs[doomed][-1].finish_reason == "abort"
    gate.set()
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs[late][-1].token_ids == alone.token_ids and outs[late][-1].timings.frame_decode > 0
    assert outs[first][-1].finished and len(outs[doomed]) == 1
    assert_clean(eng)


def test_synchronous_frame_decoding_gives_the_same_outputs(eva_all, video):
    f, _ = eva_all
    reqs = [(video, q, SamplingParams(max_new_tokens=5), {}) for q in ("a?", "b?")]
    sync, threaded = make_engine(f, frame_workers=0), make_engine(f)
    assert [o.token_ids for o in run(sync, reqs)] == [o.token_ids for o in run(threaded, reqs)]
    with pytest.raises(ValueError, match="frame_workers"):
        EngineConfig(frame_workers=-1)


def test_inline_decodes_use_parallel_readers_background_ones_one(eva_all, video, tmp_path, monkeypatch):
    """A decode on the engine thread (idle engine) may use ``decode_threads`` readers; one in the
    background beside running steps uses one. A long clip decoded either way answers the same."""
    import stllm_engine.video as sv
    from stllm_engine.video import decode as vd

    f, _ = eva_all
    seen = []
    real = sv.load_video

    def spy(*a, **kw):
        seen.append(kw.get("decode_workers", 1))
        return real(*a, **kw)
    monkeypatch.setattr(sv, "load_video", spy)
    from stllm_engine.video import pyav_reader

    monkeypatch.setattr(vd, "min_run_frames", lambda pixels: 4)  # decord's and PyAV's runs split
    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 4)
    containers = []
    real_seeking = pyav_reader.PyAVReader._read_seeking

    def seeking(self, wanted, out, threads):
        containers.append(threads)
        return real_seeking(self, wanted, out, threads)
    monkeypatch.setattr(pyav_reader.PyAVReader, "_read_seeking", seeking)
    long_clip = write_video(tmp_path / "long.mp4", num_frames=120, size=(64, 48), seed=3, gop=10)
    p = SamplingParams(max_new_tokens=4)
    (one,) = run(make_engine(f, decode_threads=1), [(long_clip, Q, p, {})])
    (two,) = run(make_engine(f, decode_threads=3), [(long_clip, Q, p, {})])
    assert seen == [1, 3] and one.token_ids == two.token_ids
    assert containers[0] != 1 and containers[1:] == [1, 1, 1]  # one container, then three runs in parallel
    eng = make_engine(f, decode_threads=3)
    seen.clear()
    run(eng, [(video, Q, p, {}), (long_clip, Q, p, {})])  # the second decodes while the first runs
    assert seen == [3, 1]  # the second came while the first waited to run: background, one reader
    from stllm_engine.engine import engine_config

    assert 1 <= EngineConfig().resolved_decode_threads() <= engine_config.MAX_DEFAULT_DECODE_THREADS
    assert EngineConfig(decode_threads=12).resolved_decode_threads() == 12
    monkeypatch.setattr(engine_config.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert EngineConfig().resolved_decode_threads() == engine_config.MAX_DEFAULT_DECODE_THREADS
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="decode_threads"):
            EngineConfig(decode_threads=bad)


def test_sampling_failure_is_isolated(eva_all):
    from stllm_engine.engine.sequence import Sequence
    f, _ = eva_all
    eng = make_engine(f)
    seqs = [Sequence([5], SamplingParams(temperature=1.0, seed=1)), Sequence([5], SamplingParams(temperature=1.0, seed=2))]
    logits = torch.zeros(2, 16)
    logits[0] = float("nan")
    got = eng._sample(logits, seqs)
    assert isinstance(got[0], Exception) and isinstance(got[1], int) and 0 <= got[1] < 16


@pytest.mark.parametrize("num_beams", [1, 2])
def test_progress_follows_the_phases(folders, video, num_beams):
    """``LLMEngine.progress``: the prompt prefills chunk by chunk (positions computed rise to the
    prompt length), then the generated tokens rise to the output's; None once finished."""
    eng = make_engine(folders("eva", "all"), max_num_batched_tokens=16)
    rid = eng.add_request(video, Q, SamplingParams(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams))
    seen = [eng.progress(rid)]
    final = None
    while final is None:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                final = o
        seen.append(eng.progress(rid))
    assert seen[-1] is None and eng.progress("no-such-request") is None
    assert seen[0]["phase"] in ("video", "prefill")
    phases = [s["phase"] for s in seen[:-1]]
    assert phases == sorted(phases, key=["video", "prefill", "decode"].index)  # in order, never back
    prefill = [s for s in seen[:-1] if s["phase"] == "prefill"]
    assert len(prefill) >= 3  # a 16-position budget prefills the ~70-position prompt in chunks
    assert all(p["total"] == final.num_prompt_tokens for p in prefill)
    done = [p["done"] for p in prefill]
    assert done == sorted(done) and done[-1] < final.num_prompt_tokens and done[-1] > done[0]
    decode = [s for s in seen[:-1] if s["phase"] == "decode"]
    assert decode and all(d["total"] == 6 for d in decode)
    assert [d["done"] for d in decode] == sorted(d["done"] for d in decode) and decode[-1]["done"] <= 6
    assert_clean(eng)


def test_priority_request_preempts_and_finishes_first(eva_all, video):
    f, _ = eva_all
    p = SamplingParams(max_new_tokens=10)
    alone = run(make_engine(f), [(video, Q, p, {}), (video, "urgent?", p, {})])
    eng = make_engine(f, max_num_seqs=1)
    low = eng.add_request(video, Q, p, priority=2)
    outs = {}
    while eng.progress(low) is None or eng.progress(low)["phase"] != "decode":
        for o in eng.step():
            outs[o.request_id] = o
    urgent = eng.add_request(video, "urgent?", p, priority=-1)
    order = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
            if o.finished:
                order.append(o.request_id)
    assert order == [urgent, low] and eng.scheduler.num_preemptions == 1
    assert [outs[low].token_ids, outs[urgent].token_ids] == [o.token_ids for o in alone]
    assert outs[low].num_preemptions == 1
    bad = eng.add_request(video, Q, p, priority="high")
    (o,) = [o for o in eng.step() if o.request_id == bad]
    assert o.finish_reason == "error" and "priority must be an int" in o.error
    assert_clean(eng)
