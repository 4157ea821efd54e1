"""Offline batches in OpenAI's batch-file format (``stllm run-batch``), through continuous batching.

Input: JSON lines ``{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" |
"/v1/answer", "body": {...}}`` (the bodies the HTTP server takes; ``stream`` / ``progress`` are
refused, and a chat body's ``model`` is not checked: the one loaded model answers every line).
Output: one JSON line per input line, in input order, ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``: ``body`` is what the endpoint would have
answered (an answer, or its error object with status 400 / 500); a line that is not a request at
all (not UTF-8, bad JSON, no ``custom_id`` or one used by an earlier line, another url) gets
``"response": null`` and ``"error": {"code", "message"}``; messages number lines as the file
does (blank lines count). A bad line never stops the others.

At most ``window`` lines are in the engine or waiting for an earlier line to be written, so memory
stays bounded for files of any length while the engine batches up to ``window`` requests.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

from stllm_engine.answer_request import BadRequest, error_status, parse_answer_request
from stllm_engine.answer_text import AnswerFormat
from stllm_engine.api import STLLM
from stllm_engine.openai_api import ChatFormat, error_json, parse_chat_request
from stllm_engine.outputs import RequestOutput

URLS = ("/v1/chat/completions", "/v1/answer")


class _Line:
    """One input line: its parsed request, or the output it already has (a refused line)."""

    def __init__(self, index: int, custom_id, url: str = "") -> None:
        self.index, self.custom_id, self.url = index, custom_id, url
        self.fmt = None
        self.outs: list[RequestOutput | None] = []  # one per choice (n of a chat body)
        self.result: dict | None = None

    def response(self, status: int, body: dict, request_id: str | None = None) -> None:
        self.result = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": self.custom_id,
                       "response": {"status_code": status, "request_id": request_id, "body": body},
                       "error": None}

    def refuse(self, code: str, message: str) -> None:
        self.result = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": self.custom_id, "response": None,
                       "error": {"code": code, "message": message}}

    def fail(self, status: int, message: str, request_id: str | None = None) -> None:
        self.response(status, error_json(self.url, message, status), request_id)


def _parse(llm: STLLM, index: int, lineno: int, text: str, model: str, seen: dict[str, int]):
    """(line, [request args per choice] or None); ``index``: the line's place in the output,
    ``lineno``: its number in the file; ``seen``: custom_id -> line number of the lines so far."""
    try:
        text.encode("utf-8")  # read with surrogateescape: undecodable bytes fail here, this line only
        obj = json.loads(text)
    except UnicodeEncodeError:
        line = _Line(index, None)
        line.refuse("invalid_json", f"line {lineno} is not valid UTF-8")
        return line, None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or nested past Python's limit
        line = _Line(index, None)
        line.refuse("invalid_json", f"line {lineno} is not valid JSON: {type(e).__name__}: {e}")
        return line, None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    line = _Line(index, custom_id, obj.get("url", "") if isinstance(obj, dict) else "")
    if not isinstance(custom_id, str) or not custom_id:
        line.refuse("invalid_request", f"line {lineno} has no 'custom_id' string")
    elif custom_id in seen:
        line.refuse("duplicate_custom_id", f"line {lineno}: custom_id {custom_id!r} is already used by line "
                                           f"{seen[custom_id]}")
    elif obj.get("method", "POST") != "POST" or line.url not in URLS:
        line.refuse("invalid_request", f"line {lineno}: expected method POST and url one of {list(URLS)}, "
                                       f"got {obj.get('method')!r} {obj.get('url')!r}")
    elif not isinstance(obj.get("body"), dict):
        line.refuse("invalid_request", f"line {lineno} has no 'body' object")
    if isinstance(custom_id, str) and custom_id and custom_id not in seen:
        seen[custom_id] = lineno
    if line.result is not None:
        return line, None
    body = obj["body"]
    try:
        if body.get("stream") or body.get("progress"):
            raise BadRequest("'stream' / 'progress' do not apply to a batch file: every answer is written whole")
        if line.url == "/v1/answer":
            video, question, params, options, _, _ = parse_answer_request(llm, body)
            line.fmt = AnswerFormat(llm)
            choices = [params]
        else:
            chat = parse_chat_request(llm, body, body.get("model", model))
            video, question, options, choices = chat.video, chat.question, chat.options, chat.choice_params()
            line.fmt = ChatFormat(llm, model)
    except BadRequest as e:
        line.fail(e.status, str(e))
        return line, None
    except Exception as e:  # noqa: BLE001 - e.g. an OSError checking the video path: this line only
        line.fail(400, f"{type(e).__name__}: {e}")
        return line, None
    line.outs = [None] * len(choices)
    return line, [(video, question, p, options) for p in choices]


def failed_line(result: dict) -> bool:
    """Whether an output line is a refusal or an error response."""
    return result["error"] is not None or result["response"]["status_code"] != 200


def _finish(line: _Line, choice: int, out: RequestOutput) -> None:
    """Record a finished choice; the line's result once every choice has finished."""
    line.outs[choice] = out
    if any(o is None for o in line.outs):
        return
    bad = next((o for o in line.outs if o.error is not None), None)
    if bad is not None:
        line.fail(error_status(bad), bad.error, line.outs[0].request_id)
    elif len(line.outs) == 1:
        line.response(200, line.fmt.result(line.outs[0]), line.outs[0].request_id)
    else:
        line.response(200, line.fmt.results(line.outs), line.outs[0].request_id)


