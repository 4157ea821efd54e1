"""Kernel benchmark: the engine's ops vs the plain-torch way, CPU (and GPU when CUDA is present).

CPU rows: C++ paged decode vs gather-then-SDPA, C++ pack vs ``x[keep]``, C++ KV write vs
``index_copy_``, the fused element-wise ops, the AMX gate_up + SwiGLU kernel, the GELU paths.
GPU rows: Triton varlen flash attention TFLOP/s vs torch SDPA (and flash-attn if importable),
paged decode GB/s vs measured copy bandwidth. Prints a table and writes
``benchmarks/results/kernels-<device>.json`` (BENCHMARKS.md format; ratio = engine is better by).

    python benchmarks/kernels.py [--quick] [--no-gpu | --no-cpu] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from stllm_engine import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms, row, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cpu_time_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms after warm-up (perf_counter loop)."""
    return median_ms(fn, repeats, warmup)


def gpu_time_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def paged_setup(B, ctx, Hq, Hk, d, bs, dtype, device):
    per_seq = (ctx + bs - 1) // bs
    k_cache = torch.randn(B * per_seq, bs, Hk, d, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(B * per_seq, device=device).view(B, per_seq).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, d, device=device).to(dtype)
    return q, k_cache, v_cache, tables, lens


def gather_sdpa_decode(q, k_cache, v_cache, tables, lens):
    """The naive torch path: gather each sequence's K/V into contiguous tensors, then SDPA."""
    B, Hq, d = q.shape
    Hk, outs = k_cache.shape[2], []
    for b, n in enumerate(lens.tolist()):
        nb = (n + k_cache.shape[1] - 1) // k_cache.shape[1]
        idx = tables[b, :nb].long()
        k = k_cache[idx].reshape(-1, Hk, d)[:n].transpose(0, 1).unsqueeze(0)
        v = v_cache[idx].reshape(-1, Hk, d)[:n].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(q[b].view(1, Hq, 1, d), k, v, enable_gqa=Hq != Hk))
    return torch.cat(outs).view(B, Hq, d)


def cpu_rows(quick: bool) -> list[dict]:
    reps = 3 if quick else 9
    rows = []
    shapes = [(1, 512, 32, 32, torch.float32), (8, 512, 32, 32, torch.float32),
              (1, 4096, 32, 32, torch.float32), (8, 4096, 32, 32, torch.float32),
              (8, 4096, 32, 8, torch.float32), (8, 4096, 32, 32, torch.bfloat16)]
    if quick:
        shapes = [(1, 512, 32, 32, torch.float32), (8, 4096, 32, 32, torch.float32)]
    for B, ctx, Hq, Hk, dtype in shapes:
        args = paged_setup(B, ctx, Hq, Hk, 128, 16, dtype, "cpu")
        eng = cpu_time_ms(lambda: ops.paged_decode_attention(*args), reps)
        base = cpu_time_ms(lambda: gather_sdpa_decode(*args), reps)
        cfg = dict(op="paged_decode_attention", batch=B, context=ctx, q_heads=Hq, kv_heads=Hk,
                   head_dim=128, block_size=16, dtype=str(dtype).split(".")[-1], repeats=reps)
        rows.append(row(cfg, "latency", eng, "torch gather + SDPA", base, "ms", False))
        del args
    x = torch.randn(4, 2048, 4096)
    keep = torch.rand(4, 2048) < 0.5
    eng = cpu_time_ms(lambda: ops.pack_by_mask(x, keep), reps)
    base = cpu_time_ms(lambda: x[keep], reps)
    rows.append(row(dict(op="pack_by_mask", B=4, L=2048, D=4096, keep=0.5, dtype="float32", repeats=reps),
                    "latency", eng, "torch x[keep]", base, "ms", False))
    for N in (8, 4096):
        k_cache = torch.zeros(512, 16, 32, 128)
        v_cache = torch.zeros_like(k_cache)
        k, v = torch.randn(N, 32, 128), torch.randn(N, 32, 128)
        slots = torch.randperm(512 * 16)[:N]
        eng = cpu_time_ms(lambda: ops.write_kv_cache(k, v, k_cache, v_cache, slots), reps * 3)

        def index_copy():
            k_cache.view(-1, 32, 128).index_copy_(0, slots, k)
            v_cache.view(-1, 32, 128).index_copy_(0, slots, v)
        base = cpu_time_ms(index_copy, reps * 3)
        rows.append(row(dict(op="write_kv_cache", tokens=N, kv_heads=32, head_dim=128, block_size=16,
                             dtype="float32", repeats=reps * 3), "latency", eng, "torch index_copy_", base, "ms", False))
    rows += elementwise_rows(reps)
    rows += swiglu_gemm_rows(reps)
    rows += gelu_rows(reps)
    return rows


