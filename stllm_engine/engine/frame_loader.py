"""Background frame decoding, so a new video's decode never stalls the running requests' steps.

While other requests run, ``LLMEngine.add_request`` hands the decode (container demux, codec,
frame sampling: ``load_video(..., preprocess=False)``) of a video not in the vision cache to a
small thread pool (decord and PyAV release the GIL while decoding); each ``step`` first collects
the finished decodes and runs their preprocessing, ViT and Q-Former on the engine thread (torch
compute stays serialised with the model steps), then admits them. Results come back in
submission order among the finished ones; a failed decode fails only its request. ``workers=0``
decodes inline instead (the old synchronous behaviour).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable


class FrameLoader:
    def __init__(self, workers: int) -> None:
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"frame loader workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[str, tuple[Future, Callable[[Any, float], None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.workers > 0

    def submit(self, key: str, load: Callable[[], Any], then: Callable[[Any, float], None]) -> None:
        """Run ``load()`` in the pool; ``then(result, seconds)`` runs on the collecting thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="stllm-frames")

        def timed():
            t = time.perf_counter()
            return load(), time.perf_counter() - t
        self._jobs[key] = (self._pool.submit(timed), then)

    def cancel(self, key: str) -> bool:
        """Forget a job (its result is dropped); True if there was one."""
        job = self._jobs.pop(key, None)
        if job is not None:
            job[0].cancel()
        return job is not None

    def __len__(self) -> int:
        return len(self._jobs)

    def collect(self, block: bool = False, timeout: float = 0.05
                ) -> list[tuple[str, Callable, Any, float, BaseException | None]]:
        """Finished jobs as (key, then, result, seconds, error), in submission order; with
        ``block`` waits up to ``timeout`` s for one to finish (bounded, so a caller holding a
        lock, like the async engine's step, lets new requests in between waits)."""
        if block and self._jobs and not any(f.done() for f, _ in self._jobs.values()):
            wait([f for f, _ in self._jobs.values()], timeout=timeout, return_when=FIRST_COMPLETED)
        done = []
        for key in [k for k, (f, _) in self._jobs.items() if f.done()]:
            fut, then = self._jobs.pop(key)
            err = fut.exception()
            result, seconds = (None, 0.0) if err is not None else fut.result()
            done.append((key, then, result, seconds, err))
        return done

    def shutdown(self) -> None:
        for key in list(self._jobs):
            self.cancel(key)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
