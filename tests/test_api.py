"""Public API: STLLM.from_pretrained / answer / generate / stream / chat / keep_ratio, the async
engine, and the light package import. Tiny checkpoint, real encoded video."""
import asyncio
import subprocess
import sys

import pytest
import torch

from stllm_engine import STLLM, RequestFailedError, SamplingParams
from stllm_engine.engine.async_engine import AsyncLLMEngine
from stllm_engine.engine.llm_engine import kv_bytes_per_block
from stllm_engine.engine.video_prep import keep_mask
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_video
from stllm_engine.video import VideoNotFoundError

Q = "what is moving in the video?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), vit="eva", video_input="all")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=20, size=(96, 72))


@pytest.fixture(scope="module")
def llm(folder):
    return STLLM.from_pretrained(folder, dtype="float32", block_size=8, kv_cache_memory=1 << 20)


def test_import_is_light():
    code = "import sys, stllm_engine; from stllm_engine import SamplingParams; SamplingParams(); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kv_pool_sized_from_memory(llm):
    per_block = kv_bytes_per_block(llm.engine.model, 8)
    c = llm.engine.model.config.llm
    assert per_block == 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4
    assert llm.engine.block_manager.num_blocks == (1 << 20) // per_block
    assert llm.engine.model.kv_cache.shape[2] == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("num_beams", [1, 2])
def test_answer_equals_reference_answer(folder, llm, video, num_beams):
    ref = ReferenceSTLLM.from_pretrained(folder)
    want = ref.answer(video, Q, max_new_tokens=10, num_beams=num_beams)
    got = llm.answer(video, Q, max_new_tokens=10, num_beams=num_beams)
    assert got == want
    assert llm.last_output.finished and llm.last_output.timings.total > 0


def test_answer_parameter_errors(llm, video):
    with pytest.raises(TypeError, match="unknown generation parameters"):
        llm.answer(video, Q, beams=3)
    with pytest.raises(ValueError, match="top_p"):
        llm.answer(video, Q, top_p=2.0)
    with pytest.raises(RequestFailedError, match="failed: video not found") as info:
        llm.answer("/no/such/video.mp4", Q)
    # a RuntimeError as before, with the output and the typed cause for callers that branch on it
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, VideoNotFoundError)
    assert info.value.output.finish_reason == "error" and "/no/such/video.mp4" in info.value.output.error
    with pytest.raises(RequestFailedError) as info:
        list(llm.stream(video, Q, num_frames=4, keep_ratio=0.0))
    assert isinstance(info.value.__cause__, ValueError) and "keep_ratio" in str(info.value)


def test_generate_keeps_request_order_and_isolates_errors(llm, video):
    reqs = [(video, Q), {"video": "/no/such.mp4", "question": Q},
            {"video": video, "question": "colors?", "params": llm.params(max_new_tokens=3)},
            {"video": video, "question": Q, "keep_ratio": 0.5}]
    outs = llm.generate(reqs, llm.params(max_new_tokens=5))
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=lambda r: int(r.split("-")[1]))
    assert outs[1].error and "no/such.mp4" in outs[1].error
    assert len(outs[0].token_ids) == 5 and len(outs[2].token_ids) == 3
    assert outs[3].num_prompt_tokens == outs[0].num_prompt_tokens - 24  # half of 48 video tokens
    for o in (outs[0], outs[2], outs[3]):
        assert o.error is None and o.timings.ttft > 0
    with pytest.raises(ValueError, match="unknown keys"):
        llm.generate([{"video": video, "question": Q, "colour": 1}])


def test_stream_pieces_join_to_the_text(llm, video):
    full_pieces = list(llm.stream(video, Q, max_new_tokens=12))
    full = llm.last_output
    assert "".join(full_pieces) == full.text and full.finish_reason == "length" and len(full_pieces) > 2
    stop = next(ch for ch in full.text[3:] if ch.isalpha())  # a letter the answer really contains
    pieces = list(llm.stream(video, Q, max_new_tokens=12, stop=[stop]))
    out = llm.last_output
    assert out.finish_reason == "stop" and "".join(pieces) == out.text
    assert out.text == full.text[:full.text.index(stop)]
    with pytest.raises(ValueError, match="beam"):
        list(llm.stream(video, Q, num_beams=2))


