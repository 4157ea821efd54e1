"""HTTP server over :class:`AsyncLLMEngine` (stdlib asyncio streams, a small HTTP/1.1 handler).

Endpoints (one request per connection, ``Connection: close``):

* ``GET /health`` -> ``{"status": "ok", "model", "variant", "stats"}``.
* ``POST /v1/answer`` with JSON ``{"video": path | "video_b64": base64 bytes, "question": str,
  "params": {SamplingParams fields}, "stream": bool, "system", "num_frames", "keep_ratio",
  "keep_mode", "keep_seed", "sampling"}`` -> ``{"text", "finish_reason", "timings", "usage"}``.
  ``"stream": true`` answers with server-sent events (chunked): ``data: {"text": piece}`` per piece,
  then ``data: {"done": true, "text", "finish_reason", "timings", "usage"}`` and ``data: [DONE]``.

``text`` is the release's answer text (what ``STLLM.answer`` returns); streamed pieces are stable
prefixes of it (see :class:`AnswerText`). A bad request gets 400 with ``{"error": message}``
naming the problem; requests run concurrently and the engine batches them.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
from pathlib import Path

from stllm_engine.api import STLLM
from stllm_engine.prompts import clean_output_ids
from stllm_engine.engine.async_engine import AsyncLLMEngine
from stllm_engine.outputs import RequestOutput
from stllm_engine.prompts import postprocess_answer

REQUEST_OPTIONS = ("system", "num_frames", "keep_ratio", "keep_mode", "keep_seed", "sampling")
ANSWER_KEYS = {"video", "video_b64", "question", "params", "stream", *REQUEST_OPTIONS}
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large", 500: "Internal Server Error"}
MODEL_FAILURE = "model step failed"  # prefix of engine errors that are not the request's fault


class BadRequest(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AnswerText:
    """The release answer text of a growing list of generated ids, as stable streamed pieces.

    ``text(ids)`` = ``STLLM.postprocess`` of those ids; ``piece(ids)`` returns what extends the text
    already sent, holding back what may still change: trailing byte-fallback tokens (the decoder
    joins a run of byte tokens, so a later byte can turn earlier ones into U+FFFD), "#" of a coming
    "###" and whitespace the final strip drops. If the text stops extending what was sent (the
    model wrote "Assistant:", whose prefix the release drops), no more pieces come; the final text
    (``text``) is always complete.
    """

    HOLD = " \t\r\n#\ufffd"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent = ""
        self._byte_token: dict[int, bool] = {}

    def text(self, ids: list[int]) -> str:
        ids = clean_output_ids(ids, self.tokenizer.eos_token_id)
        return postprocess_answer(self.tokenizer.decode(ids, skip_special_tokens=False))

    def _is_byte(self, i: int) -> bool:
        if i not in self._byte_token:
            tok = self.tokenizer.convert_ids_to_tokens(i)
            self._byte_token[i] = isinstance(tok, str) and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")
        return self._byte_token[i]

    def piece(self, ids: list[int], final: bool = False) -> str:
        ids = list(ids)
        if not final:
            while ids and self._is_byte(ids[-1]):
                ids.pop()
        cur = self.text(ids)
        if not final:
            cur = cur.rstrip(self.HOLD)
        if len(cur) <= len(self.sent) or not cur.startswith(self.sent):
            return ""
        out, self.sent = cur[len(self.sent):], cur
        return out


def result_json(llm: STLLM, out: RequestOutput) -> dict:
    """The JSON body of a finished request."""
    return {"text": AnswerText(llm.tokenizer).text(out.token_ids), "finish_reason": out.finish_reason,
            "timings": out.timings.as_dict(),
            "usage": {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": len(out.token_ids),
                      "cached_prompt_tokens": out.num_cached_tokens}}


def parse_answer_request(llm: STLLM, body: dict) -> tuple:
    """Validate a /v1/answer body -> (video, question, SamplingParams, options, stream)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - ANSWER_KEYS)
    if unknown:
        raise BadRequest(f"unknown request fields {unknown}; expected some of {sorted(ANSWER_KEYS)}")
    if ("video" in body) == ("video_b64" in body):
        raise BadRequest("give exactly one of 'video' (a path) or 'video_b64' (base64 bytes)")
    if "video" in body:
        video = body["video"]
        if not isinstance(video, str) or not video:
            raise BadRequest("'video' must be a non-empty path string")
        if not Path(video).exists():
            raise BadRequest(f"video file not found: {video}")
    else:
        if not isinstance(body["video_b64"], str):
            raise BadRequest("'video_b64' must be a base64 string")
        try:
            video = base64.b64decode(body["video_b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"'video_b64' is not valid base64: {e}") from None
        if not video:
            raise BadRequest("'video_b64' decodes to no bytes")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("'question' must be a non-empty string")
    raw = body.get("params", {})
    if not isinstance(raw, dict):
        raise BadRequest("'params' must be a JSON object of generation parameters")
    try:
        params = llm.params(**raw)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad params: {e}") from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    if stream and params.num_beams > 1:
        raise BadRequest("'stream' does not support beam search (params.num_beams > 1)")
    options = {k: body[k] for k in REQUEST_OPTIONS if k in body}
    return video, question, params, options, stream


class Server:
    """The HTTP front. ``await start()`` binds (port 0 picks a free one, see ``.port``)."""

    def __init__(self, llm: STLLM, host: str = "127.0.0.1", port: int = 8000,
                 max_body_bytes: int = 512 << 20, model_name: str = "") -> None:
        self.llm = llm
        self.engine = AsyncLLMEngine(llm.engine)
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.engine.close()

    # --- HTTP -----------------------------------------------------------------------------
    @staticmethod
    async def _line(reader: asyncio.StreamReader) -> str:
        try:
            return (await reader.readline()).decode("latin-1")
        except ValueError:  # asyncio's line limit
            raise BadRequest("HTTP request line or header longer than 64 KiB") from None

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        line = (await self._line(reader)).strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise BadRequest(f"malformed HTTP request line {line[:80]!r}")
        headers = {}
        while True:
            h = await self._line(reader)
            if h in ("\r\n", "\n", ""):
                break
            if len(headers) > 100:
                raise BadRequest("too many HTTP headers")
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadRequest("chunked request bodies are not supported; send Content-Length")
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not an integer") from None
        if n < 0 or n > self.max_body_bytes:
            raise BadRequest(f"request body of {n} bytes exceeds the limit of {self.max_body_bytes}", 413)
        body = await reader.readexactly(n) if n else b""
        return parts[0].upper(), parts[1].split("?")[0], body

    @staticmethod
    async def _send(writer, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()

    @staticmethod
    async def _event(writer, obj) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, path, body = await self._read_request(reader)
                await self._route(writer, method, path, body)
            except BadRequest as e:
                await self._send(writer, e.status, {"error": str(e)})
            except asyncio.IncompleteReadError as e:
                await self._send(writer, 400, {"error": f"malformed HTTP request: {e}"})
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - never let one request take the server down
                await self._send(writer, 500, {"error": f"{type(e).__name__}: {e}"})
        except (ConnectionError, asyncio.CancelledError):
            pass  # client went away; its request (if any) was aborted by the stream's cleanup
        finally:
            writer.close()

    async def _route(self, writer, method: str, path: str, body: bytes) -> None:
        if path == "/health":
            if method != "GET":
                raise BadRequest(f"{path} accepts GET, not {method}", 405)
            stats = await asyncio.to_thread(self.engine._call, self.llm.engine.stats)
            await self._send(writer, 200, {"status": "ok" if self.engine.error is None else "engine failed",
                                           "model": self.model_name,
                                           "variant": self._variant(), "stats": stats})
        elif path == "/v1/answer":
            if method != "POST":
                raise BadRequest(f"{path} accepts POST, not {method}", 405)
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest(f"request body is not valid JSON: {e}") from None
            await self._answer(writer, *parse_answer_request(self.llm, req))
        else:
            raise BadRequest(f"no such endpoint {path}; use GET /health or POST /v1/answer", 404)

    def _variant(self) -> str:
        c = self.llm.engine.model.config
        return f"{'btadapter' if c.vision.btadapter else 'eva'}/{c.video_input}"

    @staticmethod
    def _check(out: RequestOutput) -> None:
        if out.error is not None:
            failed_model = out.error.startswith(MODEL_FAILURE) or out.token_ids
            raise BadRequest(out.error, 500 if failed_model else 400)

    async def _answer(self, writer, video, question, params, options, stream: bool) -> None:
        outputs = self.engine.generate(video, question, params, **options)
        try:
            if not stream:
                async for out in outputs:
                    if out.finished:
                        self._check(out)
                        await self._send(writer, 200, result_json(self.llm, out))
                return
            first = await outputs.__anext__()
            self._check(first)  # a request the engine refuses fails before any header is sent
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            text = AnswerText(self.llm.tokenizer)
            out = first
            while True:
                if out.error is not None:
                    await self._event(writer, {"done": True, "error": out.error, "finish_reason": "error"})
                    break
                piece = text.piece(out.token_ids, final=out.finished)
                if piece:
                    await self._event(writer, {"text": piece})
                if out.finished:
                    await self._event(writer, dict(result_json(self.llm, out), done=True))
                    break
                out = await outputs.__anext__()
            await self._event(writer, b"[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            await outputs.aclose()  # aborts the request if it is still running


async def serve(llm: STLLM, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
                ready=None, max_body_bytes: int = 512 << 20) -> None:
    """Run a :class:`Server` until cancelled; ``ready(server)`` is called once it listens."""
    server = Server(llm, host, port, max_body_bytes=max_body_bytes, model_name=model_name)
    await server.start()
    if ready is not None:
        ready(server)
    try:
        await server.serve_forever()
    finally:
        await server.close()


class ServerThread:
    """A :class:`Server` on its own event loop in a daemon thread (tests, embedding).

    ``with ServerThread(llm) as s: urlopen(s.url + "/health")``; port 0 picks a free port.
    """

    def __init__(self, llm: STLLM, host: str = "127.0.0.1", port: int = 0, model_name: str = "",
                 max_body_bytes: int = 512 << 20) -> None:
        self.llm, self.host, self.port, self.model_name = llm, host, port, model_name
        self.max_body_bytes = max_body_bytes
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stllm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _ready(self, server: Server) -> None:
        self.port = server.port
        self._started.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.llm, self.host, self.port, self.model_name, self._ready,
                                                  self.max_body_bytes))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
        finally:
            self._started.set()
            self._loop.close()

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"server did not start on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive() and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
