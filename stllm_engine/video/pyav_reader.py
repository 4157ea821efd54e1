"""PyAV frame reader: the fallback when decord is missing or fails, and the GIF reader.

Opening demuxes the stream once without decoding (packet timestamps and keyframe flags), which
gives the frame count and the presentation order. Reading seeks to the keyframe at or before each
wanted frame and decodes forward only as far as needed; streams without timestamps, and GIFs
(whose frames may be partial updates of the previous ones), decode sequentially from the start
and stop after the last wanted frame.
"""
from __future__ import annotations

import bisect
import io

import numpy as np

from .errors import CorruptVideoError, EmptyVideoError
from .sources import Source


class _NoTimestamps(Exception):
    pass


class PyAVReader:
    """``num_frames``, ``fps`` (None if unknown) and ``read(indices) -> uint8 [n, H, W, 3]``.

    ``out_size``: optional (W, H) to scale frames to while converting to RGB (bilinear, the
    closest of swscale's filters to what decord's reduced-size decode gives). ``threads``: the
    decoder's threads (0: FFmpeg's choice). ``codec`` / ``pix_fmt``: the stream's, as FFmpeg
    names them."""

    backend = "pyav"

    def __init__(self, src: Source, out_size: tuple[int, int] | None = None, threads: int = 0):
        import av

        self.src, self.out_size, self.threads = src, out_size, threads
        self._reformatter = None
        self._av = av
        container = self._open()
        try:
            if not container.streams.video:
                raise EmptyVideoError(f"{src.name}: container holds no video stream (zero frames)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            ctx = stream.codec_context
            self.width, self.height = ctx.width, ctx.height
            self.codec = ctx.name
            self.pix_fmt = ctx.format.name if ctx.format is not None else None
            expected = stream.frames  # from the container's index; 0 if it does not say
            pts, keys = [], []
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet at the end
                    continue
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
        finally:
            container.close()
        if not pts:
            raise EmptyVideoError(f"{src.name}: video stream holds zero frames")
        if expected and len(pts) < expected:
            raise CorruptVideoError(f"{src.name}: corrupt or truncated stream: the container lists "
                                    f"{expected} frames but only {len(pts)} can be read")
        self.num_frames = len(pts)
        self._seekable = not src.is_gif and all(p is not None for p in pts)
        if self._seekable:
            order = sorted(range(len(pts)), key=lambda i: pts[i])
            self._pts = [pts[i] for i in order]  # presentation order
            self._pts_to_ord = {p: o for o, p in enumerate(self._pts)}
            self._key_ords = [o for o, i in enumerate(order) if keys[i]] or [0]

    def _open(self):
        src = self.src
        return self._av.open(io.BytesIO(src.data) if src.data is not None else str(src.path), "r")

    def _convert(self, frame) -> np.ndarray:
        """RGB through one reformatter per reader: ``frame.to_ndarray`` set up a new swscale
        context for every frame (720p: 0.78 vs 0.47 ms a frame, the same pixels)."""
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        if self.out_size is None:
            return self._reformatter.reformat(frame, format="rgb24").to_ndarray()
        w, h = self.out_size
        return self._reformatter.reformat(frame, format="rgb24", width=w, height=h,
                                          interpolation="BILINEAR").to_ndarray()

    def read(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("read needs at least one frame index")
        if wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise IndexError(f"{self.src.name}: frame indices {wanted[0]}..{wanted[-1]} outside "
                             f"0..{self.num_frames - 1}")
        got: dict[int, np.ndarray] = {}
        if self._seekable:
            try:
                self._read_seeking(wanted, got)
            except _NoTimestamps:
                got.clear()
                self._read_sequential(wanted, got)
        else:
            self._read_sequential(wanted, got)
        missing = [i for i in wanted if i not in got]
        if missing:
            raise CorruptVideoError(f"{self.src.name}: frames {missing[:8]} could not be decoded "
                                    f"(stream ends after {self.num_frames} indexed frames were expected)")
        return np.stack([got[int(i)] for i in indices])

    def _read_sequential(self, wanted: list[int], got: dict) -> None:
        want, last = set(wanted), wanted[-1]
        container = self._open()
        try:
            for o, frame in enumerate(container.decode(video=0)):
                if o in want:
                    got[o] = self._convert(frame)
                if o >= last:
                    break
        finally:
            container.close()

    def _read_seeking(self, wanted: list[int], got: dict) -> None:
        want = set(wanted)
        container = self._open()
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = max(0, self.threads)
        try:
            frames, last = None, -1
            for t in wanted:
                if t in got:
                    continue
                key = self._key_ords[max(0, bisect.bisect_right(self._key_ords, t) - 1)]
                if frames is None and key == 0:  # from the stream's start: no seek (and its flush) needed
                    frames = container.decode(stream)
                elif frames is None or key > last + 1 or t <= last:
                    container.seek(self._pts[key], stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                for frame in frames:
                    if frame.pts is None:
                        raise _NoTimestamps
                    o = self._pts_to_ord.get(frame.pts)
                    if o is None:
                        continue
                    last = o
                    if o in want and o not in got:
                        got[o] = self._convert(frame)
                    if o >= t:
                        break
                else:
                    frames = None  # exhausted: the frames after `last` are missing
        finally:
            container.close()