def test_leaving_a_stream_early_aborts_it(llm, video):
    """break / close() on ``stream`` aborts the request: its blocks are freed and the next call
    does not run it in the background."""
    g = llm.stream(video, Q, max_new_tokens=20, min_new_tokens=20)
    next(g)
    assert llm.engine.stats()["running"] == 1
    g.close()
    assert llm.engine.stats()["running"] == 0 and llm.engine.block_manager.stats()["used_blocks"] == 0
    llm.answer(video, Q, max_new_tokens=2)
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats()["requests"]["requests_finished"].get("abort", 0) >= 1


@pytest.mark.parametrize("bad", [{"video": "v", "question": Q, "colour": 1}, {"video": "v"}, ("v",), "v.mp4"])
def test_generate_with_a_bad_item_queues_nothing(llm, video, bad):
    with pytest.raises(ValueError, match="request 2"):
        llm.generate([(video, Q), {"video": video, "question": "b?"}, bad], llm.params(max_new_tokens=3))
    assert not llm.engine._requests and not llm.engine.scheduler.has_work()
    with pytest.raises(ValueError, match="MVBench item 1"):
        llm.mvbench_generate([(video, Q, ["a", "b"]), (video, Q)])
    assert not llm.engine._requests and not llm.engine.scheduler.has_work()


@pytest.mark.parametrize("kw,match", [
    (dict(keep_mode="bogus"), "keep_mode"), (dict(keep_ratio=True), "keep_ratio"),
    (dict(keep_seed="x", keep_mode="random", keep_ratio=0.5), "keep_seed"), (dict(system=5), "system must be a str"),
])
def test_request_options_are_checked_whatever_the_others(llm, video, kw, match):
    with pytest.raises(RequestFailedError, match=match):
        llm.answer(video, Q, max_new_tokens=2, **kw)


@pytest.mark.parametrize("video_kw,question,cause", [
    (dict(), None, TypeError), (dict(num_frames=0), Q, ValueError), (dict(keep_ratio=2.0), Q, ValueError)])
def test_chat_turn_errors_raise_request_failed(llm, video, video_kw, question, cause):
    with pytest.raises(RequestFailedError) as info:
        llm.chat(video, **video_kw).ask(question, max_new_tokens=2)
    assert isinstance(info.value.__cause__, cause) and info.value.output.finish_reason == "error"
    with pytest.raises(RequestFailedError, match="video not found"):
        llm.chat("/no/such/clip.mp4").ask(Q)


def test_beam_search_stop_string_is_cut_and_reported(llm, video):
    full = llm.generate([(video, Q)], llm.params(max_new_tokens=12, num_beams=2, stop=[]))[0]
    stop = full.text[4:6]
    assert len(stop) == 2 and stop.isprintable()
    answer = llm.answer(video, Q, max_new_tokens=12, num_beams=2, stop=[stop])
    out = llm.last_output
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)] and stop not in answer


@pytest.mark.parametrize("min_new", [1, 4])
def test_beam_search_ends_at_the_first_stop_its_best_beam_completes(llm, video, min_new):
    """The search stops on the top candidate's stop strings, so its best beam may run past one of
    its own, or stop on one that stood below min_new_tokens: the output ends at the first token
    (from min_new_tokens on) that completes a stop string, and answer() agrees with its text."""
    full = llm.generate([(video, Q)], llm.params(max_new_tokens=12, num_beams=2, stop=[]))[0]
    tok = llm.tokenizer
    stop = full.text[4:5]
    answer = llm.answer(video, Q, max_new_tokens=12, num_beams=2, stop=[stop], min_new_tokens=min_new)
    out = llm.last_output
    assert out.finish_reason == "stop" and out.stop_reason == stop
    ids = out.token_ids
    before = len(tok.decode(ids[:-1], skip_special_tokens=True))
    assert len(ids) >= min_new and out.text.find(stop, max(0, before - len(stop) + 1)) == -1
    assert tok.decode(ids, skip_special_tokens=True).find(stop, max(0, before - len(stop) + 1)) == len(out.text)
    assert answer == out.text.strip()


def test_chat_reuses_the_kv_prefix(llm, video):
    s = llm.chat(video)
    a1 = s.ask(Q, max_new_tokens=6)
    hits_before = llm.engine.block_manager.stats()["prefix_hit_tokens"]
    a2 = s.ask("and then?", max_new_tokens=6)
    second = s.outputs[1]
    assert isinstance(a1, str) and isinstance(a2, str)
    assert second.num_cached_tokens >= 48  # at least the video tokens came from the cache
    assert llm.engine.block_manager.stats()["prefix_hit_tokens"] - hits_before == second.num_cached_tokens
    assert s.prompt_text("x").count("###Human: ") == 3 and a1 in s.prompt_text("x")
    llm.engine.block_manager.check()


