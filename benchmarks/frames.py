"""The frame stage's parts: decode (one reader / several), preprocessing on the CPU and on the GPU.

    python benchmarks/frames.py [--video 224p 720p] [--repeats 5] [--device cuda]

Medians over repeats of: ``load_video(preprocess=False)`` through decord (``backend="release"``,
the reference's reader) with 1 and ``--workers`` readers, the engine's default (``auto``: decord's
index, PyAV's decode where bit-identical) with 1 and ``--workers`` decoder threads, CPU preprocessing at torch's thread count, and (with ``--device``) the uint8 upload plus
preprocessing there (synchronised). Prints a table; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", nargs="+", default=["224p", "720p"], choices=tuple(e2e.VIDEO_SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from stllm_engine.default_model import cache_dir
    from stllm_engine.video import load_video, preprocess_frames

    rows = []
    for size in args.video:
        v = str(e2e.bench_videos(cache_dir() / "bench", 1, size)[0])
        raw = load_video(v, 16, preprocess=False).frames
        row = {"video": size, "threads": torch.get_num_threads(),
               "decode_1_reader_ms": median_ms(lambda: load_video(v, 16, preprocess=False, backend="release"),
                                               args.repeats),
               f"decode_{args.workers}_readers_ms": median_ms(
                   lambda: load_video(v, 16, preprocess=False, decode_workers=args.workers, backend="release"),
                   args.repeats),
               "decode_auto_1_ms": median_ms(lambda: load_video(v, 16, preprocess=False), args.repeats),
               f"decode_auto_{args.workers}_ms": median_ms(
                   lambda: load_video(v, 16, preprocess=False, decode_workers=args.workers), args.repeats),
               "preprocess_cpu_ms": median_ms(lambda: preprocess_frames(raw, 224), args.repeats)}
        from stllm_engine.video import decode as decode_mod

        rule = decode_mod.min_run_frames
        for least in (4, 12):  # runs this short split too (the rule keeps short clips on one reader)
            decode_mod.min_run_frames = lambda pixels, least=least: least
            try:
                row[f"decode_{args.workers}_readers_runs_ge{least}_ms"] = median_ms(
                    lambda: load_video(v, 16, preprocess=False, decode_workers=args.workers, backend="release"),
                    args.repeats)
            finally:
                decode_mod.min_run_frames = rule
        if args.device:
            row[f"preprocess_{args.device}_ms"] = median_ms(
                lambda: preprocess_frames(raw, 224, device=args.device), args.repeats, args.device)
            pinned = torch.from_numpy(raw).pin_memory()
            row[f"preprocess_{args.device}_pinned_ms"] = median_ms(
                lambda: preprocess_frames(pinned, 224, device=args.device), args.repeats, args.device)
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "frames", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
