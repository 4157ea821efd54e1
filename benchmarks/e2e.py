"""End-to-end benchmark: the engine vs the transformers reference, same checkpoint, videos, prompts.

    python benchmarks/e2e.py [--preset bench-cpu|tiny|stllm-7b] [--quick] [--device cpu|cuda]
                             [--dtype auto|float32|float16|bfloat16] [--checkpoint FOLDER]

Model: random weights in the official layout at the preset's shapes (BENCHMARKS.md), written once
into the cache (``$STLLM_CACHE`` or ``~/.cache/stllm-engine``/bench); ``--checkpoint`` uses a folder
instead. Videos: generated mp4 (398x224, 48 frames at 8 fps), 16 frames sampled, video input
``all``. Every request is the chat prompt with a ~30-token question, greedy, repetition penalty 1.5
(the release's), exactly N new tokens on both sides: ``min_new_tokens = max_new_tokens = N``
masks EOS until N tokens exist (transformers' MinNewTokens / the engine's sampler), and no stop
criterion runs ("###" stops are off: engine ``stop=[]``, reference generate without the release's
stopping criterion). The reference runs ``load_frames -> encode_video -> chat_inputs_embeds ->
LlamaForCausalLM.generate(inputs_embeds=...)``, i.e. its ``generate_ids`` path.

Metrics (each on videos the engine has not seen before, so no cache helps unless stated):
* ttft: engine = ``RequestOutput.timings.ttft`` (arrival -> first token, frame decoding included);
  reference = wall time of the whole pipeline with ``max_new_tokens=1``. Median over the videos.
* decode tokens/s: engine = (N-1) / (finish - first token); reference =
  (N-1) / (time(N tokens) - time(1 token)), both times taken around ``generate`` alone on the same
  video (the video encoding before it is timed out of both, so its run-to-run noise does not
  enter the difference). Median over the videos.
* throughput: C requests (different videos) submitted together to the engine (continuous batching)
  vs the reference answering them one after another; requests/s = C / wall time.
* cached-video ttft: a second, different question on a video the engine just answered (vision
  features cached; the Q-Former reruns since it reads the question) vs that video's first TTFT.
Targets (ratio = "engine better by"): ttft >= 1/0.7, decode >= 1.5, throughput >= 4,
cached-video ttft >= 1/0.3. Writes ``benchmarks/results/e2e-<device>.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, format_table, row, write_result  # noqa: E402

QUESTIONS = ("What is the red shape doing while the other objects move across the frame, and in which "
             "direction does it go?",
             "Which objects appear in the video, what colours are they, and how many times do they "
             "bounce off the edges?")
PRESETS = {"tiny": "tiny", "bench-cpu": "bench_cpu", "stllm-7b": None}
TARGETS = {"ttft": 1 / 0.7, "decode": 1.5, "throughput": 4.0, "cached_video_ttft": 1 / 0.3}
REPETITION_PENALTY = 1.5
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = (398, 224), 48, 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- inputs -----------------------------------------------------------------------------------
def real_size_overrides() -> dict:
    """Size overrides that turn a checkpoint preset into the release's real shapes (EVA ViT-g,
    BERT-base Q-Former, Vicuna-7B)."""
    from stllm_engine.config import LLMConfig, QFormerConfig, VisionConfig

    skip = {"vision_btadapter", "qformer_vocab_size"}  # set by the variant / the tokenizer
    out = {f"{p}_{f.name}": getattr(cls(), f.name)
           for p, cls in (("vision", VisionConfig), ("qformer", QFormerConfig), ("llm", LLMConfig))
           for f in fields(cls) if f"{p}_{f.name}" not in skip}
    out.update(residual_size=16, residual_hidden=1024, num_frames=16)
    return out


def checkpoint_for(preset: str, cache: Path) -> Path:
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    folder = cache / f"{preset}-eva-all"
    if (folder / "config.json").is_file():
        return folder
    log(f"writing a random {preset} checkpoint to {folder} (once) ...")
    t = time.perf_counter()
    name = PRESETS[preset]
    kw = dict(preset=name) if name else dict(preset="bench_cpu", **real_size_overrides())
    write_tiny_checkpoint(folder, vit="eva", video_input="all", seed=0, dtype=torch.float16,
                          fmt="safetensors", shards=2 if preset == "tiny" else 4, **kw)
    log(f"  written in {time.perf_counter() - t:.0f}s")
    return folder


def bench_videos(cache: Path, count: int) -> list[Path]:
    from stllm_engine.testing.videos import write_video

    folder = cache / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        p = folder / f"{VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}-{VIDEO_FRAMES}f-seed{seed}.mp4"
        if not p.is_file():
            write_video(p, num_frames=VIDEO_FRAMES, size=VIDEO_SIZE, fps=VIDEO_FPS, seed=seed)
        paths.append(p)
    return paths


# --- the two sides ----------------------------------------------------------------------------
@torch.no_grad()
def reference_run(ref, video: Path, question: str, n: int, num_frames: int, device: str):
    """(seconds for the whole pipeline, seconds in ``generate`` alone, ids) for exactly ``n`` tokens."""
    from transformers import GenerationConfig

    lc = ref.config.llm
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                           repetition_penalty=REPETITION_PENALTY, bos_token_id=lc.bos_token_id,
                           eos_token_id=lc.eos_token_id, pad_token_id=lc.pad_token_id, use_cache=True)
    sync(device)
    t = time.perf_counter()
    tokens = ref.encode_video(ref.load_frames(str(video), num_frames), question)
    embeds = ref.chat_inputs_embeds(tokens, question)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    sync(device)
    tg = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        out = ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
    sync(device)
    end = time.perf_counter()
    ids = out[0].tolist()
    if len(ids) != n:
        raise RuntimeError(f"reference generated {len(ids)} tokens, expected {n}")
    return end - t, end - tg, ids


def engine_params(llm, n: int):
    from stllm_engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=n, min_new_tokens=n, stop=[], stop_token_ids=[],
                          repetition_penalty=REPETITION_PENALTY)


def engine_runs(llm, items: list[tuple[Path, str]], n: int, num_frames: int, device: str):
    """Submit ``items`` together; (wall seconds, outputs in order)."""
    reqs = [{"video": str(v), "question": q, "num_frames": num_frames} for v, q in items]
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(reqs, engine_params(llm, n))
    sync(device)
    dt = time.perf_counter() - t
    for o in outs:
        if o.error is not None or len(o.token_ids) != n:
            raise RuntimeError(f"engine request {o.request_id} failed or ended early: {o.error or o.finish_reason}")
    return dt, outs


def stages(out) -> str:
    t = out.timings
    return f"frames {t.frame_decode:.2f} vision {t.vision:.2f} q-former {t.qformer:.2f} prefill {t.prefill:.2f}"


def kv_memory(config, dtype: torch.dtype, seqs: int, tokens: int) -> int:
    c = config.llm
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8
    return max(256 << 20, int(1.25 * seqs * tokens * per_token))


# --- the benchmark ----------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-cpu", choices=tuple(PRESETS))
    ap.add_argument("--checkpoint", type=Path, help="use this checkpoint folder instead of random weights")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 4 requests, 1 repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 64, quick 16)")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in the throughput run (default 8)")
    ap.add_argument("--repeats", type=int, default=None, help="videos per latency metric (default 3)")
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/e2e-<device>.json)")
    args = ap.parse_args()
    n = args.new_tokens or (16 if args.quick else 64)
    conc = args.concurrency or (4 if args.quick else 8)
    reps = args.repeats or (1 if args.quick else 3)
    if n < 2 or conc < 1 or reps < 1:
        ap.error("--new-tokens must be >= 2, --concurrency and --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    dtype = (torch.float16 if args.device.startswith("cuda") else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    torch.manual_seed(0)

    from stllm_engine.api import STLLM
    from stllm_engine.default_model import cache_dir
    from stllm_engine.reference import ReferenceSTLLM

    cache = cache_dir() / "bench"
    folder = args.checkpoint or checkpoint_for(args.preset, cache)
    videos = bench_videos(cache, 1 + 2 * reps + conc)
    warm, lat_v, thr_v, cache_v = videos[0], videos[1:1 + reps], videos[1 + reps:1 + reps + conc], videos[1 + reps + conc:]
    log(f"loading {folder} on {args.device} ({str(dtype).removeprefix('torch.')}): reference, engine ...")
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device=args.device)
    cfg = ref.config
    prompt_est = args.num_frames * cfg.tokens_per_frame + 200
    llm = STLLM.from_pretrained(folder, device=args.device, dtype=dtype, max_num_seqs=max(conc, 8),
                                kv_cache_memory=kv_memory(cfg, dtype, conc + 1, prompt_est + n))
    q1, q2 = QUESTIONS
    log("warm-up ...")
    reference_run(ref, warm, q1, 2, args.num_frames, args.device)
    engine_runs(llm, [(warm, q1)], 2, args.num_frames, args.device)
    llm.engine.vision_cache.clear()

    log(f"latency: {reps} video(s), {n} tokens ...")
    r_t1, r_rate, e_ttft, e_rate, same = [], [], [], [], 0
    for v in lat_v:
        t1, g1, _ = reference_run(ref, v, q1, 1, args.num_frames, args.device)
        _, gn, ref_ids = reference_run(ref, v, q1, n, args.num_frames, args.device)
        _, (out,) = engine_runs(llm, [(v, q1)], n, args.num_frames, args.device)
        r_t1.append(t1)
        r_rate.append((n - 1) / max(gn - g1, 1e-9))
        e_ttft.append(out.timings.ttft)
        e_rate.append(out.timings.decode_tokens_per_s)
        same += out.token_ids == ref_ids
        log(f"  {v.name}: ttft engine {out.timings.ttft:.3f}s ({stages(out)}) ref {t1:.3f}s | decode engine "
            f"{e_rate[-1]:.1f} tok/s ref {r_rate[-1]:.1f} tok/s | same greedy ids: {out.token_ids == ref_ids}")

    log(f"throughput: {conc} requests ...")
    e_wall, _ = engine_runs(llm, [(v, q1) for v in thr_v], n, args.num_frames, args.device)
    r_wall = sum(reference_run(ref, v, q1, n, args.num_frames, args.device)[0] for v in thr_v)
    log(f"  engine {e_wall:.2f}s together, reference {r_wall:.2f}s one after another")

    log("cached video: second question ...")
    first, second = [], []
    for v in cache_v:
        _, (o1,) = engine_runs(llm, [(v, q1)], 2, args.num_frames, args.device)
        _, (o2,) = engine_runs(llm, [(v, q2)], 2, args.num_frames, args.device)
        if not o2.timings.vision_cache_hit:
            raise RuntimeError("the second question missed the vision cache")
        first.append(o1.timings.ttft)
        second.append(o2.timings.ttft)
        log(f"  {v.name}: first {o1.timings.ttft:.3f}s ({stages(o1)}), second {o2.timings.ttft:.3f}s ({stages(o2)})")

    med = statistics.median
    base = dict(preset=args.checkpoint.name if args.checkpoint else args.preset, dtype=str(dtype).removeprefix("torch."),
                frames=args.num_frames, video_input=cfg.video_input,
                video_tokens=args.num_frames * cfg.tokens_per_frame, new_tokens=n, greedy=True,
                repetition_penalty=REPETITION_PENALTY)
    ref_name = "transformers reference"
    rows = [
        row(dict(base, videos=reps, target=f">={TARGETS['ttft']:.2f}x"), "ttft", med(e_ttft),
            ref_name + " (max_new_tokens=1)", med(r_t1), "s", False),
        row(dict(base, videos=reps, target=f">={TARGETS['decode']:.2f}x"), "decode_tokens_per_s", med(e_rate),
            ref_name + " ((N-1)/(t_gen(N) - t_gen(1)))", med(r_rate), "tokens/s", True),
        row(dict(base, requests=conc, target=f">={TARGETS['throughput']:.2f}x"), "requests_per_s",
            conc / e_wall, ref_name + " (sequential)", conc / r_wall, "requests/s", True),
        row(dict(base, videos=reps, target=f">={TARGETS['cached_video_ttft']:.2f}x"), "cached_video_ttft",
            med(second), "engine, first question on the video", med(first), "s", False),
    ]
    device = device_name(args.device)
    out = write_result("e2e", device, rows, args.out)
    print(f"e2e on {device}: {base['preset']} {base['dtype']}, {args.num_frames} frames "
          f"({base['video_tokens']} video tokens), {n} new tokens; same greedy ids on {same}/{reps} videos")
    print(format_table(rows, ["target"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
