"""The HTTP server on a tiny checkpoint and real mp4 files: health, answers, errors, streaming."""
from __future__ import annotations

import base64
import http.client
import json
import platform
import socket
import threading
import time

import pytest
import torch

from stllm_engine.api import STLLM
from stllm_engine.answer_text import AnswerText
from stllm_engine.server import ServerThread
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_corrupt_video, write_video

QUESTION = "What happens in the video?"
MAX_NEW = 10
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=1)
    videos = [write_video(d / f"v{i}.mp4", num_frames=12, size=(96, 72), seed=i) for i in range(3)]
    corrupt = write_corrupt_video(d / "corrupt.mp4")
    return ckpt, videos, corrupt


@pytest.fixture(scope="module")
def expected(files):
    """Answers of a separate engine (same checkpoint) for the questions the tests ask."""
    ckpt, videos, _ = files
    llm = STLLM.from_pretrained(ckpt)
    return {(str(v), q): llm.answer(str(v), q, max_new_tokens=MAX_NEW)
            for v in videos for q in (QUESTION, "Which shape moves?")}


@pytest.fixture(scope="module")
def server(files):
    with ServerThread(STLLM.from_pretrained(files[0]), model_name="tiny", max_body_bytes=BODY_LIMIT) as s:
        yield s


def request(server, method: str, path: str, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), payload


def answer(server, body):
    status, _, payload = request(server, "POST", "/v1/answer", body)
    return status, json.loads(payload)


def test_health(server):
    status, ctype, payload = request(server, "GET", "/health")
    assert status == 200 and ctype == "application/json"
    body = json.loads(payload)
    assert body["status"] == "ok" and body["model"] == "tiny" and body["variant"] == "eva/all"
    assert "kv" in body["stats"] and "vision_cache" in body["stats"]
    kernels = body["stats"]["kernels"]
    assert kernels["device"] == "cpu" and kernels["decode_attention"] == "c++ paged"
    from stllm_engine.ops.attention import cpu_prefill_attention_kernel

    assert kernels["prefill_attention"] == cpu_prefill_attention_kernel(getattr(torch, kernels["dtype"]))
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert kernels["malloc"] == ("tuned" if glibc else "unavailable")  # STLLM_CPU_MALLOC unset
    assert kernels["decode_pass"] == "c++ layer loop"


