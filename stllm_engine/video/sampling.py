"""Frame-index sampling rules of the ST-LLM release, reproduced exactly.

Both rules round with Python's ``round`` (half to even, as ``np.round`` in the release).
"""
from __future__ import annotations

import math

from .errors import VideoBoundError

FPS1_MIN_SEGMENTS, FPS1_MAX_SEGMENTS = 4, 16


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """Chat/eval rule: the middle frame of each of ``n = min(total, num_frames)`` equal segments.

    ``seg = (total - 1) / n``; frame i = ``(round(seg * i) + round(seg * (i + 1))) // 2``.
    """
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"uniform_indices: total must be a positive int, got {total!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"uniform_indices: num_frames must be a positive int, got {num_frames!r}")
    n = min(total, num_frames)
    seg = (total - 1) / n
    return [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(n)]


def fps1_segments(seconds: float) -> int:
    """MVBench "fps 1" mode: one frame a second, ``clamp(floor(seconds), 4, 16)``."""
    if seconds < FPS1_MIN_SEGMENTS:
        return FPS1_MIN_SEGMENTS
    if seconds > FPS1_MAX_SEGMENTS:
        return FPS1_MAX_SEGMENTS
    return math.floor(seconds)


def mvbench_indices(num_frames_total: int, fps: float, num_segments: int,
                    bound: tuple[float, float] | None = None, *, first_idx: int = 0,
                    source: str = "video") -> list[int]:
    """MVBench rule (``get_index`` of the release).

    ``max_frame = num_frames_total - 1 + first_idx`` (``first_idx=1`` for 1-based frame folders,
    where the release uses ``max_frame = number of files``). Without a bound the whole video is
    used; with ``bound=(start, end)`` in seconds, ``start_idx = max(first_idx, round(start*fps))``,
    ``end_idx = min(round(end*fps), max_frame)`` (an end past the video is clamped, as released).
    ``num_segments=0`` is "fps 1" mode: ``clamp(floor(seconds), 4, 16)`` segments, seconds being
    ``end - start`` with a bound, else ``max_frame / fps``. Frame i =
    ``int(start_idx + seg/2 + round(seg*i))`` with ``seg = (end_idx - start_idx) / num_segments``.
    Raises :class:`VideoBoundError` if the bound is reversed or lies entirely outside the video.
    """
    if not isinstance(num_frames_total, int) or num_frames_total < 1:
        raise ValueError(f"mvbench_indices: num_frames_total must be a positive int, got {num_frames_total!r}")
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"mvbench_indices: fps must be a positive number, got {fps!r}")
    if not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"mvbench_indices: num_segments must be an int >= 0 (0 = fps-1 mode), got {num_segments!r}")
    max_frame = num_frames_total - 1 + first_idx
    if bound is not None:
        start, end = float(bound[0]), float(bound[1])
        duration = num_frames_total / fps
        where = f"{source}: bound ({start:g}s, {end:g}s)"
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise VideoBoundError(f"{where} is not an increasing pair of finite seconds")
        if round(start * fps) > max_frame + 1 or end < 0:  # + 1: a start in the last half-frame
            raise VideoBoundError(f"{where} lies outside the video, which lasts {duration:g}s "
                                  f"({num_frames_total} frames at {fps:g} fps)")
    else:
        start, end = -100000.0, 100000.0
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    if end_idx < start_idx - (start_idx == max_frame + 1):  # only reachable with a bound
        raise VideoBoundError(f"{source}: bound ({start:g}s, {end:g}s) selects no frame of the video "
                              f"(frames {first_idx}..{max_frame} at {fps:g} fps)")
    if num_segments == 0:
        num_segments = fps1_segments(end - start if bound is not None else max_frame / fps)
    seg = (end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + round(seg * i)) for i in range(num_segments)]