def swiglu_gemm_rows(reps: int) -> list[dict]:
    """The CPU prefill MLP's gate_up GEMM + SwiGLU in one AMX kernel (``csrc/amx_swiglu_cpu.cpp``)
    vs the unfused path it replaces (oneDNN's packed GEMM, then the C++ SwiGLU) and vs torch
    (``F.linear``, then ``F.silu(gate) * up``), bfloat16: bench-cpu ([rows, 1024] -> 2 x 2816) at a
    prefill's 608 rows and a 2048-row chunk, over 8 weights in turn (as a prefill meets its layers:
    weights from memory), and ST-LLM-7B ([608, 4096] -> 2 x 11008, one 180 MB weight)."""
    from stllm_engine.model import fused_swiglu
    from stllm_engine.model.packed_linear import PACK_ROWS_HINT, packing_available
    from stllm_engine.ops import elementwise as ew
    from stllm_engine.ops._backend import cpp

    if not fused_swiglu.available():
        return []
    rows = []
    for name, n, k, inter, nw in (("bench-cpu LLM", 608, 1024, 2816, 8), ("bench-cpu LLM", 2048, 1024, 2816, 8),
                                  ("ST-LLM-7B LLM", 608, 4096, 11008, 1)):
        g = torch.Generator().manual_seed(n + inter)
        x = torch.randn(n, k, generator=g).bfloat16()
        ws = [(torch.randn(2 * inter, k, generator=g) / k ** 0.5).bfloat16() for _ in range(nw)]
        if not packing_available(ws[0]):
            continue
        fused_w = [cpp().amx_swiglu_pack(w) for w in ws]
        onednn_w = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in ws]

        def each(fn):
            return lambda: [fn(i) for i in range(nw)]

        fused = each(lambda i: cpp().amx_swiglu(x, fused_w[i], k, inter))
        unfused = each(lambda i: ew.silu_and_mul(torch.ops.mkldnn._linear_pointwise(x, onednn_w[i], None, "none", [], "")))
        twin = each(lambda i: ew.silu_and_mul_ref(F.linear(x, ws[i])))
        r = max(3, reps // nw)
        t_fused, t_unfused, t_twin = (t / nw for t in interleaved_ms([fused, unfused, twin], r))
        cfg = dict(op="gate_up gemm + swiglu (amx, bf16)", shape=name, rows=n, hidden=k, intermediate=inter,
                   weights_in_turn=nw, dtype="bfloat16", repeats=r)
        rows.append(row(cfg, "latency", t_fused, "oneDNN packed GEMM + C++ SwiGLU", t_unfused, "ms", False))
        rows.append(row(cfg, "latency", t_fused, "torch F.linear + F.silu(gate) * up", t_twin, "ms", False))
    return rows


def gelu_rows(reps: int) -> list[dict]:
    """bfloat16 exact GELU of the vision MLPs: the table lookup (``ops.elementwise.gelu_``) vs
    torch's ``F.gelu``, and fc1 + GELU as packed GEMM + bias, then the lookup vs the same GEMM
    with oneDNN's GELU post-op (the two ``calibrate_gelu`` picks from) and vs torch's
    ``F.gelu(F.linear(...))``, at the fc1 of
    bench-cpu's ViT ([4112, 256] -> 1117) and of ST-LLM-7B's ViT-g ([4112, 1408] -> 6144). Under
    the engine's malloc settings (``engine/cpu_malloc.py``, as in an engine process; process-wide,
    so these rows run last): with glibc's defaults every new 50 MB output of the ViT-g shape is a
    fresh mapping, and its page faults, not the GELU, dominated torch's time (27 ms)."""
    from stllm_engine.engine.cpu_malloc import tune_malloc
    from stllm_engine.model.packed_linear import PackedLinearGELU, packing_available
    from stllm_engine.ops import elementwise as ew

    tune_malloc()
    rows = []
    for name, width, hidden in (("bench-cpu ViT", 256, 1117), ("ST-LLM-7B ViT-g", 1408, 6144)):
        g = torch.Generator().manual_seed(hidden)
        x = torch.randn(4112, width, generator=g).bfloat16()
        lin = torch.nn.Linear(width, hidden).bfloat16()
        cfg = dict(op="gelu (bf16)", shape=name, rows=4112, width=width, hidden=hidden, dtype="bfloat16",
                   repeats=reps)
        with torch.no_grad():
            h = F.linear(x, lin.weight, lin.bias)
            eng = cpu_time_ms(lambda: ew.gelu_(h.clone()), reps) - cpu_time_ms(h.clone, reps)
            rows.append(row(dict(cfg, op="gelu_ table (in place)"), "latency", eng, "torch F.gelu",
                            cpu_time_ms(lambda: F.gelu(h), reps), "ms", False))
            if not packing_available(lin.weight):
                continue
            mod = PackedLinearGELU(lin)
            # interleaved (the two differ by a few % at ViT-g, less than this host drifts)
            table, post, twin = interleaved_ms([lambda: mod._gelu(x, True), lambda: mod._gelu(x, False),
                                                lambda: F.gelu(F.linear(x, lin.weight, lin.bias))], reps * 2)
            cfg = dict(cfg, op="fc1 + gelu (table)", repeats=reps * 2)
            rows.append(row(cfg, "latency", table, "oneDNN GEMM + GELU post-op", post, "ms", False))
            rows.append(row(cfg, "latency", table, "torch F.gelu(F.linear)", twin, "ms", False))
    return rows


def interleaved_ms(fns, repeats: int) -> list[float]:
    """Median ms of each fn, called in turn (rotating the order) ``repeats`` times after a warm-up."""
    from stllm_engine.model.packed_linear import interleaved_medians

    return [t * 1e3 for t in interleaved_medians(fns, repeats)]


def elementwise_cases(N: int, hidden: int, head_dim: int, inter: int, dtype: torch.dtype, device: str = "cpu"):
    """{op: (fused, torch twin)} of the LLM's element-wise ops on N rows of a model ``hidden``
    wide (MHA heads of ``head_dim``, MLP ``inter``): add+RMSNorm, rotary on the q/k part of a qkv
    row, SwiGLU. Inputs are drawn on the CPU (seeded by N) and moved to ``device``."""
    from stllm_engine.model.llama import rotary_cos_sin
    from stllm_engine.ops import elementwise as ew

    g = torch.Generator().manual_seed(N)
    x, res = (torch.randn(N, hidden, generator=g).to(device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    qkv = torch.randn(N, 3 * hidden, generator=g).to(device, dtype)
    heads = 2 * hidden // head_dim  # q and k
    cos, sin = rotary_cos_sin(torch.arange(N, device=device), head_dim, 10000.0, dtype)
    gu = torch.randn(N, 2 * inter, generator=g).to(device, dtype)
    return {
        "add_rms_norm": (lambda: ew.add_rms_norm(x, res, w, 1e-6), lambda: ew.rms_norm_ref(res + x, w, 1e-6)),
        "rotary_qk_": (lambda: ew.rotary_qk_(qkv, heads, head_dim, cos, sin),
                       lambda: ew.rotate_ref(qkv[:, :2 * hidden].view(N, heads, head_dim), cos, sin)),
        "silu_and_mul": (lambda: ew.silu_and_mul(gu), lambda: ew.silu_and_mul_ref(gu)),
    }


def elementwise_rows(reps: int) -> list[dict]:
    """Fused C++ element-wise ops vs the torch op-by-op twins, at a bench-cpu prefill (593 rows of
    the 1024-wide, 16x64-head, 2816-MLP LLM) and a batch-8 decode step."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for N in (8, 593):
            for op, (fused, twin) in elementwise_cases(N, 1024, 64, 2816, dtype).items():
                eng, base = cpu_time_ms(fused, reps * 3), cpu_time_ms(twin, reps * 3)
                cfg = dict(op=op, rows=N, hidden=1024, dtype=str(dtype).removeprefix("torch."), repeats=reps * 3)
                rows.append(row(cfg, "latency", eng, "torch op-by-op twin", base, "ms", False))
    return rows


def gpu_rows(quick: bool) -> list[dict]:
    rows, dev, H, d = [], "cuda", 32, 128
    total = 32768
    seqlens = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    for L in seqlens:
        B = max(1, total // L)
        q, k, v = (torch.randn(B * L, H, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * L
        flops = 4 * B * H * L * L * d / 2  # causal: half the score matrix
        eng = gpu_time_ms(lambda: ops.varlen_attention(q, k, v, cu, cu, L, L, True))
        qb, kb, vb = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))
        base = gpu_time_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))
        cfg = dict(op="varlen_attention", seqlen=L, batch=B, heads=H, head_dim=d, causal=True, dtype="bfloat16")
        rows.append(row(cfg, "throughput", flops / eng / 1e9, "torch SDPA", flops / base / 1e9, "TFLOP/s", True))
        if flash_attn_varlen_func is not None:
            fa = gpu_time_ms(lambda: flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True))
            rows.append(row(cfg, "throughput", flops / eng / 1e9, "flash-attn", flops / fa / 1e9, "TFLOP/s", True))
        del q, k, v, qb, kb, vb
    big = torch.empty(1 << 28, device=dev, dtype=torch.float32)  # 1 GiB
    copy_gbs = 2 * big.numel() * 4 / (gpu_time_ms(lambda: big.clone()) * 1e6)
    del big
    for B, ctx in ((1, 32768), (8, 4096)):
        args = paged_setup(B, ctx, 32, 8, d, 16, torch.bfloat16, dev)
        bytes_read = 2 * B * ctx * 8 * d * 2
        eng = gpu_time_ms(lambda: ops.paged_decode_attention(*args))
        cfg = dict(op="paged_decode_attention", batch=B, context=ctx, q_heads=32, kv_heads=8, head_dim=d,
                   block_size=16, dtype="bfloat16")
        rows.append(row(cfg, "bandwidth", bytes_read / eng / 1e6, "torch clone copy bandwidth", copy_gbs, "GB/s", True))
        base = gpu_time_ms(lambda: gather_sdpa_decode(*args))
        rows.append(row(cfg, "latency", eng, "torch gather + SDPA", base, "ms", False))
        del args
    return rows + gpu_elementwise_rows()


def gpu_elementwise_rows() -> list[dict]:
    """Fused Triton element-wise ops vs the torch op-by-op twins at the 7B LLM's widths (4096
    hidden, 32x128 heads, 11008 MLP), bf16: a batch-8 decode step and a 4096-row prefill."""
    rows = []
    for N in (8, 4096):
        for op, (fused, twin) in elementwise_cases(N, 4096, 128, 11008, torch.bfloat16, "cuda").items():
            cfg = dict(op=op, rows=N, hidden=4096, dtype="bfloat16")
            rows.append(row(cfg, "latency", gpu_time_ms(fused), "torch op-by-op twin", gpu_time_ms(twin), "ms", False))
    return rows


def device_name(use_gpu: bool) -> str:
    if use_gpu:
        return torch.cuda.get_device_name()
    return f"cpu-{os.cpu_count()}core"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--no-gpu", action="store_true", help="CPU rows only even if CUDA is available")
    ap.add_argument("--no-cpu", action="store_true", help="GPU rows only (a lent GPU machine's time is short)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/kernels-<device>.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    use_gpu = torch.cuda.is_available() and not args.no_gpu
    if args.no_cpu and not use_gpu:
        ap.error("--no-cpu needs a CUDA device (and no --no-gpu)")
    rows = ([] if args.no_cpu else cpu_rows(args.quick)) + (gpu_rows(args.quick) if use_gpu else [])
    device = device_name(use_gpu)
    out = write_result("kernels", device, rows, args.out)
    short = {"batch": "B", "context": "ctx", "q_heads": "Hq", "kv_heads": "Hk", "head_dim": "d",
             "block_size": "bs", "seqlen": "L", "heads": "H", "tokens": "N"}
    table = []
    for r in rows:
        c = {k: v for k, v in r["config"].items() if k not in ("op", "repeats")}
        cfg = " ".join(f"{short.get(k, k)}={v}" for k, v in c.items())
        table.append((r["config"]["op"], cfg, r))
    w = max(len(t[1]) for t in table) + 2
    print(f"{'op':<24}{'config':<{w}}{'engine':>11}{'baseline':>11}{'unit':>9}{'ratio':>7}  baseline")
    for op, cfg, r in table:
        print(f"{op:<24}{cfg:<{w}}{r['engine']:>11.3f}{r['baseline_value']:>11.3f}{r['unit']:>9}"
              f"{r['ratio']:>7.2f}  {r['baseline']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
