"""End-to-end benchmark: the engine vs the transformers reference, same checkpoint, videos, prompts.

    python benchmarks/e2e.py [--preset bench-cpu|tiny|stllm-7b] [--quick] [--device cpu|cuda]
                             [--dtype auto|float32|float16|bfloat16] [--checkpoint FOLDER]

Model: random weights in the official layout at the preset's shapes (BENCHMARKS.md), written once
into the cache (``$STLLM_CACHE`` or ``~/.cache/stllm-engine``/bench); ``--checkpoint`` uses a folder
instead. Videos: generated mp4, 48 frames at 8 fps, ``--video 224p`` (398x224, the default) or
``720p`` (1280x720: frame decoding and the resize to 224 weigh more, as with real clips), 16 frames
sampled, video input ``all``. Every request is the chat prompt with a ~30-token question, greedy, repetition penalty 1.5
(the release's), exactly N new tokens on both sides: ``min_new_tokens = max_new_tokens = N``
masks EOS until N tokens exist (transformers' MinNewTokens / the engine's sampler), and no stop
criterion runs ("###" stops are off: engine ``stop=[]``, reference generate without the release's
stopping criterion). The reference runs ``load_frames -> encode_video -> chat_inputs_embeds ->
LlamaForCausalLM.generate(inputs_embeds=...)``, i.e. its ``generate_ids`` path.

Metrics (each on videos the engine has not seen before, so no cache helps unless stated):
* ttft: engine = ``RequestOutput.timings.ttft`` (arrival -> first token, frame decoding included);
  reference = wall time of the whole pipeline with ``max_new_tokens=1``. Median over the videos.
* decode tokens/s: engine = (N-1) / (finish - first token); reference = (N-1) / (time token N
  exists - time token 1 exists), taken inside ``generate`` by a never-stopping StoppingCriteria
  (the same definition; a difference of two whole-run times was swamped by prefill noise on the
  loaded host). Median over the videos.
* throughput: C requests (different videos) submitted together to the engine (continuous batching)
  vs the reference answering them one after another; requests/s = C / wall time. Two sets of C
  videos in the order engine, reference, reference, engine (ABBA: a drift of the host's speed
  over the section weighs on both sides alike); each side's rate is 2C over its two walls.
* cached_video_second_question_ttft: (a) an independent second question on a video the engine just
  answered: only the vision features are reused (the instruction-aware Q-Former reads the
  question, so the video tokens and their KV change) vs that video's first TTFT.
* chat_follow_up_ttft: (b) ``llm.chat(video)`` then a second ``ask``: the follow-up prompt extends
  the first turn's, so the video tokens and the first turn's KV come from the prefix cache (up to
  the first token where re-tokenized history differs) vs the first turn's TTFT (video preparation
  included).
Engine and reference run interleaved per video. On the CPU a fixed GEMM (:class:`HostProbe`) is
timed before each side's measurement: ``host_probe_ms`` = [engine side, baseline side] medians
per row, and a note is printed where they differ by more than 25% (the host changed speed between
the sides, so that ratio is not a side-by-side one). On the CPU the reference runs twice: at torch's
thread count (how a user runs it) and at the engine's decode thread count (``STLLM_CPU_THREADS``,
see ``stllm_engine/model/threads.py``), both reported; the dtype is always the same on both sides.
The engine's glibc malloc settings (``stllm_engine/engine/cpu_malloc.py``) are process-wide, so the
reference runs under them too (``malloc`` in the JSON; ``STLLM_CPU_MALLOC=default`` for neither).
Targets (ratio = "engine better by"): ttft >= 1/0.7, decode >= 1.5, throughput >= 4,
cached/follow-up ttft >= 1/0.3; on CUDA ttft >= 3 and decode >= 2. Writes ``benchmarks/results/e2e-<device>[-<dtype>][-720p].json`` (the
dtype part for other dtypes than the device default).
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
from common import RESULTS, device_name, format_table, row, write_result  # noqa: E402

QUESTIONS = ("What is the red shape doing while the other objects move across the frame, and in which "
             "direction does it go?",
             "Which objects appear in the video, what colours are they, and how many times do they "
             "bounce off the edges?")
PRESETS = {"tiny": "tiny", "bench-cpu": "bench_cpu", "stllm-7b": None}
TARGETS = {"ttft": 1 / 0.7, "decode": 1.5, "throughput": 4.0, "cached_video_ttft": 1 / 0.3}
GPU_TARGETS = dict(TARGETS, ttft=3.0, decode=2.0)  # the GPU targets (ST-LLM-7B shape, bf16)
REPETITION_PENALTY = 1.5
VIDEO_SIZES = {"224p": (398, 224), "720p": (1280, 720)}  # BENCHMARKS.md: "720p and 224p"
VIDEO_FRAMES, VIDEO_FPS = 48, 8
RESIDUAL_FRAMES = 64  # BENCHMARKS.md: "64 frames global-local (512 tokens)"


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


def checkpoint_for(preset: str, cache: Path, device: str = "cpu", vit: str = "eva",
                   video_input: str = "all") -> Path:
    """The preset's random checkpoint of one variant in the cache (written once). The real-size
    preset draws its weights on ``device`` when that is a GPU (seconds instead of minutes; other
    numbers than a CPU draw, so the folder name says where they were drawn). A global-local
    (``residual``) checkpoint samples 64 frames, as the release's ``conversation_weight``."""
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    name = PRESETS[preset]
    draw = "cuda" if name is None and device.startswith("cuda") else "cpu"
    folder = cache / (f"{preset}-{vit}-{video_input}" + ("-cuda-drawn" if draw == "cuda" else ""))
    if (folder / "config.json").is_file():
        return folder
    log(f"writing a random {preset} {vit}/{video_input} checkpoint to {folder} (once) ...")
    t = time.perf_counter()
    kw = dict(preset=name) if name else dict(preset="bench_cpu", **real_size_overrides())
    if video_input == "residual":
        kw["num_frames"] = RESIDUAL_FRAMES
    write_tiny_checkpoint(folder, vit=vit, video_input=video_input, seed=0, dtype=torch.float16,
                          fmt="safetensors", shards=2 if preset == "tiny" else 4, device=draw, **kw)
    log(f"  written in {time.perf_counter() - t:.0f}s")
    return folder