def run_batch(llm: STLLM, lines: Iterable[str], model: str = "stllm", window: int = 64,
              on_progress: Callable[[int, int], None] | None = None) -> Iterator[dict]:
    """Yield one output dict per non-blank input line, in input order (see the module doc).
    ``on_progress(done, failed)`` is called whenever lines were written (counts so far)."""
    if window < 1:
        raise ValueError(f"run_batch: window must be >= 1, got {window}")
    eng = llm.engine
    source = iter(enumerate((n, text) for n, text in enumerate(lines, 1) if text.strip()))
    seen: dict[str, int] = {}
    pending: dict[int, _Line] = {}  # submitted or finished, not yet written
    by_rid: dict[str, tuple[_Line, int]] = {}
    next_out, done, failed, exhausted = 0, 0, 0, False
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    while True:
        while not exhausted and len(pending) < window:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            index, (lineno, text) = item
            line, req = _parse(llm, index, lineno, text, model, seen)
            pending[index] = line
            for choice, (video, question, params, options) in enumerate(req or ()):
                rid = eng.add_request(video, question, params, request_id=f"{prefix}-{index}-{choice}", **options)
                by_rid[rid] = (line, choice)
        wrote = False
        while next_out in pending and pending[next_out].result is not None:
            result = pending.pop(next_out).result
            failed += failed_line(result)
            done += 1
            next_out += 1
            wrote = True
            yield result
        if wrote and on_progress is not None:
            on_progress(done, failed)
        if exhausted and not pending:
            return
        if not eng.has_unfinished_requests():
            if any(line.result is None for line in pending.values()):
                raise RuntimeError("the engine went idle with batch lines unfinished")
            continue
        for out in eng.step():
            if out.finished and out.request_id in by_rid:
                _finish(*by_rid.pop(out.request_id), out)


def run_batch_file(llm: STLLM, src, dst, model: str = "stllm", window: int = 64,
                   report: Callable[[str], None] | None = None) -> dict:
    """``run_batch`` from the text stream ``src`` to ``dst``; returns {"requests", "failed",
    "seconds"}. ``report`` gets a progress line about once a second and a summary."""
    t0 = last = time.perf_counter()
    n = bad = 0

    def tick(done: int, failed: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if report is not None and now - last >= 1.0:
            last = now
            report(f"run-batch: {done} done ({failed} failed), {done / (now - t0):.2f} requests/s")
    for result in run_batch(llm, src, model, window, tick):
        dst.write(json.dumps(result) + "\n")
        dst.flush()
        n += 1
        bad += failed_line(result)
    seconds = time.perf_counter() - t0
    if report is not None:
        report(f"run-batch: {n} requests, {n - bad} answered, {bad} failed in {seconds:.1f} s "
               f"({n / max(seconds, 1e-9):.2f} requests/s)")
    return {"requests": n, "failed": bad, "seconds": seconds}