@pytest.mark.parametrize("L,ratio", [(1, 0.3), (7, 0.5), (48, 0.25), (48, 1.0), (10, 0.99)])
def test_keep_mask_even_and_random(L, ratio):
    m = keep_mask(L, ratio)
    n = max(1, round(ratio * L))
    assert m.sum() == n
    idx = m.nonzero().flatten()
    if n > 1:
        gaps = idx[1:] - idx[:-1]
        assert gaps.max() - gaps.min() <= 1  # evenly spaced
    r1, r2 = keep_mask(L, ratio, "random", seed=3), keep_mask(L, ratio, "random", seed=3)
    assert torch.equal(r1, r2) and r1.sum() == n
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_mask(L, 0.0)
    with pytest.raises(ValueError, match="keep_mode"):
        keep_mask(L, 0.5, "middle")


def test_from_pretrained_selects_the_mean_input(folder, video):
    """``video_input="mean"`` (the paper's baseline, no checkpoint of its own) on an ``all``
    folder: the reference's mean answer, 32 video tokens."""
    mean = STLLM.from_pretrained(folder, dtype="float32", video_input="mean")
    assert mean.engine.model.config.video_input == "mean"
    ref = ReferenceSTLLM.from_pretrained(folder, video_input="mean")
    assert mean.answer(video, Q, max_new_tokens=8) == ref.answer(video, Q, max_new_tokens=8)
    assert mean.last_output.num_prompt_tokens == ref.config.qformer.num_query_tokens + len(
        mean.engine.prompt_ids(Q))
    with pytest.raises(ValueError, match="video_input"):
        STLLM.from_pretrained(folder, video_input="median")


def test_keep_ratio_changes_the_video_tokens(llm, video):
    base = llm.generate([(video, Q)], llm.params(max_new_tokens=4))[0]
    outs = llm.generate([{"video": video, "question": Q, "keep_ratio": 0.5},
                         {"video": video, "question": Q, "keep_ratio": 0.5, "keep_mode": "random", "keep_seed": 1}],
                        llm.params(max_new_tokens=4))
    # asked again once the first has finished (in one batch the two could be prefilled in the
    # same step, before either's blocks are cached: whether they were depended on timing)
    outs += llm.generate([{"video": video, "question": Q, "keep_ratio": 0.5}], llm.params(max_new_tokens=4))
    assert outs[0].token_ids == outs[2].token_ids
    assert outs[2].num_cached_tokens > 0  # same masked video: prefix shared
    assert all(o.num_prompt_tokens == base.num_prompt_tokens - 24 for o in outs)


def test_a_question_cannot_spell_another_requests_prefix_cache_key(folder, video):
    """Edge audit: the video tokens' prefix-cache identity was the string
    "<hash>|<frames>|<variant>|<dtype>|q=<question>[|keep=...][|cut=n]", so the question
    Q + "|keep=0.5:even" had the key of Q with keep_ratio=0.5 (and Q + "|cut=3" that of Q cut by
    3 video tokens) and reused KV blocks of other video tokens. Now the key is a JSON list."""
    from stllm_engine.engine.request import truncate_left

    crafted = Q + "|keep=0.5:even"
    fresh = STLLM.from_pretrained(folder, dtype="float32", block_size=8, kv_cache_memory=1 << 20)
    want = fresh.generate([(video, crafted)], SamplingParams(max_new_tokens=8, stop=[]))[0].token_ids
    llm = STLLM.from_pretrained(folder, dtype="float32", block_size=8, kv_cache_memory=1 << 20)
    llm.answer(video, Q, keep_ratio=0.5, max_new_tokens=8, stop=[])
    out = llm.generate([(video, crafted)], SamplingParams(max_new_tokens=8, stop=[]))[0]
    assert out.token_ids == want and out.num_cached_tokens < len(llm.engine.prompt_ids(crafted))
    eng = llm.engine
    keys = {eng.prepare_video(video, q, keep_ratio=r).key for q, r in ((Q, 0.5), (crafted, 1.0), (Q + "|cut=3", 1.0))}
    pv = eng.prepare_video(video, Q)
    keys.add(truncate_left(pv.tokens, pv.key, [1, 2, 3], 1, 3)[1])
    assert len(keys) == 4


