"""Prefill time at prompt lengths a process has not seen before (CPU).

    python benchmarks/prefill_lengths.py [--dtype bfloat16|float32] [--lengths 12] [--out FILE]

oneDNN sets its GEMMs up per row count, so the first LLM prefill at a new prompt length is slower
than later ones at that length; a server answering varied questions meets new lengths all the
time. The engine pads CPU prefill rows to a multiple of ``llama.ROW_BUCKET`` (32), so a new length
only pays that set-up when it opens a new bucket. This runs, on the bench-cpu LLM with random
inputs in one process, the first and the second prefill at each of ``--lengths`` new lengths
(561 + 7i, 562 + 7i, 563 + 7i: the same range, none a multiple of 32) for three sides, each on its
own set of lengths:

* engine, rows bucketed (the default);
* engine with ``ROW_BUCKET = 1`` (no padding);
* the transformers reference (``LlamaForCausalLM`` forward over ``inputs_embeds``).

Lengths 7 apart put four or five of them in each 32-row bucket, as varied questions about
16-frame videos do. Medians; ratio = engine better by. Writes
``benchmarks/results/prefill-lengths-<device>[-<dtype>].json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from common import report_cpu, row  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--lengths", type=int, default=12, help="new lengths per side")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from stllm_engine.api import STLLM
    from stllm_engine.default_model import cache_dir
    from stllm_engine.model import llama
    from stllm_engine.reference import ReferenceSTLLM

    folder = e2e.checkpoint_for("bench-cpu", cache_dir() / "bench")
    m = STLLM.from_pretrained(folder, device="cpu", dtype=dtype).engine.model
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device="cpu")
    hidden = m.config.llm.hidden_size

    def engine_prefill(n: int) -> float:
        x = torch.randn(n, hidden).to(dtype)
        t = time.perf_counter()
        e2e.prefill_logits(m, x)
        return time.perf_counter() - t

    def reference_prefill(n: int) -> float:
        x = torch.randn(1, n, hidden).to(dtype)
        t = time.perf_counter()
        ref.llm(inputs_embeds=x, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    def engine_unbucketed(n: int) -> float:
        llama.ROW_BUCKET = 1
        try:
            return engine_prefill(n)
        finally:
            llama.ROW_BUCKET = bucket

    bucket = llama.ROW_BUCKET
    sides = {"engine (rows bucketed)": (engine_prefill, [563 + 7 * i for i in range(args.lengths)]),
             "engine, ROW_BUCKET=1": (engine_unbucketed, [561 + 7 * i for i in range(args.lengths)]),
             "transformers reference": (reference_prefill, [562 + 7 * i for i in range(args.lengths)])}
    for fn, _ in sides.values():  # warm-up at a length no side measures
        fn(545), fn(545)
    first = {k: [] for k in sides}
    second = {k: [] for k in sides}
    for i in range(args.lengths):  # interleaved: the host's drift hits every side alike
        for k, (fn, lengths) in sides.items():
            first[k].append(fn(lengths[i]))
            second[k].append(fn(lengths[i]))
    med = {k: (statistics.median(first[k]) * 1e3, statistics.median(second[k]) * 1e3) for k in sides}
    cfg = {"preset": "bench-cpu", "dtype": args.dtype, "threads": torch.get_num_threads(),
           "lengths": f"{args.lengths} new lengths per side, 561-{max(max(v[1]) for v in sides.values())}",
           "row_bucket": bucket}
    eng = med["engine (rows bucketed)"]
    rows = []
    for base in ("engine, ROW_BUCKET=1", "transformers reference"):
        rows.append(row(cfg, "prefill_ms_first_at_new_length", eng[0], base, med[base][0], "ms", False))
        rows.append(row(cfg, "prefill_ms_second_at_that_length", eng[1], base, med[base][1], "ms", False))
    print(f"bench-cpu {args.dtype}, {torch.get_num_threads()} threads, median ms over {args.lengths} lengths")
    for k, (a, b) in med.items():
        print(f"  {k:28s} first {a:7.1f}   second {b:7.1f}")
    report_cpu("prefill-lengths", rows, ["dtype"], args.dtype, args.out)


if __name__ == "__main__":
    main()
