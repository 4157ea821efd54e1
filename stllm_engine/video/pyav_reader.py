"""PyAV frame reader: the fallback when decord is missing or fails, and the GIF reader.

Opening demuxes the stream once without decoding (packet timestamps and keyframe flags), which
gives the frame count and the presentation order. Reading seeks to the keyframe at or before each
wanted frame and decodes forward only as far as needed; streams without timestamps, and GIFs
(whose frames may be partial updates of the previous ones), decode sequentially from the start
and stop after the last wanted frame. With several workers, runs of the wanted frames that start
at different keyframes decode on parallel single-threaded containers (the engine's 16 of 48
frames of a 720p clip: 47.4 -> 36.1 ms; 16 s clips 1.19-1.30x; ad-hoc interleaved A/B, stop 19).

Seeking reads also leave out the disposable frames that are not wanted: H.264 pictures whose slices
all have ``nal_ref_idc`` 0 and whose samples carry no parameter set (most B-frames of a camera or
web encode: x264's default) are never a reference of another picture, so their packets are not
decoded at all and every other frame decodes to the same pixels. A 16 s 720p clip with B-frames
(x264, 3 B-frames, 238 of its 480 frames disposable), 16 frames sampled, one reader: 535 ->
271-311 ms, the frames bit-identical (ad-hoc, stop 24).
"""
from __future__ import annotations

import bisect
import io
import threading
from typing import Callable

import numpy as np