def test_the_stop_string_is_not_spelled_across_a_special_token(folder, llm, video):
    """Edge audit: stop strings were matched only in the text with special tokens skipped, so
    "##" <s> "#" read "###" and ended the answer at '##<s>#', where the release (and the
    reference), cutting the text with special tokens kept, go on and answer '##<s>'."""
    tok = llm.tokenizer
    bias = {tok.convert_tokens_to_ids("##"): 100.0, 1: 90.0, tok.convert_tokens_to_ids("#"): 80.0}
    ref = ReferenceSTLLM.from_pretrained(folder)
    want = ref.generate_ids(video, Q, max_new_tokens=8, sequence_bias=bias)
    assert ref.decode_answer(want.token_ids) == "##<s>" and want.token_ids[:3] == [*bias][:3]
    assert llm.answer(video, Q, max_new_tokens=8, logit_bias=bias) == "##<s>"
    assert llm.last_output.stop_reason == "###" and len(llm.last_output.token_ids) == 4  # "##<s>#" + "##"
    llm.answer(video, Q, max_new_tokens=8, logit_bias=bias, stop=[])
    assert llm.last_output.token_ids == want.token_ids


def test_async_engine_refuses_a_live_id_without_losing_its_request(llm, video):
    """A second add_request with a live id replaced the first one's output queue, then removed
    it: the first stream waited forever. Now the second call fails and the first finishes."""
    p = SamplingParams(max_new_tokens=6)
    (want,) = llm.generate([(video, "a?")], p)

    async def main():
        eng = AsyncLLMEngine(llm.engine)
        rid = await eng.add_request(video, "a?", p, request_id="job-1")
        with pytest.raises(ValueError, match="already in use"):
            await eng.add_request(video, "b?", p, request_id="job-1")
        outs = [o async for o in eng.stream(rid)]
        await eng.close()
        return outs[-1]

    last = asyncio.run(asyncio.wait_for(main(), 60))
    assert last.finished and last.token_ids == want.token_ids


def test_async_engine_streams_concurrent_requests(llm, video):
    p = SamplingParams(max_new_tokens=6)
    want = {q: o.token_ids for q, o in zip(("a?", "b?"), llm.generate([(video, "a?"), (video, "b?")], p))}

    async def main():
        eng = AsyncLLMEngine(llm.engine)

        async def one(q):
            outs = [o async for o in eng.generate(video, q, p)]
            assert outs[-1].finished and all(not o.finished for o in outs[:-1])
            assert "".join(o.delta for o in outs) == outs[-1].text
            return outs[-1]

        res = await asyncio.gather(one("a?"), one("b?"))
        rid = await eng.add_request(video, "c?", SamplingParams(max_new_tokens=50))
        async for o in eng.stream(rid):
            break  # consumer leaves early: the request is aborted
        await asyncio.sleep(0.05)
        await eng.close()
        return res

    res = asyncio.run(main())
    assert [r.token_ids for r in res] == [want["a?"], want["b?"]]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.engine.block_manager.check()
    assert llm.engine.block_manager.stats()["used_blocks"] == 0


def test_async_engine_holds_one_output_of_an_unread_request_and_drops_an_aborted_one(llm, video):
    """Soak audit: a request added and never streamed kept every step's output in its queue
    (each copying all ids so far), and abort() left the queue for good. Now an unread request
    holds its latest output (deltas joined, so a late stream still reads the whole text) and
    abort() of a request nobody streams drops it."""
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    (want,) = llm.generate([(video, "a?")], p)

    async def main():
        eng = AsyncLLMEngine(llm.engine)
        rid = await eng.add_request(video, "a?", p)
        gone = await eng.add_request(video, "b?", SamplingParams(max_new_tokens=50, ignore_eos=True))
        while llm.engine.has_unfinished_requests() and len(llm.engine._requests) > 1:
            await asyncio.sleep(0.01)
        await eng.abort(gone)
        held = {k: q.qsize() for k, q in eng._queues.items()}
        reading = eng.stream(rid)
        first = await reading.__anext__()
        with pytest.raises(RuntimeError, match="already being streamed"):
            await eng.stream(rid).__anext__()
        outs = [first] + [o async for o in reading]
        with pytest.raises(KeyError, match="unknown request id"):
            [o async for o in eng.stream(gone)]
        left = dict(eng._queues)
        await eng.close()
        return rid, held, outs, left

    rid, held, outs, left = asyncio.run(asyncio.wait_for(main(), 60))
    assert held == {rid: 1} and len(outs) == 1  # only the unread request, one output
    assert outs[0].finished and outs[0].token_ids == want.token_ids
    assert outs[0].delta == outs[0].text == want.text
    assert left == {}
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.engine.block_manager.stats()["used_blocks"] == 0


