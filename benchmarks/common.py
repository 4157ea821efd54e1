"""Result rows, device names and result files in the BENCHMARKS.md format (shared by benchmarks).

A result file is ``benchmarks/results/<benchmark>-<device>.json``: ``{"benchmark", "device",
"commit", "date", "rows": [{"config", "metric", "engine", "baseline", "baseline_value", "ratio",
"unit"}]}`` where ``ratio`` is always "the engine is better by" (> 1 is good).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def row(config: dict, metric: str, engine: float, baseline: str, baseline_value: float, unit: str,
        higher_is_better: bool) -> dict:
    """One result row; ``ratio`` = engine/baseline for rates, baseline/engine for times."""
    if engine <= 0 or baseline_value <= 0:
        raise ValueError(f"{metric}: engine ({engine}) and baseline ({baseline_value}) must be positive")
    ratio = engine / baseline_value if higher_is_better else baseline_value / engine
    return {"config": config, "metric": metric, "engine": significant(engine), "baseline": baseline,
            "baseline_value": significant(baseline_value), "ratio": round(ratio, 3), "unit": unit}


def significant(x: float, digits: int = 6) -> float:
    """x to ``digits`` significant digits: a tiny model's 2 ms kept to 4 decimal places (0.0022)
    had lost 2% of itself, and the ratio no longer followed from the stored values."""
    return float(f"{x:.{digits}g}")


def median_ms(fn, calls: int, warmup: int = 0) -> float:
    """Median wall time of ``calls`` calls of fn() in ms (perf_counter), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def device_name(device: str = "cpu") -> str:
    """"cpu-<n>core" or the CUDA device's name (e.g. "NVIDIA H100 80GB HBM3")."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{os.cpu_count()}core"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(benchmark: str, device: str, rows: list[dict], out: Path | None = None) -> Path:
    """Write the result file (default ``benchmarks/results/<benchmark>-<device>.json``)."""
    result = {"benchmark": benchmark, "device": device, "commit": git_commit(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    out = out or RESULTS / f"{benchmark}-{device.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def report_cpu(benchmark: str, rows: list[dict], config_keys: list[str], dtype: str,
               out: Path | None = None) -> Path:
    """Print ``rows`` as a table and write them to ``out`` or
    ``benchmarks/results/<benchmark>-cpu-<n>core[-<dtype>].json`` (bfloat16 unsuffixed)."""
    print(format_table(rows, config_keys))
    device = device_name("cpu")
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    path = write_result(benchmark, device, rows, out or RESULTS / f"{benchmark}-{device}{suffix}.json")
    print(f"wrote {path}")
    return path


def format_table(rows: list[dict], config_keys: list[str] | None = None) -> str:
    """The rows as a fixed-width text table (metric, chosen config keys, values, ratio)."""
    keys = config_keys if config_keys is not None else sorted({k for r in rows for k in r["config"]})
    head = ["metric", *keys, "engine", "baseline", "unit", "ratio", "baseline is"]
    body = [[r["metric"], *(str(r["config"].get(k, "")) for k in keys), f"{r['engine']:.4g}",
             f"{r['baseline_value']:.4g}", r["unit"], f"{r['ratio']:.2f}x", r["baseline"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines)