from .errors import CorruptVideoError, EmptyVideoError
from .segments import map_runs, min_run_frames, split_runs
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
    parallel_read = True  # read(indices, workers)
    skip_disposable = True  # False: decode every packet (benchmarks/video_decode.py compares)

    def __init__(self, src: Source, out_size: tuple[int, int] | None = None, threads: int = 0):
        import av

        self.src, self.out_size, self.threads = src, out_size, threads
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
            # interlaced content (the stream's field order, or a decoded frame's flag: ``read``
            # sets it): decord's RGB of it differs, so ``decode.FastDecordReader`` leaves it to decord
            self.interlaced = _field_order(ctx) > 1
            expected = stream.frames  # from the container's index; 0 if it does not say
            disposable_sample = disposable_test(self.codec, ctx.extradata)
            pts, keys, disposable = [], [], []
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet at the end
                    continue
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
                disposable.append(disposable_sample is not None and not keys[-1]
                                  and disposable_sample(memoryview(packet)))
        finally:
            container.close()
        if not pts:
            raise EmptyVideoError(f"{src.name}: video stream holds zero frames")
        if expected and len(pts) < expected:
            raise CorruptVideoError(f"{src.name}: corrupt or truncated stream: the container lists "
                                    f"{expected} frames but only {len(pts)} can be read")
        self.num_frames = len(pts)
        # seeking maps decoded frames back to their place by timestamp: every frame needs its own
        # (repeated ones, e.g. an MJPEG mkv, mapped to one place and lost the other frame)
        self._seekable = not src.is_gif and all(p is not None for p in pts) and len(set(pts)) == len(pts)
        self._disposable_pts, self.disposable_ords = frozenset(), []  # (seeking reads only)
        if self._seekable:
            order = sorted(range(len(pts)), key=lambda i: pts[i])
            self._pts = [pts[i] for i in order]  # presentation order
            self._pts_to_ord = {p: o for o, p in enumerate(self._pts)}
            self._key_ords = [o for o, i in enumerate(order) if keys[i]] or [0]
            self.disposable_ords = [o for o, i in enumerate(order) if disposable[i]]
            self._disposable_pts = frozenset(self._pts[o] for o in self.disposable_ords)

    def _open(self):
        src = self.src
        return self._av.open(io.BytesIO(src.data) if src.data is not None else str(src.path), "r")

    def _convert(self, frame, reformatter) -> np.ndarray:
        """RGB through one reformatter per decoding pass: ``frame.to_ndarray`` set up a new swscale
        context for every frame (720p: 0.78 vs 0.47 ms a frame, the same pixels). An interlaced
        frame sets ``interlaced``."""
        if frame.interlaced_frame:
            self.interlaced = True
        if self.out_size is None:
            return reformatter.reformat(frame, format="rgb24").to_ndarray()
        w, h = self.out_size
        return reformatter.reformat(frame, format="rgb24", width=w, height=h,
                                    interpolation="BILINEAR").to_ndarray()

    def read(self, indices: list[int], workers: int = 1) -> np.ndarray:
        """uint8 [len(indices), H, W, 3], the frames in ``indices``' order (repeats allowed).

        ``workers`` > 1 decodes runs of the sorted frames that start at different keyframes
        (:func:`~.segments.split_runs`) on that many single-threaded decoders in parallel, each
        on its own container (FFmpeg releases the GIL while decoding and converting); one run
        decodes on one container with ``threads`` frame threads. Each frame is copied into the
        output as soon as it is converted, on its decoding thread, instead of stacked at the end.
        """
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("read needs at least one frame index")
        if wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise IndexError(f"{self.src.name}: frame indices {wanted[0]}..{wanted[-1]} outside "
                             f"0..{self.num_frames - 1}")
        out = _Output(indices, self.src.name)
        if self._seekable:
            try:
                self._read_runs(wanted, out, workers)
            except _NoTimestamps:
                out = _Output(indices, self.src.name)
                self._read_sequential(wanted, out)
        else:
            self._read_sequential(wanted, out)
        self.frames_skipped = out.skipped  # of this read: disposable frames left undecoded
        missing = [i for i in wanted if i not in out.done]
        if missing:
            raise CorruptVideoError(f"{self.src.name}: frames {missing[:8]} could not be decoded "
                                    f"(stream ends after {self.num_frames} indexed frames were expected)")
        return out.array

    def _read_runs(self, wanted: list[int], out: "_Output", workers: int) -> None:
        runs = [wanted]
        if workers > 1 and len(wanted) > 1:
            runs = split_runs(wanted, self._key_ords, workers, min_run_frames(self.width * self.height),
                              self.disposable_ords)
        if len(runs) == 1:
            self._read_seeking(wanted, out, self.threads)
        else:
            map_runs(runs, lambda run: self._read_seeking(run, out, 1))

    def _read_sequential(self, wanted: list[int], out: "_Output") -> None:
        want, last = set(wanted), wanted[-1]
        reformatter = self._reformatter()
        container = self._open()
        demux = _Demux(container)
        try:
            o = -1
            for packet in demux.packets(container.streams.video[0]):  # (container.decode, finished at close)
                for frame in packet.decode():
                    o += 1
                    if o in want:
                        out.put(o, self._convert(frame, reformatter))
                    if o >= last:
                        return
        finally:
            demux.close()

    def _read_seeking(self, wanted: list[int], out: "_Output", threads: int) -> None:
        want = set(wanted)
        reformatter = self._reformatter()
        container = self._open()
        demux = _Demux(container)
        stream = container.streams.video[0]
        if threads != 1:
            stream.thread_type = "AUTO"
        stream.thread_count = max(0, threads)
        try:
            frames, last, demuxed = None, -1, [-1]  # demuxed[0]: the furthest frame read from the file
            for t in wanted:
                if t in out.done:
                    continue
                key = self._key_ords[max(0, bisect.bisect_right(self._key_ords, t) - 1)]
                if frames is None and key == 0:  # from the stream's start: no seek (and its flush) needed
                    frames = self._decode(demux, stream, want, out, demuxed)
                elif frames is None or key > max(last, demuxed[0]) + 1 or t <= last:
                    # (a decoder that reorders frames reads ahead: once it has read the keyframe,
                    # going on is cheaper than seeking back to it and decoding those frames again)
                    container.seek(self._pts[key], stream=stream, backward=True, any_frame=False)
                    demuxed[0] = -1
                    frames = self._decode(demux, stream, want, out, demuxed)
                for frame in frames:
                    if frame.pts is None:
                        raise _NoTimestamps
                    o = self._pts_to_ord.get(frame.pts)
                    if o is None:
                        continue
                    last = o
                    if o in want and o not in out.done:
                        out.put(o, self._convert(frame, reformatter))
                    if o >= t:
                        break
                else:
                    frames = None  # exhausted: the frames after `last` are missing
        finally:
            demux.close()

    def _decode(self, demux: "_Demux", stream, want: set[int], out: "_Output", demuxed: list[int]):
        """The decoded frames from the container's position on (as ``container.decode``), leaving
        out the packets of disposable frames that are not in ``want``; ``demuxed[0]`` follows the
        furthest frame (presentation order) whose packet was read."""
        skip = self._disposable_pts if self.skip_disposable else None
        for packet in demux.packets(stream):
            o = self._pts_to_ord.get(packet.pts)
            if o is not None and o > demuxed[0]:
                demuxed[0] = o
            if skip and packet.pts in skip and o not in want:
                out.skip()
                continue
            yield from packet.decode()

    @staticmethod
    def _reformatter():
        from av.video.reformatter import VideoReformatter

        return VideoReformatter()


