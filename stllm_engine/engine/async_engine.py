"""AsyncLLMEngine: an asyncio front of :class:`LLMEngine` with per-request streaming.

A background task runs ``engine.step()`` in a worker thread while requests are pending (one
engine call at a time, under a lock) and routes each output to its request's queue;
``async for out in engine.generate(...)`` yields that request's outputs until it finishes.
Cancelling the consumer (or calling ``abort``) aborts the request, also while it is being added.

A request added with ``add_request`` and not (yet) streamed keeps only its latest output (outputs
are cumulative; the ``delta`` texts are joined), so an unread request holds one output, not one
per step, until ``stream`` reads it; ``abort`` of a request that nobody streams drops it at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator

from stllm_engine.engine.llm_engine import LLMEngine
from stllm_engine.outputs import RequestOutput
from stllm_engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue] = {}
        self._streaming: set[str] = set()  # request ids a stream() is reading
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.error: BaseException | None = None

    def _call(self, fn, *args, **kw):
        with self._lock:
            return fn(*args, **kw)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self._call(self.engine.has_unfinished_requests):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self._call, self.engine.step)
            except Exception as e:  # noqa: BLE001 - an engine bug: end every stream with it
                self.error = e
                for q in self._queues.values():
                    q.put_nowait(e)
                self._queues.clear()
                return
            for o in outs:
                q = self._queues.get(o.request_id)
                if q is None:
                    continue
                if o.request_id not in self._streaming and not q.empty():  # unread: keep the latest
                    prev = q.get_nowait()
                    o = dataclasses.replace(o, delta=prev.delta + o.delta)
                q.put_nowait(o)
            await asyncio.sleep(0)

    async def add_request(self, video, question: str, params: SamplingParams | None = None,
                          **kw) -> str:
        """Queue a request (video decoding/encoding runs in a worker thread); returns its id."""
        self._ensure_loop()
        rid = kw.pop("request_id", None)
        if rid is None:
            rid = await asyncio.to_thread(self._call, self.engine._new_id, None)
        elif rid in self._queues:  # live (or its outputs not yet read): its queue must stay its own
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        adding = asyncio.ensure_future(asyncio.to_thread(self._call, self.engine.add_request, video, question,
                                                         params, request_id=rid, **kw))
        try:
            await asyncio.shield(adding)  # a cancelled caller must not leave the request behind
        except BaseException:
            self._queues.pop(rid, None)
            # the worker thread may still add it (the caller was cancelled): abort it once added
            adding.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None
                                     else asyncio.ensure_future(self.abort(rid)))
            raise
        finally:
            self._wake.set()
        return rid

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes."""
        q = self._queues.get(request_id)
        if q is None:
            raise KeyError(f"unknown request id {request_id!r}")
        if request_id in self._streaming:
            raise RuntimeError(f"request {request_id!r} is already being streamed")
        self._streaming.add(request_id)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}") from item
                yield item
                if item.finished:
                    return
        finally:
            self._streaming.discard(request_id)
            self._queues.pop(request_id, None)
            if self._call(self.engine.abort, request_id) and self._wake is not None:
                self._wake.set()  # consumer left early: the request is aborted

    async def generate(self, video, question: str, params: SamplingParams | None = None,
                       **kw) -> AsyncIterator[RequestOutput]:
        """Add a request and stream its outputs."""
        rid = await self.add_request(video, question, params, **kw)
        async for out in self.stream(rid):
            yield out

    async def abort(self, request_id: str) -> bool:
        """Abort a request; a stream() reading it gets its final output, else its outputs go."""
        if request_id not in self._streaming:
            self._queues.pop(request_id, None)
        ok = await asyncio.to_thread(self._call, self.engine.abort, request_id)
        if self._wake is not None:
            self._wake.set()
        return ok

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
