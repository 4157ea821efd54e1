"""From a video source and a question to the LLM's video tokens, with the vision cache.

frames (``load_video``, or given) -> vision cache or ``model.encode_vision`` -> Q-Former with the
question + projector (``model.encode_video``; ``video_tokens="frames"``: every frame's
``llama_proj`` tokens concatenated whatever the variant, the release's MVBench input) -> optional
inference-time dynamic masking
(keep_ratio: drop a share of video tokens, kept ones keep their order, packed with
``ops.pack_by_mask``). Also builds the prefix-cache identity (``key``) of those tokens.
A video file seen before with the same sampling request is looked up before decoding (its content
hash is memoised per path/size/mtime and the cache remembers the chosen frame indices): on a hit
neither the decoder nor the ViT runs.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from stllm_engine.engine.vision_cache import VisionCache, vision_key

KEEP_MODES = ("even", "random")
VIDEO_TOKENS = ("own", "frames")  # the checkpoint's projector | all frames' tokens (MVBench)


@dataclass
class PreparedVideo:
    tokens: torch.Tensor  # [Lv, H] video tokens for the LLM
    key: str  # prefix-cache identity: content hash, frames, variant, dtype, question, masking
    num_frames: int
    frame_decode_s: float = 0.0
    vision_s: float = 0.0
    qformer_s: float = 0.0
    cache_hit: bool = False  # the ViT was skipped (vision features or video tokens cached)
    tokens_hit: bool = False  # the Q-Former was skipped too (this question's video tokens cached)


def variant_name(config) -> str:
    return f"{'btadapter' if config.vision.btadapter else 'eva'}/{config.video_input}"


def keep_mask(num_tokens: int, keep_ratio: float, mode: str = "even", seed: int = 0) -> torch.Tensor:
    """bool [num_tokens]: which video tokens stay (at least one).

    even: evenly spaced, token floor((i + 0.5) * L / n) for i < n; random: a seeded random subset.
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if mode not in KEEP_MODES:
        raise ValueError(f"keep_mode must be one of {KEEP_MODES}, got {mode!r}")
    n = max(1, min(num_tokens, round(keep_ratio * num_tokens)))
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    if mode == "even":
        idx = [int((i + 0.5) * num_tokens / n) for i in range(n)]
    else:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(num_tokens, generator=g)[:n].tolist()
    mask[idx] = True
    return mask


def _file_source(video):
    """The resolved :class:`~stllm_engine.video.Source` of a video *file* path, else None."""
    import os

    from stllm_engine.video import resolve_source

    if not isinstance(video, (str, os.PathLike)):
        return None
    src = resolve_source(video)
    return src if src.kind == "file" else None


def _plan_request(chash: str, num_frames: int, sampling: str, bound) -> tuple:
    return chash, num_frames, sampling, None if bound is None else tuple(float(b) for b in bound)


def record_plan(cache: VisionCache | None, video, chash: str, num_frames: int, sampling: str, bound,
                indices) -> None:
    """Remember which frames a decode of the video file ``video`` (content ``chash``) chose, so a
    later request with the same sampling finds its features without decoding."""
    if cache is not None and _file_source(video) is not None:
        cache.put_plan(_plan_request(chash, num_frames, sampling, bound), indices)


def _cached_file_features(model, cache: VisionCache | None, video, num_frames: int, sampling: str, bound,
                          peek: bool = False):
    """(indices, features) of a video *file* whose features are cached under a remembered
    sampling plan; (None, None) otherwise. Only files hashed before are looked up (one ``stat``):
    a new file's hash is computed beside its decode (``load_video``), and the vision cache is
    checked again after it."""
    from stllm_engine.video import memoised_hash

    src = _file_source(video) if cache is not None else None
    chash = memoised_hash(src) if src is not None else None
    if chash is None:
        return None, None
    indices = cache.plan(_plan_request(chash, num_frames, sampling, bound))
    if indices is None:
        return None, None
    key = vision_key(chash, indices, variant_name(model.config), model.dtype)
    if key not in cache:
        return None, None
    return (chash, list(indices)), cache.peek(key) if peek else cache.get(key)


