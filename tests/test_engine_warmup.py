"""Warm-up at load (``stllm_engine/engine/warmup.py``): it runs the engine's real paths (packed
prefill, then a prefix-cache hit's paged prefill), leaves no trace in caches or counters, changes
no later answer, refuses a busy engine and fails loudly when the engine cannot serve."""
import pytest
import torch

from stllm_engine.engine.engine_config import EngineConfig
from stllm_engine.engine.warmup import warm_up, warmup_video
from stllm_engine.sampling_params import SamplingParams
from test_engine import Q, assert_clean, make_engine, run, video  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def folder(folders):
    return folders("eva", "all")


def test_default_is_cuda_only():
    cfg = EngineConfig()
    assert cfg.resolved_warmup(torch.device("cuda")) and not cfg.resolved_warmup(torch.device("cpu"))
    assert EngineConfig(warmup=True).resolved_warmup(torch.device("cpu"))
    assert not EngineConfig(warmup=False).resolved_warmup(torch.device("cuda"))
    with pytest.raises(ValueError, match="warmup must be a bool or None"):
        EngineConfig(warmup="yes")


def test_cpu_engine_skips_it_by_default(folder):
    assert make_engine(folder).warmup_s is None


def test_warmup_runs_its_paths_then_leaves_no_trace(folder, video, monkeypatch):
    seen, outs = {}, {}
    from stllm_engine.engine.llm_engine import LLMEngine

    reset, step = LLMEngine.reset_state, LLMEngine.step

    def spy(self):
        if hasattr(self, "block_manager"):  # the reset after the warm-up requests
            seen.update(kv=self.block_manager.stats(), vision=self.vision_cache.stats())
        reset(self)

    def record(self):
        got = step(self)
        outs.update({o.request_id: o for o in got if o.finished})
        return got
    monkeypatch.setattr(LLMEngine, "reset_state", spy)
    monkeypatch.setattr(LLMEngine, "step", record)
    warm = make_engine(folder, warmup=True)
    assert warm.warmup_s is not None and warm.warmup_s > 0
    assert set(outs) == {"warmup-0", "warmup-1", "warmup-2"} and all(o.error is None for o in outs.values())
    first, again, follow = outs["warmup-0"], outs["warmup-1"], outs["warmup-2"]
    # the repeat reused the first request's KV but for a tail shorter than a block (8 positions)
    assert first.num_cached_tokens == 0 and 0 < again.num_prompt_tokens - again.num_cached_tokens <= 8
    # the follow-up took the first prompt's full blocks from the cache and prefilled > 8 new tokens
    assert follow.num_cached_tokens == again.num_cached_tokens
    assert follow.num_prompt_tokens - follow.num_cached_tokens > 8
    assert seen["kv"]["prefix_hit_tokens"] == again.num_cached_tokens + follow.num_cached_tokens
    assert seen["vision"]["token_hits"] == 2  # the repeat's and the follow-up's video tokens
    s = warm.stats()
    assert s["kv"]["prefix_hit_tokens"] == 0 and s["kv"]["prefix_queried_blocks"] == 0
    assert s["vision_cache"] == dict(s["vision_cache"], hits=0, misses=0, entries=0, bytes=0)
    assert_clean(warm)
    cold = make_engine(folder)
    p = SamplingParams(max_new_tokens=8)
    (a,) = run(warm, [(video, Q, p, {})])
    (b,) = run(cold, [(video, Q, p, {})])
    assert a.request_id == b.request_id == "req-0"  # warm-up ids do not shift the user's
    assert a.token_ids == b.token_ids and a.num_cached_tokens == 0


def test_refuses_a_busy_engine(folder, video):
    eng = make_engine(folder)
    eng.add_request(video, Q, SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(eng)
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.reset_state()


def test_a_failing_model_fails_the_load(folder, monkeypatch):
    from stllm_engine.engine.model_runner import ModelRunner

    def broken(self, batch):
        raise RuntimeError("kernel launch failed")
    monkeypatch.setattr(ModelRunner, "run", broken)
    with pytest.raises(RuntimeError, match="engine warm-up request failed: .*kernel launch failed"):
        make_engine(folder, warmup=True)


def test_warmup_video_matches_the_model(folder):
    eng = make_engine(folder)
    v = warmup_video(eng.model)
    c = eng.model.config
    assert v.dtype.name == "uint8" and v.shape == (c.num_frames, c.vision.image_size, c.vision.image_size, 3)


def test_a_small_kv_pool_warms_up_on_fewer_frames(folder):
    """A pool too small for the model's frames of video tokens (room for 2 frames beside the
    prompt) still warms up, on the frames that fit, instead of failing the load."""
    from stllm_engine.engine.warmup import PROMPT_ROOM, warmup_frames

    big = make_engine(folder)
    c = big.model.config
    assert warmup_frames(big) == c.num_frames > 2
    blocks = -(-(PROMPT_ROOM + 2 * c.tokens_per_frame) // 8)  # 8: make_engine's block size
    small = make_engine(folder, num_kv_blocks=blocks, warmup=True)
    assert warmup_frames(small) == 2
    assert small.warmup_s is not None and small.stats()["kv"]["used_blocks"] == 0