def test_answer_matches_engine(server, files, expected):
    video = str(files[1][0])
    status, body = answer(server, {"video": video, "question": QUESTION, "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200, body
    assert set(body) == {"text", "finish_reason", "timings", "usage"}
    assert body["text"] == expected[(video, QUESTION)]
    assert body["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= MAX_NEW
    assert body["usage"]["prompt_tokens"] > 12 * 6  # 12 frames x 6 query tokens + text
    for key in ("frame_decode", "vision", "qformer", "prefill", "ttft", "decode", "decode_tokens_per_s"):
        assert body["timings"][key] >= 0
    assert body["timings"]["ttft"] > 0


def test_params_take_choices_and_logit_bias(server, files):
    video = str(files[1][0])
    llm = STLLM.from_pretrained(files[0])
    choices = ["left", "right", "up", "down"]
    want = llm.answer(video, QUESTION, max_new_tokens=MAX_NEW, choices=choices)
    status, body = answer(server, {"video": video, "question": QUESTION,
                                   "params": {"max_new_tokens": MAX_NEW, "choices": choices}})
    assert status == 200 and (body["text"], body["finish_reason"]) == (want, "stop") and want in choices
    biased = llm.answer(video, QUESTION, max_new_tokens=3, logit_bias={7: 100})
    status, body = answer(server, {"video": video, "question": QUESTION,
                                   "params": {"max_new_tokens": 3, "logit_bias": {"7": 100}}})
    assert status == 200 and body["text"] == biased
    status, body = answer(server, {"video": video, "question": QUESTION, "params": {"choices": "left"}})
    assert status == 400 and "choices must be a non-empty list" in body["error"]


def test_video_b64_same_answer_as_path(server, files, expected):
    video = files[1][1]
    b64 = base64.b64encode(video.read_bytes()).decode()
    status, body = answer(server, {"video_b64": b64, "question": QUESTION, "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200, body
    assert body["text"] == expected[(str(video), QUESTION)]


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    ({"video": "/no/such/clip.mp4", "question": "q"}, "/no/such/clip.mp4 does not exist"),
    ({"video": "http://example.com/clip.mp4", "question": "q"}, "is a URL; videos are read from local files"),
    ({"question": "q"}, "video"),
    ({"video": "X", "video_b64": "AAAA", "question": "q"}, "exactly one"),
    ({"video_b64": "@@not base64@@", "question": "q"}, "video_b64"),
    ({"video": "X", "question": ""}, "question"),
    ({"video": "X", "question": "q", "params": {"temperature": -1}}, "temperature"),
    ({"video": "X", "question": "q", "params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"video": "X", "question": "q", "params": {"beams": 2}}, "beams"),
    ({"video": "X", "question": "q", "colour": "red"}, "colour"),
    ({"video": "X", "question": "q", "stream": True, "params": {"num_beams": 2}}, "beam"),
    ({"video": "X", "question": "q", "num_frames": 0}, "num_frames"),
    ({"video": "X", "question": "q", "keep_ratio": 1.5}, "keep_ratio"),
    ({"video": "X", "question": "q", "progress": True}, "'progress' events need 'stream': true"),
    ({"video": "X", "question": "q", "stream": True, "progress": "yes"}, "'progress' must be true or false"),
    ([1, 2], "JSON object"),
])
def test_bad_request_is_400_naming_the_problem(server, files, body, needle):
    if isinstance(body, dict) and body.get("video") == "X":
        body = dict(body, video=str(files[1][0]))
    raw = body if isinstance(body, bytes) else None
    status, ctype, payload = request(server, "POST", "/v1/answer", None if raw else body, raw=raw)
    assert status == 400 and ctype == "application/json"
    assert needle in json.loads(payload)["error"]


def test_corrupt_video_is_400(server, files):
    status, body = answer(server, {"video": str(files[2]), "question": QUESTION})
    assert status == 400 and "corrupt.mp4" in body["error"]


@pytest.mark.parametrize("method, path, status", [("GET", "/nope", 404), ("POST", "/health", 405),
                                                  ("GET", "/v1/answer", 405)])
def test_unknown_route_or_method(server, method, path, status):
    got, _, payload = request(server, method, path, {} if method == "POST" else None)
    assert got == status and path in json.loads(payload)["error"]


def test_bad_requests_do_not_break_concurrent_good_ones(server, files, expected):
    videos = [str(v) for v in files[1]]
    good = [{"video": v, "question": q, "params": {"max_new_tokens": MAX_NEW}}
            for v in videos for q in (QUESTION, "Which shape moves?")]
    bad = [{"video": str(files[2]), "question": QUESTION},
           {"video": videos[0], "question": QUESTION, "params": {"top_p": 0}},
           {"video": "/missing.mp4", "question": QUESTION}]
    results: dict[int, tuple] = {}

    def run(i, body):
        results[i] = answer(server, body)

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(good + bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, body in enumerate(good):
        status, out = results[i]
        assert status == 200, out
        assert out["text"] == expected[(body["video"], body["question"])]
    for i in range(len(good), len(good) + len(bad)):
        assert results[i][0] == 400
    assert request(server, "GET", "/health")[0] == 200


def sse_events(payload: bytes) -> list:
    events = []
    for block in payload.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("vi, question", [(0, QUESTION), (2, "Which shape moves?")])
def test_stream_pieces_join_to_the_answer(server, files, expected, vi, question):
    video = str(files[1][vi])
    status, ctype, payload = request(server, "POST", "/v1/answer", {
        "video": video, "question": question, "stream": True, "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200 and ctype == "text/event-stream"
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["done"] is True and final["finish_reason"] in ("stop", "length")
    pieces = [e["text"] for e in events[:-2]]
    assert len(pieces) >= 2 and all(pieces)
    assert "".join(pieces) == final["text"] == expected[(video, question)]


def test_stream_progress_events_come_before_the_text(server, files, expected, monkeypatch):
    """A first step made to take 2.5 s: the stream opens with progress events (phase, counts,
    seconds rising), then the same pieces and answer as without them."""
    from stllm_engine import server as server_mod

    monkeypatch.setattr(server_mod, "PROGRESS_SECONDS", 0.4)
    eng = server.llm.engine
    real, calls = type(eng).step, []

    def slow_first_step():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.5)
        return real(eng)

    monkeypatch.setattr(eng, "step", slow_first_step)
    video = str(files[1][0])
    status, ctype, payload = request(server, "POST", "/v1/answer", {
        "video": video, "question": QUESTION, "stream": True, "progress": True,
        "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200 and ctype == "text/event-stream"
    events = sse_events(payload)
    progress = [e["progress"] for e in events if isinstance(e, dict) and "progress" in e]
    assert len(progress) >= 3
    assert all(p["phase"] in ("video", "prefill") for p in progress)
    assert all(p["done"] == 0 and p["total"] > 0 for p in progress if p["phase"] == "prefill")
    seconds = [p["seconds"] for p in progress]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0]
    rest = events[len(progress):]  # progress first, then the pieces, the final event and [DONE]
    assert all("progress" not in e for e in rest if isinstance(e, dict))
    assert "".join(e["text"] for e in rest[:-2]) == rest[-2]["text"] == expected[(video, QUESTION)]


@pytest.mark.parametrize("progress", [False, True])
def test_stream_of_a_bad_video_is_400_before_streaming(server, progress):
    status, ctype, payload = request(server, "POST", "/v1/answer", {
        "video_b64": base64.b64encode(b"definitely not a video").decode(), "question": "q", "stream": True,
        "progress": progress})
    assert status == 400 and ctype == "application/json"
    assert json.loads(payload)["error"]


def test_answer_text_holds_back_unstable_tails(files):
    from stllm_engine.tokenizers import load_llama_tokenizer

    tok = load_llama_tokenizer(files[0])
    ids = tok("hello world ### more", add_special_tokens=False).input_ids
    at = AnswerText(tok)
    pieces = [at.piece(ids[:i + 1], final=i == len(ids) - 1) for i in range(len(ids))]
    assert "".join(pieces) == at.text(ids) == "hello world"
    assert not any("#" in p for p in pieces)


@pytest.mark.parametrize("stop", ["world", "wor", "ld ###", "o"])
def test_answer_text_pieces_with_a_stop_string_join_to_the_final_text(files, stop):
    """Holding back a stop string's possible start must not expose whitespace the final strip
    drops: the pieces join to exactly the final text."""
    from stllm_engine.tokenizers import load_llama_tokenizer

    tok = load_llama_tokenizer(files[0])
    ids = tok("the  cat sat  on   the world and more", add_special_tokens=False).input_ids
    at = AnswerText(tok, [stop])
    full = tok.decode(ids, skip_special_tokens=True)
    end = next((i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i], skip_special_tokens=True)),
               len(ids))
    pieces = [at.piece(ids[:i + 1], final=i == end - 1, stop_reason=stop if stop in full else None)
              for i in range(end)]
    assert "".join(pieces) == at.text(ids[:end], stop if stop in full else None)


def raw_exchange(server, data: bytes, read_all: bool = True) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
    return b"".join(chunks)


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"POST /v1/answer HTTP/1.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST /v1/answer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BODY_LIMIT + 1), b"413"),
    (b"POST /v1/answer HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
])
def test_malformed_http_gets_an_error_status(server, data, status):
    reply = raw_exchange(server, data)
    assert reply.startswith(b"HTTP/1.1 " + status)
    assert b'"error"' in reply


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_aborts_its_request(server, files, expected, monkeypatch, stream):
    eng = server.llm.engine
    aborted = _recording_abort(eng, monkeypatch)
    long = 1500  # far more than can finish before the hang-up is noticed
    body = json.dumps({"video": str(files[1][0]), "question": QUESTION, "stream": stream,
                       "params": {"max_new_tokens": long, "min_new_tokens": long, "stop": ["@@@@"]}}).encode()
    head = b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    if stream:
        first = raw_exchange(server, head + body, read_all=False)  # headers (maybe a piece), then hang up
        assert first.startswith(b"HTTP/1.1 200")
    else:  # nothing comes back before the answer: wait until the engine generates, then hang up
        with socket.create_connection((server.host, server.port), timeout=60) as sock:
            sock.sendall(head + body)
            deadline = time.monotonic() + 60
            while not any(r.seq is not None and r.seq.num_output_tokens > 0 for r in list(eng._requests.values())):
                assert time.monotonic() < deadline, "the request never started generating"
                time.sleep(0.02)
    while not aborted:
        time.sleep(0.1)
    assert aborted == [True]  # the request was still running when it was aborted
    video = str(files[1][0])
    status, out = answer(server, {"video": video, "question": QUESTION, "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200 and out["text"] == expected[(video, QUESTION)]
    stats = json.loads(request(server, "GET", "/health")[2])["stats"]
    assert stats["running"] == 0 and stats["waiting"] == 0


def _recording_abort(eng, monkeypatch) -> list[bool]:
    aborted: list[bool] = []
    real_abort = eng.abort

    def recording_abort(rid):
        aborted.append(real_abort(rid))
        return aborted[-1]
    monkeypatch.setattr(eng, "abort", recording_abort)
    return aborted


def _wait_idle(server, aborted: list, timeout: float = 60.0) -> None:
    eng, deadline = server.llm.engine, time.monotonic() + timeout
    while not aborted or eng.has_unfinished_requests():
        assert time.monotonic() < deadline, f"not aborted in time: {aborted}, {list(eng._requests)}"
        time.sleep(0.05)


def test_client_leaving_while_its_request_is_added_aborts_it(server, files, monkeypatch):
    """A hang-up while the request is still being added (its video decoding in the worker thread)
    cancels the handler mid-add: the request is aborted once added, not left waiting (and run to
    its end by the next request's steps)."""
    eng = server.llm.engine
    real_add = eng.add_request

    def slow_add(*a, **kw):
        time.sleep(1.0)  # the client leaves meanwhile
        return real_add(*a, **kw)
    monkeypatch.setattr(eng, "add_request", slow_add)
    aborted = _recording_abort(eng, monkeypatch)
    lengths = eng.metrics.finished["length"]
    body = json.dumps({"video": str(files[1][0]), "question": QUESTION,
                       "params": {"max_new_tokens": 1500, "ignore_eos": True}}).encode()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
    _wait_idle(server, aborted)
    assert aborted == [True]
    assert eng.metrics.finished["length"] == lengths


def test_streamed_request_writing_nothing_is_aborted_when_the_client_leaves(server, files, monkeypatch):
    """After the stream's headers, a request whose text does not grow (EOS forced and ignored)
    writes nothing; its client's hang-up is still noticed and the request aborted."""
    eng = server.llm.engine
    aborted = _recording_abort(eng, monkeypatch)
    eos = server.llm.tokenizer.eos_token_id
    body = json.dumps({"video": str(files[1][0]), "question": QUESTION, "stream": True,
                       "params": {"max_new_tokens": 1500, "ignore_eos": True, "logit_bias": {str(eos): 100}}})
    data = b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body.encode()
    assert raw_exchange(server, data, read_all=False).startswith(b"HTTP/1.1 200")  # then hang up
    _wait_idle(server, aborted)
    assert aborted == [True]  # still running when aborted: not run to its 1500 tokens


def test_expect_100_continue_is_answered(server, files, expected):
    video = str(files[1][0])
    body = json.dumps({"video": video, "question": QUESTION, "params": {"max_new_tokens": MAX_NEW}}).encode()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the body is sent
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["text"] == expected[(video, QUESTION)]


def test_request_head_times_out(server, monkeypatch):
    import stllm_engine.server as srv

    monkeypatch.setattr(srv, "HEAD_TIMEOUT", 0.5)
    reply = raw_exchange(server, b"POST /v1/answer HTTP/1.1\r\nContent-Le")
    assert reply.startswith(b"HTTP/1.1 408") and b"within 0.5 s" in reply


def test_a_stalled_request_body_times_out(server, monkeypatch):
    """OpenAI-client audit: a client that sent its head and then stopped mid-body held the
    connection (and a graceful stop) for good; the body now has the head's inactivity limit."""
    import stllm_engine.server as srv

    monkeypatch.setattr(srv, "HEAD_TIMEOUT", 0.5)
    reply = raw_exchange(server, b"POST /v1/answer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vid")
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply and b"5 of 100" in reply


def test_errors_before_the_body_is_read_have_the_endpoints_shape(server):
    """OpenAI-client audit: a 413 / bad Content-Length on /v1/chat/completions came back as
    {"error": "..."}, so the OpenAI client showed only "Error code: 413"; unknown /v1 paths too."""
    reply = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                         % (BODY_LIMIT + 1))
    assert reply.startswith(b"HTTP/1.1 413")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"
    reply = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert reply.startswith(b"HTTP/1.1 404") and err["type"] == "not_found_error" and err["message"]
    reply = raw_exchange(server, b"POST /v1/answer HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert isinstance(json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"], str)  # the server's own shape


def test_drain_does_not_wait_for_idle_connections(files):
    """A connection that never sent a request does not hold up a graceful shutdown; one with a
    request in flight is waited for."""
    import asyncio

    from stllm_engine.server import Server

    async def main():
        server = Server(STLLM.from_pretrained(files[0]), port=0)
        await server.start()
        _, idle_writer = await asyncio.open_connection(server.host, server.port)
        await asyncio.sleep(0.2)
        assert server.in_flight == 0
        t0 = time.monotonic()
        cut = await server.drain(60.0)
        elapsed = time.monotonic() - t0
        idle_writer.close()
        await server.close()
        return cut, elapsed
    cut, elapsed = asyncio.run(main())
    assert cut == 0 and elapsed < 10.0  # not the 60 s the idle connection held it for


def test_a_failing_model_step_is_500(server, files, monkeypatch):
    from stllm_engine.engine.model_runner import ModelRunner
    from stllm_engine.outputs import MODEL_FAILURE

    def broken(self, *a, **kw):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(ModelRunner, "run", broken)
    status, body = answer(server, {"video": str(files[1][0]), "question": QUESTION})
    assert status == 500 and body["error"].startswith(MODEL_FAILURE) and "kernel exploded" in body["error"]
