"""Warm-up at load: pay first-use costs before the first user request does.

On CUDA the first call of every Triton kernel configuration compiles it (or loads it from Triton's
disk cache), and cuBLAS/cuDNN pick and set up their kernels; an H100 engine's first request after
start took seconds instead of ~0.1 s. :func:`warm_up` runs three short synthetic requests through
the engine's own step loop - a question about a noise video (frame preprocessing on the model's
device, ViT, Q-Former, packed prefill, decode), the same question again (a prefix-cache hit: the
paged prefill of a tail shorter than a block) and a chat-style follow-up (the first prompt's KV
from the cache, then a paged prefill of a few dozen new tokens: on the H100 the first follow-ups
of a process took 56-85 ms against ~20 ms later, the warm-up having covered only the short tail)
- and then forgets them: the KV pool's prefix index, the vision cache and every counter start
empty, so ``stats()`` and the first user's results are as if the engine had just been built.
CUDA-graph decode capture happens earlier, at construction; the fresh-prefill graphs of every
token bucket are captured here, first (``prefill_graphs.py``).
"""
from __future__ import annotations

import time

import numpy as np

from stllm_engine.sampling_params import SamplingParams

WARMUP_QUESTION = "What happens in the video?"
FOLLOW_UP = " And what happens after that, in the last part of the clip, and in which order?"
WARMUP_TOKENS = 2
PROMPT_ROOM = 192  # KV positions kept for the chat prompt's text, the follow-up and the new tokens


def warmup_frames(engine) -> int:
    """The model's frame count, or fewer when a small KV pool (or max length) cannot hold that
    many frames' video tokens: the kernels compiled do not depend on the frame count."""
    cfg = engine.model.config
    room = min(engine.num_kv_blocks * engine.config.block_size, engine.max_length) - PROMPT_ROOM
    return max(1, min(cfg.num_frames, room // cfg.tokens_per_frame))


def warmup_video(model, frames: int | None = None, seed: int = 0) -> np.ndarray:
    """uint8 noise frames [T, S, S, 3] at the model's image size (T: the model's frame count)."""
    s, t = model.config.vision.image_size, frames or model.config.num_frames
    return np.random.default_rng(seed).integers(0, 256, (t, s, s, 3), dtype=np.uint8)


def warm_up(engine) -> float:
    """Run the warm-up requests on an idle ``engine`` and reset its caches and counters; returns
    the seconds it took. Raises if a warm-up request fails (the engine cannot serve either)."""
    if engine.has_unfinished_requests():
        raise RuntimeError("warm_up needs an idle engine (requests are running)")
    t = time.perf_counter()
    if engine.runner.prefill_graphs is not None:  # CUDA: every fresh-prefill bucket, before the requests
        engine.runner.prefill_graphs.capture_all()
    n = warmup_frames(engine)
    video = warmup_video(engine.model, n)
    params = SamplingParams(max_new_tokens=WARMUP_TOKENS, min_new_tokens=WARMUP_TOKENS, stop=[])
    for i in range(2):  # the second request hits the first one's cached prefix
        _finish(engine, engine.add_request(video, WARMUP_QUESTION, params, request_id=f"warmup-{i}",
                                           num_frames=n))
    # the follow-up: the same video tokens (vision cache hit) and prompt, then more text
    pv = engine.prepare_video(video, WARMUP_QUESTION, num_frames=n)
    ids = engine.prompt_ids(WARMUP_QUESTION)
    ids += list(engine.tokenizer(FOLLOW_UP, add_special_tokens=False).input_ids)
    _finish(engine, engine.add_prepared(pv.tokens, pv.key, ids, params, request_id="warmup-2"))
    engine.reset_state()
    return time.perf_counter() - t


def _finish(engine, rid: str) -> None:
    """Step the engine until request ``rid`` ends; raise if it failed."""
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    if final is None or final.error is not None:
        raise RuntimeError(f"engine warm-up request failed: {final.error if final else 'no output'}")
