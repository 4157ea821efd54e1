"""Frame decoding of longer clips: one decord reader (the reference's way) vs the engine's decode
(``auto``: PyAV where its pixels are decord's, else decord; either on parallel readers over
keyframe segments).

    python benchmarks/video_decode.py [--repeats 5] [--ttft] [--out FILE]

Real clips are longer than the e2e benchmark's 6 s ones and their decode weighs on the time to
first token: 16 frames sampled uniformly from a 16 s clip need every frame from each sampled
frame's keyframe on. Clips (generated once into the benchmark cache, h264 as
``stllm_engine.testing.videos`` writes it): 480 frames at 30 fps, 720p, a keyframe every 12 / 60 /
250 frames, and 1080p with one every 60; the same 720p clips with 3 B-frames between reference
frames (x264's default above its ultrafast preset, as camera and web encodes have them: about half
the frames disposable); plus the e2e benchmark's 48-frame 720p clip (stays on one reader: too
short to split). Rows: ``load_video(..., preprocess=False)`` the engine's way
(``decode_workers`` = the CPU count) vs ``backend="release"`` with one reader (the reference's way);
on the B-frame clips also the engine's way vs the same decoding every packet
(``PyAVReader.skip_disposable = False``); and with ``--ttft`` the engine's
time to first token on the bench-cpu model (bf16) with ``decode_threads`` default vs 1, vision
cache off, a new question each run (so no KV prefix-cache hit). Also ``load_video`` of a ~200 MB
high-bitrate clip new to the process: its sha256 on a thread beside the decode
(``sources.hash_beside``) vs before it. Interleaved, medians of ``--repeats`` after a warm-up;
ratio = the engine's way better by. Writes ``benchmarks/results/video-decode-<device>.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from common import report_cpu, row  # noqa: E402

CLIPS = {  # name: (frames, (W, H), fps, gop, B-frames)
    "720p-16s-gop12": (480, (1280, 720), 30, 12, 0),
    "720p-16s-gop60": (480, (1280, 720), 30, 60, 0),
    "720p-16s-gop250": (480, (1280, 720), 30, 250, 0),
    "1080p-16s-gop60": (480, (1920, 1080), 30, 60, 0),
    "720p-16s-gop60-bf3": (480, (1280, 720), 30, 60, 3),
    "720p-16s-gop250-bf3": (480, (1280, 720), 30, 250, 3),
}
NUM_FRAMES = 16


def clips(cache: Path) -> dict[str, Path]:
    from stllm_engine.testing.videos import write_video

    folder = cache / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (n, size, fps, gop, bframes) in CLIPS.items():
        p = folder / f"{name}.mp4"
        if not p.is_file():
            e2e.log(f"writing {p} (once) ...")
            write_video(p, num_frames=n, size=size, fps=fps, seed=11, gop=gop, bframes=bframes)
        out[name] = p
    out["720p-6s-gop12 (e2e)"] = e2e.bench_videos(cache, 1, "720p")[0]
    return out


def noisy_clip(cache: Path) -> Path:
    """A 10 s 720p clip of noisy frames (~200 MB: a high-bitrate file, unlike the synthetic
    shapes), to time hashing the file beside its decode."""
    import av
    import numpy as np

    p = cache / "videos" / "720p-10s-noise.mp4"
    if p.is_file():
        return p
    e2e.log(f"writing {p} (once) ...")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    with av.open(str(p), "w") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt, st.gop_size = 1280, 720, "yuv420p", 60
        st.options = {"crf": "12", "preset": "ultrafast"}
        for i in range(300):
            frame = np.roll(base, 3 * i, axis=1) ^ rng.integers(0, 64, base.shape, dtype=np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ttft", action="store_true", help="also the engine's TTFT with parallel vs one reader")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from stllm_engine.default_model import cache_dir
    from stllm_engine.engine.engine_config import EngineConfig
    from stllm_engine.video import load_video

    from stllm_engine.video.pyav_reader import PyAVReader

    cache = cache_dir() / "bench"
    workers = EngineConfig().resolved_decode_threads()
    rows = []
    for name, path in clips(cache).items():
        ways = {"release": dict(decode_workers=1, backend="release"),  # the reference: one decord reader
                "engine": dict(decode_workers=workers)}  # auto: PyAV's decode, or parallel decord readers
        if CLIPS.get(name, (0,) * 5)[4]:
            ways["every packet"] = ways["engine"]
        got = {k: [] for k in ways}
        for r in range(args.repeats + 1):
            for k, kw in ways.items():
                PyAVReader.skip_disposable = k != "every packet"
                t = time.perf_counter()
                load_video(path, NUM_FRAMES, preprocess=False, **kw)
                if r:
                    got[k].append(time.perf_counter() - t)
        PyAVReader.skip_disposable = True
        med = {k: statistics.median(v) * 1e3 for k, v in got.items()}
        cfg = {"clip": name, "frames": NUM_FRAMES, "readers": workers}
        rows.append(row(cfg, "decode_ms", med["engine"], "one decord reader", med["release"], "ms", False))
        if "every packet" in med:
            rows.append(row(dict(cfg, skip_disposable=True), "decode_ms", med["engine"],
                            "the engine's decode of every packet", med["every packet"], "ms", False))
        e2e.log(f"  {name}: {med['release']:.0f} -> {med['engine']:.0f} ms"
                + (f" (every packet: {med['every packet']:.0f} ms)" if "every packet" in med else ""))
    from stllm_engine.video import sources

    noisy, threshold = noisy_clip(cache), sources.HASH_THREAD_BYTES
    got = {"inline": [], "beside": []}
    for r in range(args.repeats + 1):
        for how in got:  # a file new to the process each time: the hash memo is cleared
            sources._HASH_MEMO.clear()
            sources.HASH_THREAD_BYTES = threshold if how == "beside" else 1 << 62
            t = time.perf_counter()
            load_video(noisy, NUM_FRAMES, decode_workers=workers, preprocess=False)
            if r:
                got[how].append(time.perf_counter() - t)
    sources.HASH_THREAD_BYTES = threshold
    med = {k: statistics.median(v) * 1e3 for k, v in got.items()}
    cfg = {"clip": f"720p-10s-noise ({noisy.stat().st_size >> 20} MiB)", "frames": NUM_FRAMES, "readers": workers}
    rows.append(row(cfg, "new_file_load_ms", med["beside"], "content hash before the decode", med["inline"], "ms",
                    False))
    if args.ttft:
        from stllm_engine.api import STLLM

        folder = e2e.checkpoint_for("bench-cpu", cache)
        engines = {w: STLLM.from_pretrained(folder, device="cpu", dtype=torch.bfloat16, vision_cache_bytes=0,
                                            decode_threads=w) for w in (1, workers)}
        params = e2e.engine_params(engines[1], 2)
        for name, path in clips(cache).items():
            got = {w: [] for w in engines}
            for r in range(args.repeats + 1):
                for w, llm in engines.items():
                    question = f"{e2e.QUESTIONS[0]} ({name}, run {r})"  # a new prompt: no prefix-cache hit
                    out = llm.generate([{"video": str(path), "question": question,
                                         "num_frames": NUM_FRAMES}], params)[0]
                    if r:
                        got[w].append(out.timings.ttft)
            med = {w: statistics.median(v) * 1e3 for w, v in got.items()}
            cfg = {"clip": name, "frames": NUM_FRAMES, "readers": workers, "model": "bench-cpu bf16"}
            rows.append(row(cfg, "ttft_ms", med[workers], "engine with decode_threads=1", med[1], "ms", False))
    print(f"{NUM_FRAMES} frames sampled, {os.cpu_count()} CPUs, medians of {args.repeats}")
    report_cpu("video-decode", rows, ["clip", "readers"], "bfloat16", args.out)


if __name__ == "__main__":
    main()
