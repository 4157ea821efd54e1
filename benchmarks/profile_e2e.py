"""Where the time goes: per-phase breakdown of one answer, engine vs reference, same dtype/threads.

    STLLM_CPU_THREADS=1 python benchmarks/profile_e2e.py [--preset bench-cpu] [--dtype float32]
                                                          [--threads N] [--repeats 3] [--batch 1]
    python benchmarks/profile_e2e.py --device cuda --preset stllm-7b --dtype bfloat16

Phases (median over repeats, engine and reference interleaved, torch at ``--threads`` for both):
frame decode, ViT (+ ln_vision), Q-Former (+ projector), LLM prefill of the chat prompt (one
packed pass vs ``LlamaForCausalLM`` forward), then the engine's decode step split into input
building (``ModelRunner._prepare``), model forward, LM head, sampler and the rest of
``LLMEngine.step`` (scheduler, stop checks, outputs); the reference's decode is
(t_gen(N) - t_gen(1)) / (N - 1). ``--ops`` adds torch.profiler op tables of both prefills.
On CUDA every phase is timed between device synchronisations, and a decode step that replays a
CUDA graph has no separate LM-head time (it is inside the graph).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402


def timed(fn, store: dict, key: str, device: str = "cpu"):
    def wrapper(*a, **kw):
        e2e.sync(device)
        t = time.perf_counter()
        out = fn(*a, **kw)
        e2e.sync(device)
        store[key].append(time.perf_counter() - t)
        return out
    return wrapper


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-cpu", choices=tuple(e2e.PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (the engine's policy "
                    "is overridden to the same count)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="concurrent engine requests in the decode breakdown")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--video", default="224p", choices=tuple(e2e.VIDEO_SIZES))
    ap.add_argument("--vit", default="eva", choices=("eva", "btadapter"), help="checkpoint variant (as e2e.py)")
    ap.add_argument("--video-input", default="all", choices=("all", "mean", "residual"),
                    help="checkpoint variant (as e2e.py; residual samples 64 frames)")
    ap.add_argument("--ops", action="store_true", help="print torch.profiler op tables of both prefills")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    dev = args.device
    import os

    os.environ["STLLM_CPU_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from stllm_engine.api import STLLM
    from stllm_engine.default_model import cache_dir
    from stllm_engine.reference import ReferenceSTLLM
    from stllm_engine.engine.video_prep import preprocess_device
    from stllm_engine.video import load_video

    cache = cache_dir() / "bench"
    folder = e2e.checkpoint_for(args.preset, cache, dev, args.vit, args.video_input)
    nf = e2e.RESIDUAL_FRAMES if args.video_input == "residual" else 16
    videos = e2e.bench_videos(cache, 1 + args.repeats + args.batch, args.video, nf)
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device=dev)
    llm = STLLM.from_pretrained(folder, device=dev, dtype=dtype, max_num_seqs=max(8, args.batch))
    m, q = llm.engine.model, e2e.QUESTIONS[0]
    ids = llm.engine.prompt_ids(q)

    def engine_prefill(tokens, graphs=None):
        return e2e.prefill_logits(m, torch.cat([tokens, m.embed_tokens(torch.tensor(ids))]).to(m.dtype), graphs)

    T = defaultdict(list)
    for i, v in enumerate(videos[:1 + args.repeats]):  # round 0 warms up and is dropped
        if i == 1:
            T.clear()
        # as the engine decodes an idle engine's request: its decode threads, preprocessing where
        # it preprocesses (on the GPU for a CUDA model)
        frames = timed(load_video, T, "frame decode (engine)", dev)(
            str(v), num_frames=nf, size=m.config.vision.image_size,
            decode_workers=llm.engine.config.resolved_decode_threads(), device=preprocess_device(m)).frames
        t = time.perf_counter()
        ref_frames = ref.load_frames(str(v), nf)
        T["frame decode (reference)"].append(time.perf_counter() - t)
        emb = timed(m.encode_vision, T, "ViT (engine)", dev)(frames)
        remb = timed(ref.encode_vision, T, "ViT (reference)", dev)(ref_frames)
        tok = timed(m.encode_video, T, "Q-Former+proj (engine)", dev)(emb, q)
        vg = llm.engine.video_graphs  # CUDA: the passes the engine runs (graphs captured per shape)
        if vg is not None:
            timed(vg.encode_vision, T, "ViT (engine, cuda graph)", dev)(frames)
            timed(vg.encode_video, T, "Q-Former+proj (engine, cuda graph)", dev)(emb, q)
        rtok = timed(lambda: ref.projector(ref.frame_tokens(remb, q)), T, "Q-Former+proj (reference)", dev)()
        timed(engine_prefill, T, "LLM prefill (engine)", dev)(tok)
        pg = llm.engine.runner.prefill_graphs  # CUDA: the fresh-prefill graphs the engine replays
        if pg is not None:
            timed(engine_prefill, T, "LLM prefill (engine, cuda graph)", dev)(tok, pg)
        embeds = ref.chat_inputs_embeds(rtok, q)
        timed(lambda: ref.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1), T, "LLM prefill (reference)", dev)()
        n = args.new_tokens
        g1 = e2e.reference_run(ref, v, q, 1, nf, dev)[1]
        gn = e2e.reference_run(ref, v, q, n, nf, dev)[1]
        T["decode step (reference)"].append((gn - g1) / (n - 1))
    if dev.startswith("cuda"):  # the ViT's frames attention on the Triton kernel instead of SDPA
        os.environ["STLLM_CUDA_ATTENTION"] = "triton"
        for _ in range(1 + args.repeats):
            timed(m.encode_vision, T, "ViT (engine, triton attention)", dev)(frames)
        del os.environ["STLLM_CUDA_ATTENTION"]
    print(f"{args.preset} {args.vit}/{args.video_input} {args.dtype}, {nf} frames, {args.threads} thread(s), "
          f"{len(ids) + tok.shape[0]} prompt positions")
    for k, vals in T.items():
        print(f"  {k:32s} {statistics.median(vals) * 1e3:9.2f} ms")

    eng, D = llm.engine, defaultdict(list)
    eng.runner._prepare = timed(eng.runner._prepare, D, "input building", dev)
    eng.runner.model = m
    m.compute_logits = timed(m.compute_logits, D, "LM head", dev)
    run = eng.runner.run
    eng.runner.run = timed(run, D, "runner.run (forward + LM head)", dev)
    eng._sample = timed(eng._sample, D, "sampler", dev)
    eng.step = timed(eng.step, D, "LLMEngine.step", dev)
    reqs = [{"video": str(v), "question": q, "num_frames": nf} for v in videos[-args.batch:]]
    outs = llm.generate(reqs, e2e.engine_params(llm, args.new_tokens))
    failed = [o.error for o in outs if getattr(o, "error", None)]
    if failed:
        print(f"engine decode step: {len(failed)} request(s) failed: {failed[0]}")
    last = args.new_tokens - 2  # decode steps only (the first steps prefill)
    med = {k: statistics.median(v[-last:]) * 1e3 for k, v in D.items() if len(v) > last}
    print(f"engine decode step, batch {args.batch} (median of the last {last} steps; "
          f"{eng.kernels()['decode_pass']}; calls recorded: "
          f"{', '.join(f'{k} {len(v)}' for k, v in D.items())}):")
    for k in ("LLMEngine.step", "runner.run (forward + LM head)", "LM head", "input building", "sampler"):
        if k in med:  # LM head: not called outside a CUDA graph's capture
            print(f"  {k:32s} {med[k]:9.2f} ms")
    parts = ("LLMEngine.step", "runner.run (forward + LM head)", "sampler")
    if all(k in med for k in parts):
        other = med[parts[0]] - med[parts[1]] - med[parts[2]]
        print(f"  {'scheduler/stop checks/outputs':32s} {other:9.2f} ms")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("engine ViT", lambda: m.encode_vision(frames)),
                         ("reference ViT", lambda: ref.encode_vision(ref_frames)),
                         ("engine Q-Former+proj", lambda: m.encode_video(emb, q)),
                         ("reference Q-Former+proj", lambda: ref.frame_tokens(remb, q)),
                         ("engine prefill", lambda: engine_prefill(tok)),
                         ("reference prefill", lambda: ref.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1))):
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
            with profile(activities=acts) as prof:
                fn()
                e2e.sync(dev)
            key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
            print(f"{name} ops\n" + prof.key_averages().table(sort_by=key, row_limit=12))


if __name__ == "__main__":
    main()