class _Demux:
    """The packet generators a read opens on one container, run to their end before it closes.

    PyAV (18.1) leaks ~160 bytes of native memory for each ``container.demux()`` generator left
    before the end of the file (its last packet; closing the generator does not free it), and a
    read stops early by design, once per seek: a server decoding new videos grew 0.15-2.4 MB per
    1,000 reads (soak audit, stop 25). ``close`` seeks to the stream's last packet, lets every
    generator read to the end (a packet or two each, demuxed, not decoded) and closes the
    container."""

    def __init__(self, container) -> None:
        self.container = container
        self._generators: list = []

    def packets(self, stream):
        gen = self.container.demux(stream)
        self._generators.append(gen)
        return gen

    def close(self) -> None:
        try:
            if self._generators:
                stream = self.container.streams.video[0]
                self.container.seek(2 ** 62, stream=stream, backward=True, any_frame=True)
                for gen in self._generators:
                    for _ in gen:
                        pass
        except Exception:  # noqa: BLE001 - only frees memory; the read's own outcome stands
            pass
        finally:
            self.container.close()


def _field_order(ctx) -> int:
    """FFmpeg's field order of a stream (0 unknown, 1 progressive, 2-5 interlaced orders)."""
    try:
        return int(ctx.field_order or 0)
    except (AttributeError, TypeError, ValueError):
        return 0


def disposable_test(codec: str, extradata: bytes | None) -> Callable[[memoryview], bool] | None:
    """A test of whether a sample of this stream is a picture no other picture refers to, for
    H.264 stored as length-prefixed NAL units (MP4/MKV: the ``avcC`` record in ``extradata``);
    None for start-code (Annex B) streams and other codecs, whose frames are all decoded. HEVC is
    left out on purpose: in multi-slice x265 streams, leaving out TRAIL_N pictures (FFmpeg's own
    ``skip_frame=NONREF`` too) changed the pixels of later frames."""
    if codec != "h264" or not extradata or extradata[0] != 1 or len(extradata) < 7:
        return None
    nal_length = (extradata[4] & 3) + 1  # avcC: lengthSizeMinusOne in byte 4
    return lambda data: h264_disposable(data, nal_length)


def _nal_headers(data, nal_length: int) -> list[int] | None:
    """The first byte of each NAL unit of a length-prefixed sample; None if malformed."""
    i, n, out = 0, len(data), []
    while i + nal_length < n:
        length = int.from_bytes(data[i:i + nal_length], "big")
        if length < 1 or i + nal_length + length > n:
            return None
        out.append(data[i + nal_length])
        i += nal_length + length
    return out if i == n else None


_H264_SLICES = frozenset({1, 2, 3, 4, 5})  # coded slices (and data partitions)
_H264_INERT = frozenset({6, 9, 12})  # SEI, access unit delimiter, filler: nothing later decodes with them


def h264_disposable(data, nal_length: int) -> bool:
    """Whether an H.264 sample is a picture no other picture refers to and carries nothing else
    the decoder keeps: coded slices that all have ``nal_ref_idc`` 0, besides only SEI, access
    unit delimiters and filler (a parameter set or end of sequence in it would be lost with it).
    A malformed sample is not."""
    headers = _nal_headers(data, nal_length)
    if not headers:
        return False
    slices = [h for h in headers if h & 0x1F in _H264_SLICES]
    return (bool(slices) and not any(h & 0x60 for h in slices)
            and all(h & 0x1F in _H264_SLICES or h & 0x1F in _H264_INERT for h in headers))


class _Output:
    """The output array of one read, filled frame by frame (from several threads): allocated at
    the first frame's shape; every later frame must have that shape."""

    def __init__(self, indices: list[int], name: str):
        self.name = name
        self.positions: dict[int, list[int]] = {}
        for p, i in enumerate(indices):
            self.positions.setdefault(int(i), []).append(p)
        self.count = len(indices)
        self.array: np.ndarray | None = None
        self.done: set[int] = set()
        self.skipped = 0  # disposable frames not decoded (runs may add to it at once: skip())
        self._lock = threading.Lock()

    def skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def put(self, index: int, frame: np.ndarray) -> None:
        with self._lock:
            if self.array is None:
                self.array = np.empty((self.count, *frame.shape), dtype=frame.dtype)
        if frame.shape != self.array.shape[1:]:
            raise CorruptVideoError(f"{self.name}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, the first "
                                    f"decoded frame {self.array.shape[2]}x{self.array.shape[1]}")
        for p in self.positions[index]:
            self.array[p] = frame
        self.done.add(index)
