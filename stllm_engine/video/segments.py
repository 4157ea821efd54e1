"""Split the sampled frames of one video into runs that separate readers decode in parallel.

A reader decodes forward from the keyframe at or before a wanted frame, or from the previous
wanted frame when no keyframe lies between them. So a sorted list of wanted frames costs, in
decoded frames, ``first(i) + sum(step(m) for m in i+1..j)`` for the run ``i..j``:
``first(i) = t_i - key(t_i) + 1`` (a fresh reader seeks to the keyframe) and
``step(m) = t_m - key(t_m) + 1`` after a seek, else ``t_m - t_{m-1}``. The runs of
:func:`split_runs` keep the frames' order, each at least ``min_frames`` decoded frames (a second
reader costs an open and a seek, so short clips stay on one), and the largest run is as small as
contiguous runs allow: a 480-frame 720p clip with a keyframe every 60 frames, 16 frames sampled,
decoded in 229 ms on one reader and 136 ms on two (2-core host); a 48-frame clip stays on one.
Disposable frames (``disposable``: sorted indices that no other frame refers to) that are not
wanted are not decoded, so they cost nothing.
"""
from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

MIN_RUN_FRAMES = 32  # decoded frames a run needs when the frame size is unknown
MIN_RUN_PIXELS = 1_000_000  # decoded pixels a run needs to pay for its own reader (see min_run_frames)


def min_run_frames(pixels: int | None) -> int:
    """Decoded frames a run needs for a frame of ``pixels`` (None: unknown): an extra reader costs
    an open and a seek (~1.5 ms at 224p, ~3 ms at 720p). 48-frame clips, 16 sampled, 8 readers
    allowed, on the 16-core host of an H100 (``benchmarks/frames.py``): at 398x224 one reader took
    21.0 ms, runs of >= 12 or >= 4 frames 13.2 / 13.3 ms; at 1280x720 runs of >= 7 frames 57.9 ms,
    >= 4 54.7 ms, >= 12 76.7 ms (fewer readers). 1 Mpx: 12 frames at 398x224, 4 from 480p up. On
    a 2-core host two readers took 12.6-14.7 ms against 16.8 ms for one (224p)."""
    if not pixels or pixels <= 0:
        return MIN_RUN_FRAMES
    return max(4, -(-MIN_RUN_PIXELS // pixels))


def _costs(indices: Sequence[int], keys: Sequence[int], disposable: Sequence[int] = ()
           ) -> tuple[list[int], list[int]]:
    """(first, step): frames a fresh reader decodes to reach indices[i], and frames a reader
    that has just produced indices[i-1] decodes to reach indices[i] (step[0] = first[0])."""
    def skipped(a: int, b: int) -> int:  # disposable frames in a..b-1 (none of them wanted)
        return bisect.bisect_left(disposable, b) - bisect.bisect_left(disposable, a) if a < b else 0

    first, step = [], []
    prev = None
    for t in indices:
        k = keys[bisect.bisect_right(keys, t) - 1] if keys and keys[0] <= t else 0
        fresh = t - k + 1 - skipped(k, t)
        first.append(fresh)
        step.append(fresh if prev is None or k > prev else t - prev - skipped(prev + 1, t))
        prev = t
    return first, step


def decode_cost(indices: Sequence[int], keys: Sequence[int], disposable: Sequence[int] = ()) -> int:
    """Frames one reader decodes to produce ``indices`` (sorted) in order."""
    return sum(_costs(indices, keys, disposable)[1])


def split_runs(indices: Sequence[int], keys: Sequence[int], parts: int,
               min_frames: int = MIN_RUN_FRAMES, disposable: Sequence[int] = ()) -> list[list[int]]:
    """At most ``parts`` contiguous runs of ``indices`` (in order) for parallel readers: the most
    runs (up to ``parts``) whose balanced split leaves every run at least ``min_frames`` decoded
    frames; one run when the indices are not sorted or no such split exists."""
    idx = list(indices)
    if parts < 2 or len(idx) < 2 or any(a > b for a, b in zip(idx, idx[1:])):
        return [idx]
    first, step = _costs(idx, sorted(keys), sorted(disposable))
    prefix = [0]
    for s in step:
        prefix.append(prefix[-1] + s)

    def cost(i: int, j: int) -> int:  # run idx[i:j], j > i
        return first[i] + prefix[j] - prefix[i + 1]

    def runs_within(limit: int, n: int) -> list[int] | None:
        """Greedy run starts with every run costing <= limit (None: more than n runs)."""
        starts, i = [0], 0
        for j in range(1, len(idx) + 1):
            if cost(i, j) > limit:
                if j - 1 == i:
                    return None
                i = j - 1
                starts.append(i)
        return starts if len(starts) <= n else None

    for n in range(min(parts, cost(0, len(idx)) // max(1, min_frames)), 1, -1):
        lo, hi = max(first), cost(0, len(idx))
        while lo < hi:  # the smallest largest-run cost that fits in n runs
            mid = (lo + hi) // 2
            if runs_within(mid, n) is None:
                lo = mid + 1
            else:
                hi = mid
        starts = runs_within(lo, n) + [len(idx)]
        if len(starts) > 2 and min(cost(a, b) for a, b in zip(starts, starts[1:])) >= min_frames:
            return [idx[a:b] for a, b in zip(starts, starts[1:])]
    return [idx]


def map_runs(runs: list[list[int]], decode: Callable[[list[int]], T]) -> list[T]:
    """``[decode(run) for run in runs]``, the first run on this thread and the others on their own
    threads at the same time (the decoders release the GIL); an exception in any run propagates."""
    if len(runs) == 1:
        return [decode(runs[0])]
    with ThreadPoolExecutor(len(runs) - 1, thread_name_prefix="stllm-decode") as pool:
        rest = [pool.submit(decode, run) for run in runs[1:]]
        return [decode(runs[0])] + [f.result() for f in rest]
