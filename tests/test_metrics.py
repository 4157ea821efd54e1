"""Engine request metrics and their Prometheus exposition: counts equal the outputs the requests
returned (finished, failed, aborted; tokens; cached prompt positions), histograms are well formed,
reset_state zeroes them, and GET /metrics serves them. Tiny checkpoint, real encoded video."""
from __future__ import annotations

import http.client
import json
import re

import pytest

from stllm_engine.api import STLLM
from stllm_engine.engine.metrics import EngineMetrics, Histogram, prometheus_text
from stllm_engine.outputs import RequestOutput, RequestTimings
from stllm_engine.server import ServerThread
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_video

Q = "What happens in the video?"
SAMPLE = re.compile(r'^(stllm_[a-z0-9_]+)(\{[^}]*\})? (-?[0-9.]+(?:e[-+]?[0-9]+)?|\+Inf)$')


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=4)
    return ckpt, [write_video(d / f"v{i}.mp4", num_frames=12, size=(96, 72), seed=i) for i in range(2)]


def parse(text: str) -> dict:
    """{(name, labels): value} of an exposition; checks every line's form and each family's
    HELP / TYPE lines."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"bad exposition line {line!r}"
        name, labels = m.group(1), m.group(2) or ""
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no # TYPE line"
        samples[(name, labels)] = float(m.group(3))
    return samples


@pytest.mark.parametrize("values", [[], [0.0], [0.005, 0.0051, 3.0, 1e6], [0.1] * 5])
def test_histogram_counts_cumulatively(values):
    h = Histogram((0.005, 0.1, 2.5))
    for v in values:
        h.observe(v)
    cum = dict(h.cumulative())
    assert list(cum) == ["0.005", "0.1", "2.5", "+Inf"]
    for le in ("0.005", "0.1", "2.5"):
        assert cum[le] == sum(v <= float(le) for v in values)
    assert cum["+Inf"] == h.count == len(values) and h.sum == pytest.approx(sum(values))


def test_histogram_refuses_bad_input():
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))
    with pytest.raises(ValueError, match="finite value"):
        Histogram((1.0,)).observe(float("nan"))
    with pytest.raises(ValueError, match="finite value"):
        Histogram((1.0,)).observe(-1.0)


def test_metrics_equal_what_the_requests_returned(files):
    ckpt, videos = files
    llm = STLLM.from_pretrained(ckpt)
    eng = llm.engine
    outs = llm.generate([(str(videos[0]), Q), (str(videos[1]), Q), ("/no/such/clip.mp4", Q)],
                        llm.params(max_new_tokens=5, stop=[]))
    rid = eng.add_request(str(videos[0]), "Which shape moves?", llm.params(max_new_tokens=5))
    assert eng.abort(rid)
    outs += [o for o in eng.step() if o.request_id == rid]
    again = llm.generate([(str(videos[0]), Q)], llm.params(max_new_tokens=5, stop=[]))  # prefix + token hit
    outs += again
    m = eng.metrics
    reasons = [o.finish_reason for o in outs]
    assert reasons.count("error") == 1 and reasons.count("abort") == 1
    assert m.finished == {r: reasons.count(r) for r in ("stop", "length", "abort", "error")}
    assert m.prompt_tokens == sum(o.num_prompt_tokens for o in outs)
    assert m.generation_tokens == sum(len(o.token_ids) for o in outs)
    assert m.cached_prompt_tokens == again[0].num_cached_tokens > 0
    answered = [o for o in outs if o.error is None and o.token_ids]
    assert m.ttft.count == len(answered) == 3 and m.e2e.count == len(outs) == 5
    assert m.ttft.sum == pytest.approx(sum(o.timings.ttft for o in answered))
    assert all(h.count == 3 for h in m.stages.values())
    assert m.stages["vision"].sum == pytest.approx(sum(o.timings.vision for o in answered))
    # the exposition says the same
    s = parse(prometheus_text(m, eng.stats(), "tiny"))
    assert s[("stllm_requests_finished_total", '{model="tiny",finish_reason="abort"}')] == 1
    assert s[("stllm_generation_tokens_total", '{model="tiny"}')] == m.generation_tokens
    assert s[("stllm_prefix_cache_hit_tokens_total", '{model="tiny"}')] == m.cached_prompt_tokens
    assert s[("stllm_video_tokens_cache_hits_total", '{model="tiny"}')] == 1
    assert s[("stllm_time_to_first_token_seconds_count", '{model="tiny"}')] == 3
    assert s[("stllm_time_to_first_token_seconds_bucket", '{model="tiny",le="+Inf"}')] == 3
    assert s[("stllm_request_stage_seconds_count", '{model="tiny",stage="qformer"}')] == 3
    assert s[("stllm_requests_running", '{model="tiny"}')] == 0
    buckets = [v for (n, lab), v in s.items() if n == "stllm_e2e_request_latency_seconds_bucket"]
    assert buckets == sorted(buckets) and buckets[-1] == 5
    assert eng.stats()["requests"]["requests_finished"] == m.finished
    eng.reset_state()
    assert eng.metrics.as_dict() == EngineMetrics().as_dict()


def test_a_request_is_counted_once():
    m = EngineMetrics()
    out = RequestOutput("r", token_ids=[1, 2, 3], finished=True, finish_reason="length", num_prompt_tokens=7,
                        timings=RequestTimings(ttft=0.01, decode=0.02, total=0.03, num_decode_tokens=2))
    m.observe(out)
    assert m.per_token.count == 1 and m.per_token.sum == pytest.approx(0.01)
    assert m.finished["length"] == 1 and m.prompt_tokens == 7 and m.generation_tokens == 3


def test_metrics_endpoint(files):
    ckpt, videos = files
    with ServerThread(STLLM.from_pretrained(ckpt), model_name='st "llm"') as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("POST", "/v1/answer", body=json.dumps(
            {"video": str(videos[0]), "question": Q, "params": {"max_new_tokens": 3, "stop": []}}).encode())
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        status, ctype, text = resp.status, resp.getheader("Content-Type"), resp.read().decode()
        conn.close()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("POST", "/metrics", body=b"{}")
        assert conn.getresponse().status == 405
        conn.close()
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    s = parse(text)
    label = '{model="st \\"llm\\"",finish_reason="length"}'  # quotes in a label value are escaped
    assert s[("stllm_requests_finished_total", label)] == 1
