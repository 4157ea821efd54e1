"""Noticing that an HTTP client left while its request runs, whether or not anything is written.

The server reads one request per connection and the client sends nothing after its body, so
end-of-file (or a reset) on the reader means the client closed the connection: a timeout, a
cancelled call. Writes only notice that when they fail, and a request can go a long time without
writing (a long prefill, text held back until it is stable, tokens after EOS with
``ignore_eos``), so every wait of a request's handler goes through :meth:`HangupWatch.wait`.
Data from the client instead ends the watch (it is not a hang-up, and it is not read).
"""
from __future__ import annotations

import asyncio


class ClientGone(ConnectionResetError):
    """The client closed the connection before its answer was complete."""


class HangupWatch:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._read = asyncio.ensure_future(reader.read(1))

    async def wait(self, fut: asyncio.Future, timeout: float | None = None) -> bool:
        """Wait until ``fut`` is done (True) or ``timeout`` seconds pass (False); raises
        :class:`ClientGone` as soon as the client hangs up (``fut`` is left to the caller)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not fut.done():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait({fut, self._read}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if fut.done():
                break
            if self._read.done():
                if not self._read.cancelled() and self._read.exception() is None and self._read.result():
                    self._read = loop.create_future()  # the client sent data: stop watching
                else:
                    raise ClientGone("client closed the connection before the answer")
        return True

    async def result(self, aw):
        """The result of awaitable ``aw``, or :class:`ClientGone` (``aw`` is then cancelled)."""
        fut = asyncio.ensure_future(aw)
        try:
            await self.wait(fut)
            return fut.result()
        finally:
            if not fut.done():
                fut.cancel()
                await asyncio.gather(fut, return_exceptions=True)

    def close(self) -> None:
        self._read.cancel()