def clip_frames(num_frames: int) -> int:
    """Frames in a test clip: 48 (6 s), or twice the sampled frames where more are sampled, so
    that sampling always picks spread-out frames (64-frame global-local: 128-frame clips)."""
    return max(VIDEO_FRAMES, 2 * num_frames)


def bench_videos(cache: Path, count: int, video: str = "224p", num_frames: int = 16) -> list[Path]:
    from stllm_engine.testing.videos import write_video

    folder = cache / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    size, frames = VIDEO_SIZES[video], clip_frames(num_frames)
    for seed in range(count):
        p = folder / f"{size[0]}x{size[1]}-{frames}f-seed{seed}.mp4"
        if not p.is_file():
            write_video(p, num_frames=frames, size=size, fps=VIDEO_FPS, seed=seed)
        paths.append(p)
    return paths


# --- the host's speed ---------------------------------------------------------------------------
class HostProbe:
    """A fixed GEMM timed before each side's measurement ([608, 1024] x [1024, 5632] in the run's
    dtype: the bench-cpu prefill's gate_up; CPU only). Shared cloud hosts change speed by up to
    ~2.4x within seconds (the same plain GEMM took 9-10 ms, then 4 ms, in one process: noisy
    neighbours on the physical cores), which no interleaving removes when a change falls between
    the two sides of a ratio; the probe's medians per side say whether it did."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.on = device == "cpu"
        if self.on:
            g = torch.Generator().manual_seed(0)
            self.a = torch.randn(608, 1024, generator=g).to(dtype)
            self.w = torch.randn(5632, 1024, generator=g).to(dtype)
        self.ms: dict[str, list[float]] = {}

    def __call__(self, side: str) -> None:
        """Time the GEMM (median of 3) and file it under ``side`` (a metric + side label)."""
        if not self.on:
            return
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.nn.functional.linear(self.a, self.w)
            times.append(time.perf_counter() - t)
        self.ms.setdefault(side, []).append(sorted(times)[1] * 1e3)

    def medians(self, *sides: str) -> list[float] | None:
        """The sides' median probe times in ms (None off the CPU)."""
        if not self.on:
            return None
        return [round(statistics.median(self.ms[s]), 2) for s in sides]


def probe_note(metric: str, ms: list[float] | None) -> str:
    """A warning when the host's speed differed by more than 25% between the two sides."""
    if not ms or len(ms) < 2 or max(ms) <= 1.25 * min(ms):
        return ""
    return (f"  note: the host's speed changed between the sides of {metric} (probe GEMM "
            f"{' vs '.join(f'{x:.1f}' for x in ms)} ms): that ratio is not side by side")


