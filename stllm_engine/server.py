"""HTTP server over :class:`AsyncLLMEngine` (stdlib asyncio streams, a small HTTP/1.1 handler).

Endpoints (one request per connection, ``Connection: close``):

* ``GET /health`` -> ``{"status": "ok", "model", "variant", "stats"}`` (``stats["kernels"]`` names the
  device, dtype and attention kernels in use).
* ``POST /v1/answer`` with JSON ``{"video": path | "video_b64": base64 bytes, "question": str,
  "params": {SamplingParams fields}, "stream": bool, "system", "history": [[question, answer], ...],
  "num_frames", "keep_ratio",
  "keep_mode", "keep_seed", "sampling"}`` -> ``{"text", "finish_reason", "timings", "usage"}``.
  ``"stream": true`` answers with server-sent events (chunked): ``data: {"text": piece}`` per piece,
  then ``data: {"done": true, "text", "finish_reason", "timings", "usage"}`` and ``data: [DONE]``.
  ``"progress": true`` (with ``"stream"``) adds, about every second until the first text, ``data:
  {"progress": {"phase", "done", "total", "seconds"}}`` (:meth:`LLMEngine.progress`: the video's
  decode and encode, the prompt positions prefilled, chunk by chunk for long videos); the
  headers then go out with the first progress event, so a request refused after that gets its
  error as the final event instead of a 400.

* ``GET /metrics``: Prometheus text exposition of the engine's request metrics, gauges and cache
  counters (:mod:`stllm_engine.engine.metrics`).
* ``POST /v1/chat/completions``: OpenAI's chat-completions API (``video_url`` content parts,
  multi-turn messages, streamed ``chat.completion.chunk`` events, errors as ``{"error": {"message",
  "type", "code"}}``), see :mod:`stllm_engine.openai_api`; ``GET /v1/models`` names the one model
  (``model_name``, else "stllm").

``text`` is the release's answer text (what ``STLLM.answer`` returns); streamed pieces are stable
prefixes of it (see :class:`AnswerText`). A client that closes its connection before the answer
is complete (a timeout, a cancelled call) has its request aborted, streamed or not, at any point
(while its video is being added, while nothing is being written: :mod:`stllm_engine.hangup_watch`),
so the engine does not go on generating for nobody. ``Expect: 100-continue`` is answered before
the body is read (curl sends it for bodies over 1 MiB and would wait a second); a connection gets
``HEAD_TIMEOUT`` seconds to send its request line and headers (then 408), and one that has sent
nothing does not hold up a graceful shutdown. A bad request gets 400 with ``{"error": message}``
naming the problem (:mod:`stllm_engine.answer_request`); requests run concurrently and the engine
batches them.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from stllm_engine.answer_request import BadRequest, error_status, parse_answer_request
from stllm_engine.answer_text import AnswerFormat, AnswerText
from stllm_engine.api import STLLM
from stllm_engine.engine.async_engine import AsyncLLMEngine
from stllm_engine.engine.metrics import prometheus_text
from stllm_engine.hangup_watch import HangupWatch
from stllm_engine.openai_api import ChatFormat, error_json, models_json, parse_chat_request
from stllm_engine.outputs import RequestOutput

PROGRESS_SECONDS = 1.0  # between progress events of a streamed request
HEAD_TIMEOUT = 60.0  # seconds a connection may take to send its request line and headers
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Payload Too Large", 500: "Internal Server Error"}


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
        self._active: set[asyncio.Task] = set()  # handlers of connections that sent a request
        self._idle: set[asyncio.Task] = set()  # handlers of connections that sent nothing yet

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        await self._server.serve_forever()

    @property
    def in_flight(self) -> int:
        """Connections with a request being read, run or answered (not the idle ones)."""
        return len(self._active)

    async def drain(self, timeout: float) -> int:
        """Stop accepting connections, close the ones that have not sent a request line, and wait
        up to ``timeout`` seconds for the requests being handled to finish; the rest are cancelled
        (their requests aborted). Returns how many were cut."""
        if self._server is not None:
            self._server.close()
        idle = set(self._idle)
        for task in idle:
            task.cancel()
        if idle:
            await asyncio.gather(*idle, return_exceptions=True)
        pending = set(self._active)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

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

    async def _read_request(self, reader: asyncio.StreamReader, writer, seen: list) -> tuple[str, str, bytes]:
        """(method, path, body); ``seen[0]`` is set to the path as soon as the head is read, so
        an error in the body still gets its endpoint's error shape."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                method, path, headers = await self._read_head(reader)
        except TimeoutError:
            raise BadRequest(f"no complete request line and headers within {HEAD_TIMEOUT:g} s", 408) from None
        seen[0] = path
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadRequest("chunked request bodies are not supported; send Content-Length")
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not an integer") from None
        if n < 0:
            raise BadRequest(f"Content-Length must not be negative, got {n}")
        if n > self.max_body_bytes:
            raise BadRequest(f"request body of {n} bytes exceeds the limit of {self.max_body_bytes}", 413)
        if n and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for it on bodies over 1 MiB
            await writer.drain()
        return method, path, await self._read_body(reader, n)

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, n: int) -> bytes:
        """``n`` body bytes; a client that sends none of them for ``HEAD_TIMEOUT`` seconds gets a
        408 (a stalled upload held its connection, and a graceful stop, for good)."""
        chunks, left = [], n
        while left:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    chunk = await reader.read(min(left, 1 << 20))
            except TimeoutError:
                raise BadRequest(f"request body stalled: no byte for {HEAD_TIMEOUT:g} s "
                                 f"({n - left} of {n} received)", 408) from None
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict]:
        line = await self._line(reader)
        task = asyncio.current_task()
        if task in self._idle:  # a request has started: shutdown now waits for it
            self._idle.discard(task)
            self._active.add(task)
        line = line.strip()
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
        return parts[0].upper(), parts[1].split("?")[0], headers

    @staticmethod
    async def _send(writer, status: int, obj: dict | bytes, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()

    @staticmethod
    async def _event(writer, obj) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._idle.add(task)
        try:
            await self._handle_one(reader, writer)
        finally:
            self._idle.discard(task)
            self._active.discard(task)

    async def _handle_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = [""]  # the request's path, once its head is read

        async def fail(status: int, message: str) -> None:
            await self._send(writer, status, error_json(seen[0], message, status))
        try:
            try:
                method, path, body = await self._read_request(reader, writer, seen)
                await self._route(reader, writer, method, path, body)
            except BadRequest as e:
                await fail(e.status, str(e))
            except asyncio.IncompleteReadError as e:
                await fail(400, f"malformed HTTP request: {e}")
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - never let one request take the server down
                await fail(500, f"{type(e).__name__}: {e}")
        except (ConnectionError, asyncio.CancelledError):
            pass  # client went away; its request (if any) was aborted by the stream's cleanup
        finally:
            writer.close()

    async def _route(self, reader, writer, method: str, path: str, body: bytes) -> None:
        if path == "/health":
            if method != "GET":
                raise BadRequest(f"{path} accepts GET, not {method}", 405)
            stats = await asyncio.to_thread(self.engine._call, self.llm.engine.stats)
            await self._send(writer, 200, {"status": "ok" if self.engine.error is None else "engine failed",
                                           "model": self.model_name,
                                           "variant": self._variant(), "stats": stats})
        elif path == "/metrics":
            if method != "GET":
                raise BadRequest(f"{path} accepts GET, not {method}", 405)
            eng = self.llm.engine
            text = await asyncio.to_thread(self.engine._call, lambda: prometheus_text(
                eng.metrics, eng.stats(), self.served_model))
            await self._send(writer, 200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/models":
            if method != "GET":
                raise BadRequest(f"{path} accepts GET, not {method}", 405)
            await self._send(writer, 200, models_json(self.served_model))
        elif path in ("/v1/answer", "/v1/chat/completions"):
            if method != "POST":
                raise BadRequest(f"{path} accepts POST, not {method}", 405)
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest(f"request body is not valid JSON: {e}") from None
            if path == "/v1/answer":
                await self._answer(reader, writer, *parse_answer_request(self.llm, req))
                return
            chat = parse_chat_request(self.llm, req, self.served_model)
            fmt = ChatFormat(self.llm, self.served_model, chat.include_usage)
            if chat.n > 1:
                await self._choices(reader, writer, chat, fmt)
            else:
                await self._answer(reader, writer, chat.video, chat.question, chat.params, chat.options,
                                   chat.stream, fmt=fmt)
        else:
            raise BadRequest(f"no such endpoint {path}; use GET /health, GET /metrics, GET /v1/models, "
                             "POST /v1/answer or POST /v1/chat/completions", 404)

    @property
    def served_model(self) -> str:
        """The model id of ``/v1/models`` and chat completions: the name given, else "stllm"."""
        return self.model_name or "stllm"

    def _variant(self) -> str:
        c = self.llm.engine.model.config
        return f"{'btadapter' if c.vision.btadapter else 'eva'}/{c.video_input}"

    @staticmethod
    def _check(out: RequestOutput) -> None:
        if out.error is not None:
            raise BadRequest(out.error, error_status(out))

    @staticmethod
    async def _finals(streams, watch: HangupWatch) -> list[RequestOutput]:
        """The finished outputs of the requests ``streams`` (output iterators); raises
        ``ClientGone`` if the client leaves first (the callers' ``aclose`` then abort the requests)."""
        async def final(outputs):
            async for out in outputs:
                if out.finished:
                    return out
            raise RuntimeError("request output stream ended before the request finished")
        tasks = [asyncio.ensure_future(final(o)) for o in streams]
        try:
            return await watch.result(asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choices(self, reader, writer, chat, fmt) -> None:
        """``n`` answers to one chat request, in one body or one stream. The first choice runs
        alone until its prompt is prefilled (its first output), so the others find the prompt's KV
        blocks in the prefix cache instead of prefilling it again beside it."""
        rid = f"http-{uuid.uuid4().hex[:16]}"
        params = chat.choice_params()
        streams = [self.engine.generate(chat.video, chat.question, params[0], request_id=f"{rid}-0", **chat.options)]
        watch = HangupWatch(reader)
        try:
            first = await watch.result(streams[0].__anext__())
            self._check(first)
            streams += [self.engine.generate(chat.video, chat.question, p, request_id=f"{rid}-{i}", **chat.options)
                        for i, p in enumerate(params[1:], 1)]
            if chat.stream:
                writer.write(self.STREAM_HEAD)
                await self._stream(watch, writer, [_after(first, streams[0]), *streams[1:]], fmt, chat.params.stop)
                return
            outs = await self._finals([_after(first, streams[0]), *streams[1:]], watch)
            for out in outs:
                self._check(out)
            await self._send(writer, 200, fmt.results(outs))
        finally:
            watch.close()
            for s in streams:
                await s.aclose()  # aborts the requests still running

    async def _stream(self, watch: HangupWatch, writer, streams, fmt, stop) -> None:
        """Server-sent events (after the stream's headers) of one or several choices as their
        tokens come, in ``fmt`` (:class:`AnswerFormat` or :class:`ChatFormat`, whose chunks name
        their choice), stable text pieces of ``stop``-aware :class:`AnswerText`; a failing choice
        ends the stream with its error."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, outputs) -> None:
            try:
                async for out in outputs:
                    await queue.put((i, out))
            except Exception as e:  # noqa: BLE001 - reported in the stream
                await queue.put((i, e))
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        texts = [AnswerText(self.llm.tokenizer, stop) for _ in streams]
        done: list[RequestOutput | None] = [None] * len(streams)
        try:
            for event in fmt.start(len(streams)):
                await self._event(writer, event)
            while any(d is None for d in done):
                i, out = await watch.result(queue.get())  # a hang-up is noticed while nothing is written
                if isinstance(out, Exception) or out.error is not None:
                    await self._event(writer, fmt.error(str(out) if isinstance(out, Exception) else out.error))
                    break
                piece = texts[i].piece(out.token_ids, final=out.finished, stop_reason=out.stop_reason)
                if piece:
                    await self._event(writer, fmt.piece(piece, out, i))
                if out.finished:
                    done[i] = out
                    await self._event(writer, fmt.finish(out, i))
            else:
                for event in fmt.close(done):
                    await self._event(writer, event)
            await self._event(writer, b"[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                   b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")

    def _progress(self, rid: str) -> dict | None:
        """The request's progress, read without the engine lock (a step may hold it for seconds;
        the reads are of counters, and a racy one only skips an event)."""
        try:
            return self.llm.engine.progress(rid)
        except Exception:  # noqa: BLE001
            return None

    async def _first(self, watch: HangupWatch, writer, outputs, rid: str, progress: bool) -> tuple[RequestOutput, bool]:
        """The request's first output; with ``progress``, a progress event every
        PROGRESS_SECONDS meanwhile, the stream's headers going out with the first. Returns
        (output, whether the headers were sent)."""
        if not progress:
            return await watch.result(outputs.__anext__()), False
        start, head = time.monotonic(), False
        first = asyncio.ensure_future(outputs.__anext__())
        try:
            while not await watch.wait(first, PROGRESS_SECONDS):
                info = self._progress(rid)
                if info is None:  # not registered yet, or refused (its error output is on the way)
                    continue
                if not head:
                    writer.write(self.STREAM_HEAD)
                    head = True
                await self._event(writer, {"progress": dict(info, seconds=round(time.monotonic() - start, 3))})
            return first.result(), head
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)

    async def _answer(self, reader, writer, video, question, params, options, stream: bool,
                      progress: bool = False, fmt=None) -> None:
        """Run one request and answer it in ``fmt`` (:class:`AnswerFormat` or
        :class:`ChatFormat`): one JSON body, or with ``stream`` server-sent events."""
        fmt = fmt or AnswerFormat(self.llm)
        rid = f"http-{uuid.uuid4().hex[:16]}"
        outputs = self.engine.generate(video, question, params, request_id=rid, **options)
        watch = HangupWatch(reader)
        try:
            if not stream:
                (out,) = await self._finals([outputs], watch)
                self._check(out)
                await self._send(writer, 200, fmt.result(out))
                return
            first, head = await self._first(watch, writer, outputs, rid, progress)
            if not head:
                self._check(first)  # a request the engine refuses fails before any header is sent
                writer.write(self.STREAM_HEAD)
            await self._stream(watch, writer, [_after(first, outputs)], fmt, params.stop)
        finally:
            watch.close()
            await outputs.aclose()  # aborts the request if it is still running


async def _after(first: RequestOutput, outputs):
    """``first`` (already taken from ``outputs``), then the rest of ``outputs``."""
    yield first
    async for out in outputs:
        yield out


async def serve(llm: STLLM, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
                ready=None, max_body_bytes: int = 512 << 20, stop_signals: bool = False,
                shutdown_timeout: float = 30.0, report=None) -> None:
    """Run a :class:`Server` until cancelled; ``ready(server)`` is called once it listens.

    ``stop_signals``: SIGTERM or SIGINT (a container stop, Ctrl-C) then shut down gracefully: no
    new connections, the requests in flight run to their end for up to ``shutdown_timeout``
    seconds (then they are aborted), and ``serve`` returns; a second signal acts at once (SIGINT
    raises KeyboardInterrupt). ``report(message)`` hears about the shutdown."""
    import signal

    server = Server(llm, host, port, max_body_bytes=max_body_bytes, model_name=model_name)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT) if stop_signals else ()

    def on_signal(name: str) -> None:
        for s in sigs:  # the next signal gets its default action
            loop.remove_signal_handler(s)
        if report is not None:
            report(f"{name}: stopping; {server.in_flight} connection(s) in flight get up to "
                   f"{shutdown_timeout:g} s to finish (a second signal stops at once)")
        stop.set()
    for s in sigs:
        loop.add_signal_handler(s, on_signal, s.name)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
        cut = await server.drain(shutdown_timeout)
        if report is not None:
            report(f"stopped ({cut} request(s) aborted at the timeout)" if cut else "stopped")
    finally:
        for s in sigs:
            loop.remove_signal_handler(s)
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
