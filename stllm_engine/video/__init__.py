"""Video input: sample frame indices, decode only those frames, preprocess them as one batch.

``load_video(source, ...) -> VideoFrames``; see :func:`load_video`. Sources: a video file, a GIF,
a folder of frames, raw bytes, or a uint8 array/tensor ``[T, H, W, 3]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .decode import BACKENDS, decode_frames, probe, read_video
from .errors import (CorruptVideoError, EmptyVideoError, NotAVideoError, VideoBoundError, VideoError,
                     VideoNotFoundError)
from .preprocess import CLIP_MEAN, CLIP_STD, PIL_TOLERANCE, preprocess_frames
from .sampling import mvbench_indices, uniform_indices
from .sources import Source, content_hash, hash_beside, memoised_hash, resolve_source

SAMPLINGS = ("uniform", "mvbench")
MVBENCH_GIF_FPS = 25.0  # the release reads GIFs as if they ran at 25 fps
MVBENCH_FOLDER_FPS = 3.0  # ... and frame folders (TVQA frames) at 3 fps, numbered from 1


@dataclass
class VideoFrames:
    """Preprocessed frames of one video.

    ``frames`` float32 [T, 3, size, size] (CLIP-normalised); ``indices`` the 0-based positions of
    those frames in the source (for a folder: in its sorted file list); ``fps`` the source's own
    frame rate (None for folders and arrays unless one was passed); ``num_total_frames`` frames in
    the source; ``content_hash`` sha256 of the source content (cache key); ``backend`` what decoded.
    """

    frames: torch.Tensor
    indices: list[int]
    fps: float | None
    num_total_frames: int
    content_hash: str | None  # None with hash_content=False
    source: str = ""
    backend: str = ""

    def __len__(self) -> int:
        return len(self.indices)


def load_video(source, num_frames: int = 16, sampling: str = "uniform",
               bound: tuple[float, float] | None = None, fps1: bool = False, size: int = 224,
               decode_size=None, *, fps: float | None = None, backend: str = "auto",
               device: torch.device | str | None = None, preprocess: bool = True,
               decode_workers: int = 1, hash_content: bool = True) -> VideoFrames:
    """Load, sample, decode and preprocess one video.

    sampling ``"uniform"``: the chat rule (:func:`uniform_indices`, ``min(total, num_frames)``
    frames). ``"mvbench"``: the MVBench rule (:func:`mvbench_indices`) with ``num_frames``
    segments, or ``fps1=True`` for one frame a second clamped to 4..16; ``bound=(start, end)`` in
    seconds restricts it to a clip. MVBench sampling uses ``fps`` if given, else the release's
    conventions: GIFs at 25 fps, frame folders at 3 fps with 1-based numbering, videos at their
    average rate; arrays need ``fps`` when a bound or fps1 is used.
    ``decode_size``: decode at reduced resolution (int: shorter side; or (W, H)) - e.g. 224 makes
    the preprocessing resize a no-op. ``backend``: ``"auto"`` (decord's index, PyAV's decode
    where its pixels are bit-identical, PyAV fallback), ``"release"`` (decord decodes, as the
    release; PyAV fallback), ``"decord"`` or ``"pyav"`` (:mod:`.decode`). ``device``: where preprocessing runs and ``frames`` lives. ``preprocess=False``
    stops after decoding (``frames`` = uint8 [T, H, W, 3] numpy; :func:`preprocessed` finishes),
    e.g. to decode on a worker thread and run torch's (multi-threaded) preprocessing elsewhere.
    ``decode_workers``: readers (decord's or PyAV's) that may decode runs of the sampled frames starting at
    different keyframes in parallel (:mod:`.segments`; the frames are the same).
    ``hash_content=False`` skips the content hash (``content_hash`` None): the reference's reads,
    as the release hashes nothing.
    Raises a :class:`VideoError` subclass naming the source and the problem.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if sampling == "uniform" and (bound is not None or fps1):
        raise ValueError("bound and fps1 apply to sampling='mvbench' only")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    if isinstance(decode_workers, bool) or not isinstance(decode_workers, int) or decode_workers < 1:
        raise ValueError(f"decode_workers must be a positive int, got {decode_workers!r}")
    src = resolve_source(source)
    digest = hash_beside(src) if hash_content else (lambda: None)  # a large file hashes while it decodes
    first_idx = 1 if src.kind == "folder" else 0

    def choose(total: int, source_fps: float | None) -> list[int]:
        if sampling == "uniform":
            return uniform_indices(total, num_frames)
        rate = fps or (MVBENCH_GIF_FPS if src.is_gif else MVBENCH_FOLDER_FPS if src.kind == "folder"
                       else source_fps)
        if rate is None:
            if bound is not None or fps1:
                raise VideoError(f"{src.name}: has no frame rate; pass fps= for a bound or fps1 sampling")
            rate = 1.0  # without a bound or fps1 the rule does not depend on fps
        picked = mvbench_indices(total, rate, 0 if fps1 else num_frames, bound,
                                 first_idx=first_idx, source=src.name)
        return [i - first_idx for i in picked]

    frames, indices, total, src_fps, used = read_video(src, choose, decode_size, backend, decode_workers)
    out = VideoFrames(frames=frames, indices=indices, fps=fps if fps is not None else src_fps,
                      num_total_frames=total, content_hash=digest(), source=src.name, backend=used)
    return out if not preprocess else preprocessed(out, size, device)


def preprocessed(video: VideoFrames, size: int = 224, device: torch.device | str | None = None) -> VideoFrames:
    """``video`` with its uint8 frames (from ``load_video(..., preprocess=False)``) preprocessed."""
    if isinstance(video.frames, torch.Tensor) and video.frames.is_floating_point():
        return video
    return replace(video, frames=preprocess_frames(video.frames, size, device=device))


__all__ = [
    "load_video", "preprocessed", "VideoFrames", "decode_frames", "probe", "uniform_indices", "mvbench_indices",
    "preprocess_frames", "resolve_source", "content_hash", "memoised_hash", "Source", "CLIP_MEAN", "CLIP_STD",
    "PIL_TOLERANCE", "VideoError", "VideoNotFoundError", "NotAVideoError", "EmptyVideoError",
    "CorruptVideoError", "VideoBoundError",
]