# --- the two sides ----------------------------------------------------------------------------
def token_clock():
    """A transformers StoppingCriteria that never stops and records when each new token exists."""
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenClock()


@torch.no_grad()
def reference_run(ref, video: Path, question: str, n: int, num_frames: int, device: str, clock=None):
    """(seconds for the whole pipeline, seconds in ``generate`` alone, ids) for exactly ``n`` tokens;
    ``clock`` (:func:`token_clock`) records each token's time."""
    from transformers import GenerationConfig, StoppingCriteriaList

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
        out = ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen,
                               stopping_criteria=StoppingCriteriaList([clock] if clock is not None else []))
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


@torch.no_grad()
def prefill_logits(m, x: torch.Tensor, graphs=None) -> torch.Tensor:
    """One LLM prefill pass of the engine's model over x [n, H] as a single sequence (no
    scheduler; through ``graphs``, a PrefillGraphs, when given): the last position's logits
    (``stllm_engine.testing.prefill``)."""
    from stllm_engine.testing.prefill import prefill_logits as run

    return run(m, x, graphs)


@torch.no_grad()
def model_agreement(ref, m, video: Path, question: str, num_frames: int) -> dict:
    """The engine's model against the reference on one video's frames (after the timed runs: the
    LLM pass writes cache slots 0..n-1): video tokens (ViT + Q-Former + projector) and the first
    token's logits over the reference's prompt embeddings, as max |diff| / max |ref|, plus whether
    the two argmaxes agree. At random 7B weights the logits are nearly flat, so greedy sequences
    drift apart after a near-tie; this says whether the two compute the same function."""
    frames = ref.load_frames(str(video), num_frames)
    tokens = ref.encode_video(frames, question)
    mine = m.encode_video(m.encode_vision(frames.to(m.device, m.dtype)), question)
    x = ref.chat_inputs_embeds(tokens, question)[0]
    want = ref.llm(inputs_embeds=x[None]).logits[0, -1].float()
    got = prefill_logits(m, x.to(m.device, m.dtype))[0].float()

    def rel(a, b):
        return float(f"{float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)):.3g}")
    return {"video_tokens_rel_err": rel(mine, tokens), "first_logits_rel_err": rel(got, want),
            "first_token_same": bool(got.argmax() == want.argmax())}


def kv_memory(config, dtype: torch.dtype, seqs: int, tokens: int) -> int:
    c = config.llm
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8
    return max(256 << 20, int(1.25 * seqs * tokens * per_token))


# --- the benchmark ----------------------------------------------------------------------------
def chat_turns(llm, video: Path, n: int, num_frames: int, device: str, probe=None):
    """A two-turn chat on a new video: (first-turn TTFT incl. video preparation, follow-up TTFT,
    follow-up cached prompt tokens, follow-up prompt tokens); ``probe`` (:class:`HostProbe`)
    runs before each turn."""
    probe = probe or (lambda side: None)
    params = engine_params(llm, n)
    probe("chat first")
    chat = llm.chat(str(video), num_frames=num_frames)
    sync(device)
    chat.ask(QUESTIONS[0], params=params)
    pv, o1 = chat._prepared, chat.outputs[0]
    first = pv.frame_decode_s + pv.vision_s + pv.qformer_s + o1.timings.ttft
    if pv.cache_hit:
        raise RuntimeError("the chat's first turn hit the vision cache: not a cold first turn")
    probe("chat follow-up")
    chat.ask(QUESTIONS[1], params=params)
    o2 = chat.outputs[1]
    return first, o2.timings.ttft, o2.num_cached_tokens, o2.num_prompt_tokens


