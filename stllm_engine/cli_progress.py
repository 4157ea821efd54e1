"""A request's progress on stderr while ``stllm answer`` waits for it (long videos take a while).

Quiet for the first ``DELAY`` seconds (a short answer prints nothing extra), then about every
``EVERY`` seconds: the phase from :meth:`LLMEngine.progress` (video decode + encode, the prompt
positions prefilled chunk by chunk, the tokens generated) and the time so far. Reports come from
the loop between engine steps (:meth:`ProgressLine.update`) and, while one step runs long (a
long video's ViT pass, a 2048-position prefill chunk of a 7B model on a CPU), from a watcher
thread (:meth:`ProgressLine.watch`) that reads the same counters. A terminal gets one line
rewritten in place and cleared at the end; a pipe or file gets a line per report.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

DELAY = 1.0  # seconds before the first report
EVERY = 1.0  # seconds between reports


def describe(info: dict, seconds: float) -> str:
    phase = info["phase"]
    if phase == "video":
        what = "decoding and encoding the video"
    elif phase == "prefill":
        what = f"prefill: {info['done']}/{info['total']} prompt positions ({100 * info['done'] // max(1, info['total'])}%)"
    else:
        what = f"generating: {info['done']}/{info['total']} tokens"
    return f"stllm: {what} ... {seconds:.1f}s"


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, delay: float | None = None, every: float | None = None,
                 decode: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.delay = DELAY if delay is None else delay
        self.every = EVERY if every is None else every
        self.decode = decode
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last: float | None = None
        self.width = 0
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, info: dict | None) -> None:
        """Report ``info`` (an ``LLMEngine.progress`` dict; None: nothing) if it is time to."""
        with self._lock:
            now = time.monotonic()
            if self.closed or info is None or now - self.start < self.delay \
                    or (self.last is not None and now - self.last < self.every):
                return
            if info["phase"] == "decode" and not self.decode:  # the streamed answer shows it
                return
            text = describe(info, now - self.start)
            if self.tty:
                self.stream.write("\r" + text.ljust(self.width))
                self.width = max(self.width, len(text))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now

    def watch(self, poll: Callable[[], dict | None]) -> None:
        """Also report from a daemon thread, ``poll()`` giving the info, about every ``EVERY``
        seconds (at least 0.1 s apart) until :meth:`close`; a failing poll (the engine changing
        the request under it) skips that report."""
        def run() -> None:
            if self._stop.wait(max(self.delay, 0.1)):
                return
            while True:
                try:
                    info = poll()
                except Exception:  # noqa: BLE001 - a racy read: the next report will do
                    info = None
                self.update(info)
                if self._stop.wait(max(self.every, 0.1)):
                    return
        self._thread = threading.Thread(target=run, name="stllm-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop reporting and clear a terminal's line (before the answer or an error is printed)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self.closed = True
            if self.tty and self.width:
                self.stream.write("\r" + " " * self.width + "\r")
                self.stream.flush()
                self.width = 0
