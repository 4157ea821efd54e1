"""One LLM decode step on the CPU: the compiled layer loop vs the Python one vs the reference.

    python benchmarks/decode_step.py [--dtype bfloat16|float32] [--repeats 5] [--out FILE]

A decode step moves one token a sequence through every layer and the LM head. The engine runs it
through ``llama_decode`` (``csrc/llama_decode_cpu.cpp``, one call for all layers); with
``STLLM_CPU_COMPILED_DECODE=0`` the same kernels run from the Python layer loop. Both sides are
timed in one process, interleaved (the variable is flipped between repeats), on the bench-cpu
LLM with random K/V in the paged cache at the given context length; batch 1 is also compared with
the transformers reference's forward of one token over a ``DynamicCache`` of that length
(cropped back after every step). Forward + LM head only: no sampling, no scheduler. Medians;
ratio = engine (compiled) better by. Writes
``benchmarks/results/decode-step-<device>[-<dtype>].json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from common import median_ms, report_cpu, row  # noqa: E402

CONTEXTS = (600, 2000)
BATCHES = (1, 8)
STEPS = 20  # timed steps per repeat and side


def timed(fn, steps: int) -> float:
    """Median seconds of ``steps`` calls."""
    return median_ms(fn, steps) / 1e3


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per configuration")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from transformers import DynamicCache

    from stllm_engine.api import STLLM
    from stllm_engine.default_model import cache_dir
    from stllm_engine.model import cpu_decode
    from stllm_engine.model.context import AttentionContext, reset_context, set_context
    from stllm_engine.reference import ReferenceSTLLM

    folder = e2e.checkpoint_for("bench-cpu", cache_dir() / "bench")
    bs = 16
    blocks_needed = max(BATCHES) * (-(-(max(CONTEXTS) + 1) // bs))
    m = STLLM.from_pretrained(folder, device="cpu", dtype=dtype, block_size=bs,
                              num_kv_blocks=blocks_needed).engine.model
    ref = ReferenceSTLLM.from_pretrained(folder, dtype=dtype, device="cpu")
    hidden = m.config.llm.hidden_size
    m.kv_cache.copy_(torch.randn(m.kv_cache.shape).to(dtype))

    def engine_step(batch: int, ctx: int):
        per = -(-(ctx + 1) // bs)
        tables = torch.arange(batch * per, dtype=torch.int32).view(batch, per)
        slots = (tables[:, ctx // bs].long() * bs + ctx % bs)
        x = torch.randn(batch, hidden).to(dtype)
        context = AttentionContext(is_prefill=False, slot_mapping=slots,
                                   context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32),
                                   block_tables=tables, has_prefix=True)
        positions = torch.full((batch,), ctx, dtype=torch.int64)
        rows = torch.arange(batch)

        def step():
            set_context(context)
            try:
                return m.compute_logits(m(x, positions, out_rows=rows))
            finally:
                reset_context()
        return step

    def reference_step(ctx: int):
        cache = DynamicCache()
        ref.llm(inputs_embeds=torch.randn(1, ctx, hidden).to(dtype), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
        x = torch.randn(1, 1, hidden).to(dtype)

        def step():
            out = ref.llm(inputs_embeds=x, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # back to ctx tokens
            return out.logits
        return step

    def with_compiled(on: bool, fn):
        def run():
            os.environ[cpu_decode.ENV] = "1" if on else "0"
            try:
                return fn()
            finally:
                os.environ.pop(cpu_decode.ENV, None)
        return run

    rows, lines = [], []
    for ctx in CONTEXTS:
        for batch in BATCHES:
            step = engine_step(batch, ctx)
            sides = {"compiled": with_compiled(True, step), "python loop": with_compiled(False, step)}
            if batch == 1:
                sides["reference"] = reference_step(ctx)
            for fn in sides.values():  # warm-up
                for _ in range(3):
                    fn()
            got = {k: [] for k in sides}
            for _ in range(args.repeats):
                for k, fn in sides.items():
                    got[k].append(timed(fn, STEPS))
            med = {k: statistics.median(v) * 1e3 for k, v in got.items()}
            cfg = {"preset": "bench-cpu", "dtype": args.dtype, "threads": torch.get_num_threads(),
                   "context": ctx, "batch": batch, "steps": f"{args.repeats} x {STEPS}, interleaved"}
            rows.append(row(cfg, "decode_step_ms", med["compiled"], "engine, Python layer loop "
                            f"({cpu_decode.ENV}=0)", med["python loop"], "ms", False))
            if "reference" in med:
                rows.append(row(cfg, "decode_step_ms", med["compiled"], "transformers reference forward "
                                "(DynamicCache)", med["reference"], "ms", False))
            lines.append(f"  context {ctx:5d} batch {batch}: " + "  ".join(f"{k} {v:6.2f} ms" for k, v in med.items()))
    print(f"bench-cpu {args.dtype}, {torch.get_num_threads()} threads, decode step (forward + LM head), medians")
    print("\n".join(lines))
    report_cpu("decode-step", rows, ["dtype", "context", "batch"], args.dtype, args.out)


if __name__ == "__main__":
    main()