def test_async_engine_abort_still_ends_a_stream_reading_it(llm, video):
    """abort() of a request that a stream() is reading keeps its queue: the stream ends with the
    abort output instead of waiting forever."""
    async def main():
        eng = AsyncLLMEngine(llm.engine)
        rid = await eng.add_request(video, "a?", SamplingParams(max_new_tokens=200, ignore_eos=True))
        outs = []
        async for o in eng.stream(rid):
            outs.append(o)
            if len(outs) == 2:
                await eng.abort(rid)
        await eng.close()
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 200


def test_answer_with_beams_is_the_releases_answer(tmp_path):
    """Beams through the release defaults end on the release's "###" ids only: the default "###"
    stop string (a substring anywhere in the top beam's text) finished a beam the release kept
    going and chose another best beam ("chi" where the release answered "chilf\ufffdphossreen").
    Greedy keeps the stop string (same answer, fewer tokens)."""
    from stllm_engine.video import load_video

    folder = write_tiny_checkpoint(tmp_path / "ckpt", vit="btadapter", video_input="residual", seed=1)
    clip = write_video(tmp_path / "clip.mp4", num_frames=20, size=(96, 72), seed=1)
    ref = ReferenceSTLLM.from_pretrained(folder)
    frames = load_video(clip, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames
    q, bias = "which color is the square?", {340: 2.0, 38: 0.0, 327: 0.0}
    want = ref.generate_from_embeds(ref.chat_inputs_embeds(ref.encode_video(frames, q), q), num_beams=3,
                                    max_new_tokens=12, min_length=1, repetition_penalty=1.5, sequence_bias=bias)
    llm = STLLM.from_pretrained(folder, dtype="float32")
    answer = llm.answer(frames, q, num_beams=3, max_new_tokens=12, repetition_penalty=1.5, logit_bias=bias)
    assert llm.last_output.token_ids == want.token_ids
    assert answer == ref.decode_answer(want.token_ids)
    assert llm.params(num_beams=3).stop == [] and llm.params().stop == ["###"]
    assert llm.params(num_beams=3, stop=["x"]).stop == ["x"]


def test_a_frames_tensor_with_another_num_frames_is_refused(llm, video):
    """Preprocessed frames are used as given; a num_frames that disagrees ran all of them (100
    frames for num_frames=16: a prompt six times longer, no word said). The reference refuses it."""
    from stllm_engine.video import load_video

    frames = load_video(video, num_frames=6, size=llm.engine.model.config.vision.image_size).frames
    with pytest.raises(RequestFailedError, match="has 6 frames but num_frames=4"):
        llm.answer(frames, Q, num_frames=4, max_new_tokens=2)
    assert llm.answer(frames, Q, num_frames=6, max_new_tokens=2) == llm.answer(frames, Q, max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_frames_tensor_of_any_float_dtype_answers_as_its_float32_copy(llm, video, dtype):
    """Edge audit: a bfloat16 frames tensor failed the request ("Got unsupported ScalarType
    BFloat16": its content hash went through numpy); the reference casts it and answers. The hash
    also names dtype and shape now, so equal bits of two dtypes are two videos."""
    from stllm_engine.video import load_video

    frames = load_video(video, num_frames=4, size=llm.engine.model.config.vision.image_size).frames.to(dtype)
    got = llm.generate([(frames, Q)], SamplingParams(max_new_tokens=4, stop=[]))[0]
    want = llm.generate([(frames.float(), Q)], SamplingParams(max_new_tokens=4, stop=[]))[0]
    assert got.ok and got.token_ids == want.token_ids
    if dtype == torch.bfloat16:  # same bits read as float16: another video, not a cache hit
        as_half = llm.engine.prepare_video(frames.view(torch.float16), Q)
        assert as_half.key != llm.engine.prepare_video(frames, Q).key


def test_an_empty_frames_tensor_is_refused_by_name(llm):
    s = llm.engine.model.config.vision.image_size
    with pytest.raises(RequestFailedError, match="at least one frame, got T=0"):
        llm.answer(torch.zeros(0, 3, s, s), Q, max_new_tokens=2)