def _frames_of(model, video, num_frames: int, sampling: str, bound=None, decode_workers: int = 1):
    """(frames [T,3,S,S], indices, content hash) from any accepted video input."""
    from stllm_engine.video import VideoFrames, load_video

    if isinstance(video, VideoFrames):
        return video.frames, list(video.indices), video.content_hash
    if isinstance(video, torch.Tensor) and video.is_floating_point():
        s = model.config.vision.image_size
        if video.dim() != 4 or tuple(video.shape[1:]) != (3, s, s):
            raise ValueError(f"preprocessed frames must be float [T, 3, {s}, {s}], got {tuple(video.shape)}")
        if video.shape[0] == 0:
            raise ValueError("preprocessed frames must hold at least one frame, got T=0")
        flat = video.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(f"{flat.dtype}:{tuple(video.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy())  # (bytes of any dtype: numpy has no bfloat16)
        return video, list(range(video.shape[0])), "frames:" + digest.hexdigest()
    vf = load_video(video, num_frames=num_frames, sampling=sampling, bound=bound,
                    size=model.config.vision.image_size, decode_workers=decode_workers,
                    device=preprocess_device(model))
    return vf.frames, list(vf.indices), vf.content_hash


@torch.no_grad()
def frame_tokens(model, image_embeds: torch.Tensor, question: str) -> torch.Tensor:
    """Every frame's Q-Former(question) + ``llama_proj`` tokens, concatenated -> [T * Q, H]."""
    states = model.qformer(image_embeds.to(model.device, model.dtype), model.qformer_ids(question))
    out = model.projector.llama_proj(states)
    return out.reshape(-1, out.shape[-1])


def check_prepare_args(model, *, num_frames: int | None = None, keep_ratio: float = 1.0,
                       keep_mode: str = "even", keep_seed: int = 0, video_tokens: str = "own", **_) -> int:
    """Validate :func:`prepare_video`'s options before anything expensive; -> the frame count."""
    if video_tokens not in VIDEO_TOKENS:
        raise ValueError(f"video_tokens must be one of {VIDEO_TOKENS}, got {video_tokens!r}")
    n = model.config.num_frames if num_frames is None else num_frames
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames must be a positive int, got {n!r}")
    keep_mask(1, keep_ratio, keep_mode)  # checks both, whatever the ratio
    if isinstance(keep_seed, bool) or not isinstance(keep_seed, int):
        raise ValueError(f"keep_seed must be an int, got {keep_seed!r}")
    return n


def needs_decoding(video) -> bool:
    """True for sources ``load_video`` must decode (files, bytes, folders, uint8 arrays); False for
    already preprocessed frames (``VideoFrames``, float tensors)."""
    from stllm_engine.video import VideoFrames

    return not isinstance(video, VideoFrames) and not (isinstance(video, torch.Tensor) and video.is_floating_point())


def plan_hit(model, cache: VisionCache | None, video, num_frames: int, sampling: str = "uniform",
             bound=None) -> bool:
    """Whether the features of ``video`` are cached under a remembered sampling plan; never
    decodes or hashes a new file. ``num_frames`` as resolved by :func:`check_prepare_args`."""
    return _cached_file_features(model, cache, video, num_frames, sampling, bound, peek=True)[1] is not None


def decode_video(model, video, num_frames: int, sampling: str = "uniform", bound=None):
    """Decode ``num_frames`` (resolved by :func:`check_prepare_args`) without torch preprocessing
    (``frames`` stay uint8): the part that runs on a frame worker thread, so no second OpenMP team
    of torch ops runs beside the engine thread's model passes; :func:`finish_frames`
    preprocesses on the engine thread."""
    from stllm_engine.video import load_video

    return load_video(video, num_frames=num_frames, sampling=sampling, bound=bound,
                      size=model.config.vision.image_size, preprocess=False)


def preprocess_device(model) -> torch.device | None:
    """Where a video's frames are preprocessed: on the model's GPU (the uint8 frames go up and are
    resized there; 16 frames of 1280x720 on an H100 host: 5.9 ms against 18.4 ms on 16 CPU
    threads, ``benchmarks/frames.py``), else on the CPU (None)."""
    return model.device if model.device.type == "cuda" else None


def finish_frames(model, frames):
    """Preprocess the uint8 frames of :func:`decode_video` at the model's image size (on
    :func:`preprocess_device`)."""
    from stllm_engine.video import preprocessed

    return preprocessed(frames, model.config.vision.image_size, device=preprocess_device(model))


def _synced(model) -> float:
    """perf_counter once the model's GPU work so far has finished (stage timings on CUDA measure
    the kernels, not their asynchronous launches; the next stage waits on them anyway)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


def prepare_video(model, cache: VisionCache | None, video, question: str, *, num_frames: int | None = None,
                  keep_ratio: float = 1.0, keep_mode: str = "even", keep_seed: int = 0,
                  sampling: str = "uniform", bound=None, video_tokens: str = "own",
                  decode_workers: int = 1, graphs=None) -> PreparedVideo:
    """Video tokens [Lv, H] and their prefix-cache key for ``question`` (see the module doc).

    ``bound``: (start, end) seconds for MVBench sampling (ignored for given frame tensors);
    ``decode_workers``: parallel decord readers for a video file (see ``load_video``); ``graphs``:
    a :class:`~stllm_engine.engine.video_graphs.VideoGraphs` of the model (CUDA) that runs its ViT
    and Q-Former passes, or None (eager)."""
    cfg = model.config
    n = check_prepare_args(model, num_frames=num_frames, keep_ratio=keep_ratio, keep_mode=keep_mode,
                           keep_seed=keep_seed, video_tokens=video_tokens)
    if (num_frames is not None and isinstance(video, torch.Tensor) and video.is_floating_point()
            and video.dim() == 4 and video.shape[0] != num_frames):  # (as the reference refuses it)
        raise ValueError(f"preprocessed frames tensor has {video.shape[0]} frames but num_frames={num_frames}: "
                         "its frames are used as given (leave num_frames out, or sample them first)")
    t0 = time.perf_counter()
    found, embeds = _cached_file_features(model, cache, video, n, sampling, bound)
    if embeds is not None:
        cache.decodes_skipped += 1
        chash, indices = found
    else:
        frames, indices, chash = _frames_of(model, video, n, sampling, bound, decode_workers)
        record_plan(cache, video, chash, n, sampling, bound, indices)
    if cfg.vision.btadapter and len(indices) > cfg.vision.btadapter_max_frames:
        raise ValueError(f"the BT-Adapter handles at most {cfg.vision.btadapter_max_frames} frames, "
                         f"got {len(indices)}")
    t1 = _synced(model)
    variant = variant_name(cfg)
    key = vision_key(chash, indices, variant, model.dtype)
    memo = (key, question, video_tokens)  # the Q-Former's output for this question
    tokens = cache.get_tokens(memo) if cache is not None else None
    if tokens is None and embeds is None and cache is not None:
        embeds = cache.get(key)
    elif tokens is not None and embeds is None:
        cache.count_hit()  # the ViT is skipped all the same (as a file's cached features count)
    hit = embeds is not None or tokens is not None
    if tokens is None and embeds is None:
        embeds = (graphs or model).encode_vision(frames)
        if cache is not None:
            cache.put(key, embeds)
    t2 = _synced(model)
    tokens_hit = tokens is not None
    if not tokens_hit:
        if video_tokens == "own":
            tokens = (graphs or model).encode_video(embeds, question)
        else:
            tokens = frame_tokens(model, embeds, question)
        if cache is not None:
            cache.put_tokens(memo, tokens)
    t3 = _synced(model)
    # (a JSON list: a question holding "|keep=..." or the like cannot spell another request's key)
    ident: list = ["video", chash, [int(i) for i in indices], variant, str(model.dtype), question]
    if video_tokens != "own":
        ident.append(["tokens", video_tokens])
    if keep_ratio != 1.0:
        from stllm_engine.ops import pack_by_mask

        mask = keep_mask(tokens.shape[0], keep_ratio, keep_mode, keep_seed).to(tokens.device)
        tokens = pack_by_mask(tokens[None], mask[None])[0]
        ident.append(["keep", float(keep_ratio), keep_mode] + ([int(keep_seed)] if keep_mode == "random" else []))
    return PreparedVideo(tokens=tokens, key=json.dumps(ident, ensure_ascii=False), num_frames=len(indices),
                         frame_decode_s=t1 - t0, vision_s=t2 - t1, qformer_s=t3 - t2, cache_hit=hit,
                         tokens_hit=tokens_hit)