def thread_label(n) -> str:
    return f"{n}" if n else f"torch ({torch.get_num_threads()})"


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
    ap.add_argument("--vit", default="eva", choices=("eva", "btadapter"),
                    help="vision tower of the random checkpoint (btadapter: the release's qa_weight)")
    ap.add_argument("--video-input", default="all", choices=("all", "mean", "residual"),
                    help="video input of the random checkpoint (residual: global-local, the release's "
                         "conversation_weight)")
    ap.add_argument("--num-frames", type=int, default=None,
                    help=f"frames sampled a video (default: the checkpoint's; 16, or {RESIDUAL_FRAMES} "
                         "for the random residual checkpoints)")
    ap.add_argument("--video", default="224p", choices=tuple(VIDEO_SIZES), help="resolution of the test clips")
    ap.add_argument("--no-matched-threads", action="store_true",
                    help="skip the extra reference runs at the engine's decode thread count (CPU)")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/"
                    "e2e-<device>[-<dtype>][-720p][-<vit>-<video input>].json)")
    args = ap.parse_args()
    if args.checkpoint and (args.vit, args.video_input) != ("eva", "all"):
        ap.error("--vit / --video-input choose the random checkpoint; --checkpoint runs that folder's variant")
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
    from stllm_engine.model.threads import cpu_threads
    from stllm_engine.reference import ReferenceSTLLM

    cache = cache_dir() / "bench"
    folder = args.checkpoint or checkpoint_for(args.preset, cache, args.device, args.vit, args.video_input)
    log(f"loading {folder} on {args.device} ({str(dtype).removeprefix('torch.')}): reference, engine ...")
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device=args.device)
    cfg = ref.config
    if args.num_frames is None:  # the checkpoint's own frame count (the random residual ones: 64)
        args.num_frames = cfg.num_frames
    videos = bench_videos(cache, 1 + 3 * reps + 2 * conc, args.video, args.num_frames)
    warm, lat_v = videos[0], videos[1:1 + reps]
    thr_v = videos[1 + reps:1 + reps + conc]
    cache_v, chat_v = videos[1 + reps + conc:1 + 2 * reps + conc], videos[1 + 2 * reps + conc:1 + 3 * reps + conc]
    thr_v2 = videos[1 + 3 * reps + conc:]  # the throughput section's second set (ABBA)
    prompt_est = cfg.num_video_tokens(args.num_frames) + 200
    t_load = time.perf_counter()
    llm = STLLM.from_pretrained(folder, device=args.device, dtype=dtype, max_num_seqs=max(conc, 8),
                                kv_cache_memory=kv_memory(cfg, dtype, conc + 3, prompt_est + 2 * n))
    load_s, warmup_s = time.perf_counter() - t_load, llm.engine.warmup_s
    log(f"engine loaded in {load_s:.1f}s" + (f" (warm-up at load {warmup_s:.1f}s)" if warmup_s is not None else ""))
    policy = llm.engine.model.thread_policy
    # reference settings: torch's threads (as a user runs it), and the engine's decode thread count
    ref_threads = {"torch": None}
    fixed = not policy.only_when_busy  # auto follows the host's load: only torch's setting is comparable
    if args.device == "cpu" and fixed and not args.no_matched_threads \
            and policy.decode not in (None, torch.get_num_threads()):
        ref_threads[f"{policy.decode} thread(s)"] = policy.decode
    from stllm_engine.model.threads import machine_busy

    busy = [machine_busy()]
    q1, q2 = QUESTIONS
    log(f"engine threads: decode {thread_label(policy.decode)}, prefill/vision {thread_label(policy.prefill)}; "
        f"reference threads: {', '.join(ref_threads)}")
    log("warm-up ...")
    for nt in ref_threads.values():
        with cpu_threads(nt):
            reference_run(ref, warm, q1, 2, args.num_frames, args.device)
    engine_runs(llm, [(warm, q1)], 2, args.num_frames, args.device)
    # a batch on the same video: chunked prefill, prefix-cache hits and batched decode steps run
    # once before the timed runs (on CUDA their Triton kernels compile at first use: a fresh GPU
    # machine's first 8-request batch took 2.99 s at 224p where a warm one took 1.49 s at 720p)
    engine_runs(llm, [(warm, q1), (warm, q2), (warm, q2), (warm, q1)], 4, args.num_frames, args.device)
    llm.engine.vision_cache.clear()

    log(f"latency: {reps} video(s), {n} tokens, interleaved ...")
    r_t1 = {k: [] for k in ref_threads}
    r_rate = {k: [] for k in ref_threads}
    e_ttft, e_rate, same = [], [], 0
    probe = HostProbe(args.device, dtype)
    for v in lat_v:
        for k, nt in ref_threads.items():
            clock = token_clock()
            probe(f"latency reference {k}")
            with cpu_threads(nt):
                t1, _, _ = reference_run(ref, v, q1, 1, args.num_frames, args.device)
                _, _, ref_ids = reference_run(ref, v, q1, n, args.num_frames, args.device, clock)
            r_t1[k].append(t1)
            r_rate[k].append((n - 1) / max(clock.times[-1] - clock.times[0], 1e-9))
        probe("latency engine")
        _, (out,) = engine_runs(llm, [(v, q1)], n, args.num_frames, args.device)
        e_ttft.append(out.timings.ttft)
        e_rate.append(out.timings.decode_tokens_per_s)
        same += out.token_ids == ref_ids
        refs = " | ".join(f"ref[{k}] ttft {r_t1[k][-1]:.3f}s decode {r_rate[k][-1]:.1f} tok/s" for k in ref_threads)
        log(f"  {v.name}: engine ttft {out.timings.ttft:.3f}s ({stages(out)}) decode {e_rate[-1]:.1f} tok/s | "
            f"{refs} | same greedy ids: {out.token_ids == ref_ids}")

    log(f"throughput: {conc} requests, two sets: engine, reference, reference, engine ...")

    def engine_wall(vids) -> float:
        probe("throughput engine")
        return engine_runs(llm, [(v, q1) for v in vids], n, args.num_frames, args.device)[0]

    def reference_wall(vids) -> dict[str, float]:
        walls = {}
        for k, nt in ref_threads.items():
            probe(f"throughput reference {k}")
            with cpu_threads(nt):
                walls[k] = sum(reference_run(ref, v, q1, n, args.num_frames, args.device)[0] for v in vids)
        return walls
    e_walls = [engine_wall(thr_v)]
    r_sets = [reference_wall(thr_v), reference_wall(thr_v2)]
    e_walls.append(engine_wall(thr_v2))
    e_wall = sum(e_walls)
    r_wall = {k: sum(w[k] for w in r_sets) for k in ref_threads}
    log(f"  engine {' + '.join(f'{w:.2f}' for w in e_walls)}s together; reference one after another: "
        + ", ".join(f"[{k}] {' + '.join(f'{w[k]:.2f}' for w in r_sets)}s" for k in ref_threads))

    log("(a) independent second question on a cached video (vision cache hit; Q-Former + prefill rerun) ...")
    first, second = [], []
    for v in cache_v:
        probe("cached first")
        _, (o1,) = engine_runs(llm, [(v, q1)], 2, args.num_frames, args.device)
        probe("cached second")
        _, (o2,) = engine_runs(llm, [(v, q2)], 2, args.num_frames, args.device)
        if o1.timings.vision_cache_hit or not o2.timings.vision_cache_hit:
            raise RuntimeError("expected a vision-cache miss then a hit")
        first.append(o1.timings.ttft)
        second.append(o2.timings.ttft)
        log(f"  {v.name}: first {o1.timings.ttft:.3f}s ({stages(o1)}), second {o2.timings.ttft:.3f}s ({stages(o2)})")

    log("(b) chat follow-up turn (video tokens + first turn from the KV prefix cache) ...")
    c_first, c_second, c_new = [], [], []
    for v in chat_v:
        f, s2, cached, total = chat_turns(llm, v, n, args.num_frames, args.device, probe)
        c_first.append(f)
        c_second.append(s2)
        c_new.append(total - cached)
        log(f"  {v.name}: first turn {f:.3f}s, follow-up {s2:.3f}s ({cached}/{total} prompt tokens from the cache)")

    busy.append(machine_busy())
    agreement = model_agreement(ref, llm.engine.model, warm, q1, args.num_frames)
    log("engine vs reference on the same frames: " + ", ".join(f"{k} {v}" for k, v in agreement.items()))
    med = statistics.median
    kernels = llm.engine.kernels()
    base = dict(preset=args.checkpoint.name if args.checkpoint else args.preset, dtype=str(dtype).removeprefix("torch."),
                video="x".join(map(str, VIDEO_SIZES[args.video])), frames=args.num_frames, vit="btadapter" if cfg.vision.btadapter else "eva",
                video_input=cfg.video_input, clip_frames=clip_frames(args.num_frames),
                video_tokens=cfg.num_video_tokens(args.num_frames), new_tokens=n, greedy=True,
                repetition_penalty=REPETITION_PENALTY,
                engine_threads=f"decode {thread_label(policy.decode)}, prefill/vision {thread_label(policy.prefill)}"
                + (" (while the host is oversubscribed, else torch's)" if policy.only_when_busy else ""),
                host_oversubscribed_at_start_end=busy, engine_decode_pass=kernels["decode_pass"],
                engine_prefill_pass=kernels["prefill_pass"], engine_prefill_mlp=kernels["prefill_mlp"],
                engine_video_pass=kernels["video_pass"], engine_load_s=round(load_s, 2),
                engine_warmup_s=None if warmup_s is None else round(warmup_s, 2), agreement=agreement,
                same_greedy_ids=f"{same}/{reps}")  # the latency videos: engine's n tokens == reference's
    if args.device == "cpu":
        from stllm_engine.ops.attention import cpu_prefill_attention_kernel

        base["engine_prefill_attention"] = cpu_prefill_attention_kernel(dtype)
        # process-wide glibc settings (stllm_engine/engine/cpu_malloc.py): set when the engine was
        # built, so the reference, which runs in this process, runs under them too
        base["malloc"] = llm.engine.malloc
    ref_name = "transformers reference"
    targets = GPU_TARGETS if args.device.startswith("cuda") else TARGETS
    rows = []
    pm = probe.medians  # [engine side, baseline side] probe GEMM ms of each row (None off the CPU)
    for k in ref_threads:
        rc = dict(base, reference_threads=k)
        lat = pm("latency engine", f"latency reference {k}")
        rows += [
            row(dict(rc, videos=reps, host_probe_ms=lat, target=f">={targets['ttft']:.2f}x"), "ttft", med(e_ttft),
                ref_name + " (max_new_tokens=1)", med(r_t1[k]), "s", False),
            row(dict(rc, videos=reps, host_probe_ms=lat, target=f">={targets['decode']:.2f}x"), "decode_tokens_per_s",
                med(e_rate), ref_name + " ((N-1)/(t_token(N) - t_token(1)), per-token clock in generate)",
                med(r_rate[k]), "tokens/s", True),
            row(dict(rc, requests=conc, sets=2, host_probe_ms=pm("throughput engine", f"throughput reference {k}"),
                     target=f">={targets['throughput']:.2f}x"), "requests_per_s",
                2 * conc / e_wall, ref_name + " (sequential)", 2 * conc / r_wall[k], "requests/s", True),
        ]
    rows += [
        row(dict(base, videos=reps, host_probe_ms=pm("cached second", "cached first"),
                 target=f">={targets['cached_video_ttft']:.2f}x"),
            "cached_video_second_question_ttft", med(second),
            "engine, first question on the video (vision cache hit only; KV cannot be reused)", med(first),
            "s", False),
        row(dict(base, videos=reps, follow_up_uncached_prompt_tokens=med(c_new),
                 host_probe_ms=pm("chat follow-up", "chat first"),
                 target=f">={targets['cached_video_ttft']:.2f}x"), "chat_follow_up_ttft", med(c_second),
            "engine, first chat turn on the video (incl. video preparation; follow-up reuses its KV)",
            med(c_first), "s", False),
    ]
    device = device_name(args.device)
    default_out = None
    suffix = ("" if dtype == (torch.float16 if args.device.startswith("cuda") else torch.float32)
              else f"-{base['dtype']}") + ("" if args.video == "224p" else f"-{args.video}") \
        + ("" if (base["vit"], cfg.video_input) == ("eva", "all") else f"-{base['vit']}-{cfg.video_input}")
    if suffix:
        default_out = RESULTS / f"e2e-{device.replace(' ', '-')}{suffix}.json"
    out = write_result("e2e", device, rows, args.out or default_out)
    print(f"e2e on {device}: {base['preset']} {base['dtype']} {base['vit']}/{cfg.video_input}, {args.num_frames} frames "
          f"({base['video_tokens']} video tokens), {n} new tokens; same greedy ids on {same}/{reps} videos; "
          f"engine threads {base['engine_threads']}"
          + (f"; engine prefill attention {base['engine_prefill_attention']}" if "engine_prefill_attention" in base else "")
          + (f"; malloc {base['malloc']} (both sides: one process)" if "malloc" in base else "")
          + f"; engine decode pass: {base['engine_decode_pass']}; prefill pass: {base['engine_prefill_pass']}"
          + f" (mlp: {base['engine_prefill_mlp']})"
          + f"; video passes: {base['engine_video_pass']}")
    print(format_table(rows, ["reference_threads", "target", "host_probe_ms"]))
    for r in rows:
        note = probe_note(r["metric"], r["config"]["host_probe_ms"])
        if note:
            print(note)
    if same < reps:
        print(f"  note: the engine's greedy ids differed from the reference's on {reps - same} of {reps} videos"
              + (" (float32: they should agree; see agreement)" if dtype == torch.float32 else
                 f" ({base['dtype']}: rounding can flip a near-tie and the answers drift apart after it)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
