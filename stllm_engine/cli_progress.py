"""A request's progress on stderr while ``stllm answer`` waits for it (long videos take a while).

Quiet for the first ``delay`` seconds (a short answer prints nothing extra), then at most every
``every`` seconds: the phase from :meth:`LLMEngine.progress` (video decode + encode, the prompt
positions prefilled chunk by chunk, the tokens generated) and the time so far. A terminal gets one
line rewritten in place and cleared at the end; a pipe or file gets a line per report.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

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

    def update(self, info: dict | None) -> None:
        """Report ``info`` (an ``LLMEngine.progress`` dict; None: nothing) if it is time to."""
        now = time.monotonic()
        if info is None or now - self.start < self.delay or (self.last is not None and now - self.last < self.every):
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

    def close(self) -> None:
        """Clear a terminal's progress line (before the answer or an error is printed)."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
