"""Time to first token against video length on the CPU: engine vs reference, `all` input.

    python benchmarks/long_video.py [--frames 16 64 256] [--dtype bfloat16] [--repeats 2] [--out FILE]

BENCHMARKS.md's long-video workloads: 16 / 64 / 256 (/ 1024) frames of `all` input = 512 / 2k / 8k
(/ 32k) video tokens. The bench-cpu shape (random weights) with the LLM's positions raised to
``MAX_POSITIONS`` so nothing is cut (written once to the benchmark cache), one 224p clip of
``CLIP_FRAMES`` frames sampled uniformly at each count. Both sides run the whole pipeline
(decode, ViT, Q-Former, LLM prefill, first token): the reference as ``e2e.reference_run`` (one
``generate`` over all input embeddings), the engine as a user runs it (default config: prefill in
chunks of ``max_num_batched_tokens`` = 2048, so 8k tokens take four steps over the paged cache;
release truncation off, vision cache cleared before each request, and each run asks a differently
worded question, so the instruction-aware video tokens and the KV prefix cache are new). Interleaved, ``--repeats``
runs per side and count; the first run at each count is a warm-up (oneDNN sets up per shape).
Medians; ratio = engine better by. Writes ``benchmarks/results/long-video-<device>[-<dtype>].json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from common import report_cpu, row  # noqa: E402
from plot import plot_result  # noqa: E402

MAX_POSITIONS = 40960
CLIP_FRAMES = 1024


def checkpoint(cache: Path) -> Path:
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    folder = cache / "bench-cpu-long-eva-all"
    if not (folder / "config.json").is_file():
        e2e.log(f"writing a random bench-cpu checkpoint with {MAX_POSITIONS} positions to {folder} (once) ...")
        write_tiny_checkpoint(folder, vit="eva", video_input="all", seed=0, dtype=torch.float16, fmt="safetensors",
                              shards=4, preset="bench_cpu", llm_max_position_embeddings=MAX_POSITIONS)
    return folder


def clip(cache: Path) -> Path:
    from stllm_engine.testing.videos import write_video

    path = cache / "videos" / f"398x224-{CLIP_FRAMES}f-seed0.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        e2e.log(f"encoding a {CLIP_FRAMES}-frame clip to {path} (once) ...")
        write_video(path, num_frames=CLIP_FRAMES, size=(398, 224), fps=e2e.VIDEO_FPS, seed=0)
    return path


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=2, help="measured runs per side and frame count")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if min(args.frames) < 1 or max(args.frames) > CLIP_FRAMES or args.repeats < 1:
        ap.error(f"--frames must be in 1..{CLIP_FRAMES} and --repeats >= 1")
    dtype = getattr(torch, args.dtype)
    from stllm_engine.api import STLLM
    from stllm_engine.default_model import cache_dir
    from stllm_engine.reference import ReferenceSTLLM

    cache = cache_dir() / "bench"
    folder, video = checkpoint(cache), clip(cache)
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device="cpu")
    per_frame = ref.config.tokens_per_frame
    longest = max(args.frames) * per_frame + 256
    llm = STLLM.from_pretrained(folder, device="cpu", dtype=dtype, max_num_seqs=4, max_length=MAX_POSITIONS,
                                kv_cache_memory=e2e.kv_memory(ref.config, dtype, 2, longest))
    q = e2e.QUESTIONS[0]

    def engine_ttft(frames: int, question: str):
        llm.engine.vision_cache.clear()
        _, (out,) = e2e.engine_runs(llm, [(video, question)], 1, frames, "cpu")
        return out.timings.ttft, out

    rows, lines = [], []
    for frames in args.frames:
        e2e.log(f"{frames} frames ({frames * per_frame} video tokens) ...")
        ref_t, eng_t, phases = [], [], []
        for r in range(args.repeats + 1):  # run 0 warms both sides up at this shape
            question = f"{q} ({frames} frames, run {r})"  # a new prompt: no KV prefix-cache hit
            t_ref = e2e.reference_run(ref, video, question, 1, frames, "cpu")[0]
            t_eng, out = engine_ttft(frames, question)
            if r:
                ref_t.append(t_ref)
                eng_t.append(t_eng)
                phases.append(out.timings)
        e, b = statistics.median(eng_t), statistics.median(ref_t)
        t = SimpleNamespace(**{k: statistics.median(getattr(p, k) for p in phases)  # each stage's median
                               for k in ("frame_decode", "vision", "qformer", "prefill")})
        cfg = {"preset": "bench-cpu", "dtype": args.dtype, "threads": torch.get_num_threads(), "video": "398x224",
               "frames": frames, "video_tokens": frames * per_frame, "video_input": "all", "runs": args.repeats,
               "engine_max_num_batched_tokens": llm.engine.config.max_num_batched_tokens,
               "engine_phases_median_s": {k: round(getattr(t, k), 4) for k in ("frame_decode", "vision", "qformer", "prefill")}}
        rows.append(row(cfg, "ttft", e, "transformers reference (whole pipeline, max_new_tokens=1)", b, "s", False))
        lines.append(f"  {frames:5d} frames: engine {e:7.3f} s (frames {t.frame_decode:.2f} vision {t.vision:.2f} "
                     f"q-former {t.qformer:.2f} prefill {t.prefill:.2f})  reference {b:7.3f} s  -> {b / e:.2f}x")
    print(f"bench-cpu {args.dtype}, {torch.get_num_threads()} threads, TTFT against video length (medians)")
    print("\n".join(lines))
    out = report_cpu("long-video", rows, ["dtype", "frames", "video_tokens"], args.dtype, args.out)
    if len(rows) > 1:  # TTFT against frames, beside the JSON
        print(f"wrote {plot_result(out, 'frames', 'ttft')}")


if __name__ == "__main__":
    main()
