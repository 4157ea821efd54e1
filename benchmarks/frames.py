"""The frame stage's parts: decode (one reader / several), preprocessing on the CPU and on the GPU.

    python benchmarks/frames.py [--video 224p 720p] [--repeats 5] [--workers N] [--device cuda] [--out FILE]

16 frames of the e2e benchmark's first clip, medians over ``--repeats`` after a warm-up. Rows
(``benchmarks/results/frames-<device>.json``, the BENCHMARKS.md format):

- ``decode_ms``, ``load_video(preprocess=False)`` against one decord reader (``backend="release"``,
  the reference's way): the engine's default decoder (``auto``: decord's index, PyAV's decode
  where bit-identical) with ``--workers`` decoders (default: the engine's ``decode_threads``) and
  with one; decord on ``--workers`` readers, and with runs of at least 4 / 12 decoded frames split
  off too (the engine's rule keeps short clips on fewer readers; these rows tune it).
- ``preprocess_ms``: CPU preprocessing (resize, crop, normalise) in parallel frame groups against
  one group, where the frames need resizing (720p; 224p clips are only cropped, in one group); with ``--device``, the uint8 upload plus preprocessing there (synchronised), from
  pageable and from pinned memory, against the CPU's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from common import device_name, format_table, row, write_result  # noqa: E402


def median_ms(fn, repeats: int, device: str = "cpu") -> float:
    fn()
    ts = []
    for _ in range(repeats):
        e2e.sync(device)
        t = time.perf_counter()
        fn()
        e2e.sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


@contextmanager
def min_run(least: int | None):
    """The parallel-run rule of both decoders replaced by runs of >= ``least`` frames (None: kept)."""
    from stllm_engine.video import decode, pyav_reader

    rules = decode.min_run_frames, pyav_reader.min_run_frames
    if least is not None:
        decode.min_run_frames = pyav_reader.min_run_frames = lambda pixels: least
    try:
        yield
    finally:
        decode.min_run_frames, pyav_reader.min_run_frames = rules


def main() -> None:
    from stllm_engine.engine.engine_config import EngineConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", nargs="+", default=["224p", "720p"], choices=tuple(e2e.VIDEO_SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=EngineConfig().resolved_decode_threads())
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from stllm_engine.default_model import cache_dir
    from stllm_engine.video import load_video, preprocess, preprocess_frames

    n, rows = args.workers, []
    for size in args.video:
        v = str(e2e.bench_videos(cache_dir() / "bench", 1, size)[0])
        raw = load_video(v, 16, preprocess=False).frames
        cfg = {"video": size, "frames": 16, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}

        def decode_ms(workers: int, backend: str, least: int | None = None) -> float:
            with min_run(least):
                return median_ms(lambda: load_video(v, 16, preprocess=False, decode_workers=workers,
                                                    backend=backend), args.repeats)
        one_reader = decode_ms(1, "release")
        base = "one decord reader (the reference's)"
        for name, workers, backend, least in [(f"auto, {n} decoders", n, "auto", None),
                                              ("auto, 1 decoder", 1, "auto", None),
                                              (f"decord, {n} readers", n, "release", None),
                                              (f"decord, {n} readers, runs >= 4 frames", n, "release", 4),
                                              (f"decord, {n} readers, runs >= 12 frames", n, "release", 12)]:
            rows.append(row({**cfg, "decoder": name}, "decode_ms", decode_ms(workers, backend, least), base,
                            one_reader, "ms", higher_is_better=False))
        cpu = median_ms(lambda: preprocess_frames(raw, 224), args.repeats)
        if min(raw.shape[1:3]) != 224:  # frames to resize: groups on parallel threads (else one)
            parts = preprocess.cpu_resize_parts
            preprocess.cpu_resize_parts = lambda frames, resizing: 1
            try:
                cpu_one = median_ms(lambda: preprocess_frames(raw, 224), args.repeats)
            finally:
                preprocess.cpu_resize_parts = parts
            rows.append(row({**cfg, "preprocess": "cpu, parallel frame groups"}, "preprocess_ms", cpu,
                            "cpu, one group", cpu_one, "ms", higher_is_better=False))
        if args.device:
            dev = median_ms(lambda: preprocess_frames(raw, 224, device=args.device), args.repeats, args.device)
            pinned = torch.from_numpy(raw).pin_memory()
            dev_pinned = median_ms(lambda: preprocess_frames(pinned, 224, device=args.device), args.repeats,
                                   args.device)
            for name, ms in [(f"{args.device}, pageable upload", dev), (f"{args.device}, pinned upload", dev_pinned)]:
                rows.append(row({**cfg, "preprocess": name}, "preprocess_ms", ms, "cpu, parallel frame groups",
                                cpu, "ms", higher_is_better=False))
    print(format_table(rows, ["video", "decoder", "preprocess"]))
    path = write_result("frames", device_name(args.device or "cpu"), rows, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
