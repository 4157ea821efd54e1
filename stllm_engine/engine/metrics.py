"""Request metrics of an engine, and their Prometheus text exposition (``GET /metrics``).

:class:`EngineMetrics` is updated once per finished request (:meth:`LLMEngine._output`): requests
by finish reason, prompt / cached prompt / generated tokens, and latency histograms (time to first
token, whole request, time per output token, and each stage of the video's way in: frame decode,
ViT, Q-Former, prefill). Like every other counter of the engine it starts again at
``reset_state`` (so a warm-up leaves no trace). :func:`prometheus_text` renders it with the
engine's gauges (running / waiting requests, KV blocks in use) and cache counters in the text
format Prometheus scrapes (version 0.0.4), names prefixed ``stllm_``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from stllm_engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.5, 1.0, 2.5)
STAGES = ("frame_decode", "vision", "qformer", "prefill")
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Histogram:
    """Observations counted into upper-bounded buckets (``le``), plus their sum and count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"Histogram buckets must be increasing and distinct, got {self.buckets}")
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Histogram.observe: expected a finite value >= 0, got {value}")
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations <= le) for every bucket and +Inf, as Prometheus lists them."""
        out, total = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += n
            out.append((le, total))
        return out


class EngineMetrics:
    """Counters and histograms of finished requests (see the module doc)."""

    def __init__(self) -> None:
        self.finished = {r: 0 for r in FINISH_REASONS}
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.stages = {s: Histogram(LATENCY_BUCKETS) for s in STAGES}

    def observe(self, out: RequestOutput) -> None:
        """Count one finished request (called once, with its final output)."""
        reason = out.finish_reason if out.finish_reason in self.finished else "error"
        self.finished[reason] += 1
        self.prompt_tokens += out.num_prompt_tokens
        self.cached_prompt_tokens += out.num_cached_tokens
        self.generation_tokens += len(out.token_ids)
        t = out.timings
        self.e2e.observe(max(t.total, 0.0))
        if out.error is not None or not out.token_ids:
            return  # no first token: its stages may not have run
        self.ttft.observe(t.ttft)
        if t.num_decode_tokens > 0:
            self.per_token.observe(t.decode / t.num_decode_tokens)
        for s in STAGES:
            self.stages[s].observe(max(getattr(t, s), 0.0))

    def as_dict(self) -> dict:
        return {"requests_finished": dict(self.finished), "prompt_tokens": self.prompt_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens, "generation_tokens": self.generation_tokens,
                "time_to_first_token": {"count": self.ttft.count, "sum": self.ttft.sum},
                "e2e_request_latency": {"count": self.e2e.count, "sum": self.e2e.sum}}


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class _Writer:
    def __init__(self, base: dict) -> None:
        self.base = base  # labels on every sample (the model)
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP stllm_{name} {help_text}", f"# TYPE stllm_{name} {kind}"]

    def sample(self, name: str, value: float, **labels) -> None:
        self.lines.append(f"stllm_{name}{_labels({**self.base, **labels})} {_num(value)}")

    def histogram(self, name: str, h: Histogram, **labels) -> None:
        for le, n in h.cumulative():
            self.sample(f"{name}_bucket", n, **labels, le=le)
        self.sample(f"{name}_sum", h.sum, **labels)
        self.sample(f"{name}_count", h.count, **labels)


def prometheus_text(metrics: EngineMetrics, stats: dict, model: str) -> str:
    """The Prometheus text exposition of ``metrics`` and ``LLMEngine.stats()``."""
    w = _Writer({"model": model})
    kv, vc = stats["kv"], stats["vision_cache"]
    w.family("requests_running", "gauge", "Requests being prefilled or decoded.")
    w.sample("requests_running", stats["running"])
    w.family("requests_waiting", "gauge", "Requests waiting for KV blocks or a batch slot.")
    w.sample("requests_waiting", stats["waiting"])
    w.family("kv_cache_usage_ratio", "gauge", "Share of the KV pool's blocks held by requests.")
    w.sample("kv_cache_usage_ratio", kv["used_blocks"] / max(kv["num_blocks"], 1))
    w.family("requests_finished_total", "counter", "Finished requests by finish reason.")
    for reason, n in metrics.finished.items():
        w.sample("requests_finished_total", n, finish_reason=reason)
    for name, value, text in (
            ("prompt_tokens_total", metrics.prompt_tokens, "Prompt positions (video tokens + text) of finished requests."),
            ("prefix_cache_hit_tokens_total", metrics.cached_prompt_tokens,
             "Prompt positions of finished requests whose KV came from the prefix cache."),
            ("generation_tokens_total", metrics.generation_tokens, "Tokens generated by finished requests."),
            ("preemptions_total", stats["preemptions"], "Sequences preempted (recomputed) for lack of KV blocks."),
            ("vision_cache_hits_total", vc["hits"], "Videos whose ViT features came from the vision cache."),
            ("vision_cache_misses_total", vc["misses"], "Videos whose ViT features had to be computed."),
            ("video_tokens_cache_hits_total", vc.get("token_hits", 0),
             "Requests whose video tokens (Q-Former output) came from the vision cache.")):
        w.family(name, "counter", text)
        w.sample(name, value)
    w.family("vision_cache_bytes", "gauge", "Bytes held by the vision cache.")
    w.sample("vision_cache_bytes", vc["bytes"])
    for name, h, text in (("time_to_first_token_seconds", metrics.ttft, "Arrival to first token."),
                          ("e2e_request_latency_seconds", metrics.e2e, "Arrival to finish."),
                          ("time_per_output_token_seconds", metrics.per_token,
                           "Decode time per token after the first.")):
        w.family(name, "histogram", text)
        w.histogram(name, h)
    w.family("request_stage_seconds", "histogram",
             "Time per stage of a request: frame_decode, vision (ViT), qformer, prefill.")
    for stage, h in metrics.stages.items():
        w.histogram("request_stage_seconds", h, stage=stage)
    return "\n".join(w.lines) + "\n"
