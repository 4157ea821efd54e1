"""CPU prefill attention in bfloat16: the C++ AMX flash kernel vs torch's SDPA (its flash kernel).

    python benchmarks/attention_cpu.py [--repeats 5] [--quick] [--out FILE]

Shapes are the engine's: the bench-cpu ViT (16 frames x 257 tokens, 4 heads of 64) and LLM
prompt (593 tokens causal, 16 heads of 64), long-video prompts (2k / 8k tokens causal), and
ST-LLM-7B's (ViT-g: 16 heads of 88; Vicuna-7B: 32 heads of 128). Both sides get the same
[tokens, heads, d] bfloat16 tensors; torch's gets [B, H, L, d] views as the engine passed them
before. Each repeat times both kernels back to back (medians of the repeats); the accuracy
columns are the max abs error of each against float32 attention of the same inputs. Writes
``benchmarks/results/attention-cpu-<n>core.json``; ratio = the AMX kernel faster by.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms, report_cpu, row  # noqa: E402

# (name, sequences, tokens each, heads, head dim, causal)
SHAPES = [
    ("bench-cpu ViT", 16, 257, 4, 64, False),
    ("bench-cpu prompt", 1, 593, 16, 64, True),
    ("long video 2k", 1, 2048, 16, 64, True),
    ("long video 8k", 1, 8192, 16, 64, True),
    ("ST-LLM-7B ViT-g", 16, 257, 16, 88, False),
    ("ST-LLM-7B prompt", 1, 593, 32, 128, True),
]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per shape")
    ap.add_argument("--quick", action="store_true", help="skip the 8k shape")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from stllm_engine.ops import _backend

    C = _backend.cpp()
    if not C.amx_attention_available():
        sys.exit("this CPU has no AMX-BF16 tiles: the AMX attention kernel cannot run here")
    rows = []
    for name, B, L, H, d, causal in SHAPES:
        if args.quick and L > 4096:
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B * L, H, d, generator=g).to(torch.bfloat16) for _ in range(3))
        cu = torch.arange(0, B * L + 1, L, dtype=torch.int32)
        scale = 1.0 / math.sqrt(d)
        view = lambda t: t.view(B, L, H, d).transpose(1, 2)  # noqa: E731
        qh, kh, vh = view(q), view(k), view(v)

        def amx():
            return C.flash_attention_amx(q, k, v, cu, cu, causal, scale)

        def sdpa():
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)

        calls = 3 if L > 4096 else 15
        amx(), sdpa()  # warm-up
        t_amx, t_sdpa = [], []
        for _ in range(args.repeats):
            t_amx.append(median_ms(amx, calls))
            t_sdpa.append(median_ms(sdpa, calls))
        ref = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), is_causal=causal, scale=scale)
        err_amx = (view(amx()).float() - ref).abs().max().item()
        err_sdpa = (sdpa().float() - ref).abs().max().item()
        flop = 4 * B * H * L * L * d * (0.5 if causal else 1.0)
        e, b = statistics.median(t_amx), statistics.median(t_sdpa)
        cfg = dict(shape=name, seqs=B, tokens=L, heads=H, head_dim=d, causal=causal, dtype="bfloat16",
                   threads=torch.get_num_threads(), amx_tflops=round(flop / e / 1e9, 3),
                   sdpa_tflops=round(flop / b / 1e9, 3), amx_max_err=round(err_amx, 5),
                   sdpa_max_err=round(err_sdpa, 5), repeats=args.repeats)
        rows.append(row(cfg, "attention time", e, "torch SDPA (CPU flash)", b, "ms", higher_is_better=False))
        print(f"{name}: AMX {e:.2f} ms ({cfg['amx_tflops']} TFLOP/s, err {err_amx:.4f}) vs SDPA {b:.2f} ms "
              f"({cfg['sdpa_tflops']} TFLOP/s, err {err_sdpa:.4f}): {b / e:.2f}x", flush=True)
    report_cpu("attention", rows, ["shape", "tokens", "heads", "head_dim", "amx_tflops", "sdpa_tflops"],
               "bfloat16", args.out)


if __name__ == "__main__":
    main()
