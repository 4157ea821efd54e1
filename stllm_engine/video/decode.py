"""Decode only the sampled frames of a :class:`~stllm_engine.video.sources.Source`.

Backends (``backend=``): ``"auto"``: decord's index (the release's frame count, rate and
keyframes, so the same frames are sampled) with the pixels decoded by PyAV wherever PyAV's
frames are bit-identical to decord's (:class:`FastDecordReader`: 8-bit streams of common codecs;
1.3-1.5x faster here), decord's ``get_batch`` otherwise; ``"release"``: decord decodes, as the
release does (the reference ST-LLM's reader); ``"decord"`` / ``"pyav"``: that one only. Either
way PyAV reads GIFs (decord cannot) and is the fallback when decord is missing or fails; PIL reads
frame folders and still images; arrays are indexed directly. Failures end in a
:class:`~stllm_engine.video.errors.VideoError` naming the source and the problem.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from .errors import CorruptVideoError, EmptyVideoError, NotAVideoError, VideoError
from .preprocess import resize_frames_uint8, resize_shape
from .pyav_reader import PyAVReader
from .segments import map_runs, min_run_frames, split_runs
from .sources import Source, resolve_source

BACKENDS = ("auto", "release", "decord", "pyav")
DECORD_THREADS = 0  # 0: decord chooses
# Streams whose frames PyAV's FFmpeg decodes and converts to RGB bit-identically to decord's
# (0.6.0, its own FFmpeg), checked per codec and pixel format: 8-bit YUV of these codecs. Not
# here: 10-bit streams (the 10 -> 8 bit conversions differ by up to 55 levels) and MPEG-4 part 2
# (IDCTs differ by 1); they stay on decord.
PYAV_EXACT_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "mpeg2video"})
PYAV_EXACT_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12"})
# ... except 4:2:0 at an odd height: the two FFmpegs upsample the last chroma row differently
# (VP9 and MJPEG at 334x187: 3.5-5% of the values differ, by up to 75 levels).
PYAV_EVEN_HEIGHT_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})


def decode_dims(height: int, width: int, decode_size) -> tuple[int, int] | None:
    """(W, H) to decode at: ``decode_size`` int = shorter side (the preprocessing rule), or (W, H);
    None keeps the stored size."""
    if decode_size is None:
        return None
    if isinstance(decode_size, int):
        if decode_size < 1:
            raise ValueError(f"decode_size must be positive, got {decode_size}")
        nh, nw = resize_shape(height, width, decode_size)
        return nw, nh
    w, h = (int(v) for v in decode_size)
    if w < 1 or h < 1:
        raise ValueError(f"decode_size must be an int or a positive (W, H), got {decode_size!r}")
    return w, h


def import_decord():
    """decord, with PyAV imported first where it is installed: decord loads its FFmpeg 4 and
    codec libraries into the global symbol scope (RTLD_GLOBAL), and PyAV's FFmpeg, loaded after
    it, then bound unversioned codec-library symbols to decord's older copies (libvpx: PyAV's
    VP9 encoder failed to open after ``import decord``). The FFmpeg libraries themselves carry
    versioned symbols and are not mixed up either way."""
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    import decord

    return decord


class DecordReader:
    backend = "decord"
    parallel_read = True  # read(indices, workers)

    def __init__(self, src: Source, decode_size=None):
        decord = import_decord()
        self.src = src
        dims = None if decode_size is None or isinstance(decode_size, int) else decode_dims(0, 0, decode_size)
        vr = self._open(decord, dims)
        if isinstance(decode_size, int):  # the shorter side: needs the stored size first
            h, w = vr[0].shape[:2]
            dims = decode_dims(h, w, decode_size)
            if dims != (w, h):
                vr = self._open(decord, dims)
        self.num_frames, self.fps = len(vr), float(vr.get_avg_fps())
        self._vr, self._dims = vr, dims

    def _uri(self):
        """What a reader opens: the path, or a new in-memory file over the bytes."""
        return io.BytesIO(self.src.data) if self.src.data is not None else str(self.src.path)

    def _open(self, decord, dims, threads: int = DECORD_THREADS):
        w, h = dims if dims is not None else (-1, -1)
        return decord.VideoReader(self._uri(), ctx=decord.cpu(0), width=w, height=h, num_threads=threads)

    def _source_pixels(self) -> int | None:
        """Width x height of the stored frames from the container's header (PyAV; decord's API
        does not say without decoding a frame); None if PyAV cannot tell."""
        try:
            import av

            with av.open(self._uri()) as container:
                ctx = container.streams.video[0].codec_context
                return int(ctx.width) * int(ctx.height) or None
        except Exception:  # noqa: BLE001 - only a hint for splitting the decode
            return None

    def _seeks_like_one_reader(self) -> bool:
        """Whether a reader that seeks to a keyframe finds the frames one reader decoding from the
        start finds. Not when the first frames are timed before 0 (an edit list, as ``ffmpeg -ss
        -c copy`` cuts make): there decord's seeking and sequential paths disagree about which
        frame an index means, and the release reads with one reader."""
        try:
            return float(self._vr.get_frame_timestamp(0)[0]) >= 0
        except Exception:  # noqa: BLE001 - unknown: keep one reader
            return False

    def read(self, indices: list[int], workers: int = 1) -> np.ndarray:
        """The frames at ``indices``; ``workers`` > 1 decodes runs of them that start at different
        keyframes on that many new single-threaded readers in parallel
        (:func:`~.segments.split_runs`; decord releases the GIL while decoding). Single-threaded:
        with ffmpeg's own threads beside them, two readers of a 1080p clip were no faster than one
        (449 -> 434 ms; 369 ms single-threaded)."""
        keys = list(self._vr.get_key_indices())
        lo, hi = (min(indices), max(indices)) if indices else (0, 0)
        several = (workers > 1 and len(indices) > 1 and any(lo < k <= hi for k in keys)
                   and self._seeks_like_one_reader())
        runs = split_runs(indices, keys, workers, min_run_frames(self._source_pixels())) if several else [indices]
        if len(runs) == 1:
            return self._vr.get_batch(list(indices)).asnumpy()
        import decord

        def read_run(run: list[int]) -> np.ndarray:
            return self._open(decord, self._dims, threads=1).get_batch(run).asnumpy()
        return np.concatenate(map_runs(runs, read_run))


class FastDecordReader(DecordReader):
    """A :class:`DecordReader` (its frame count, rate and keyframes pick the frames, as the
    release's reader) whose ``read`` decodes with PyAV where that gives the same pixels: a full-size
    decode of a stream in ``PYAV_EXACT_CODECS`` x ``PYAV_EXACT_PIX_FMTS`` whose PyAV frame count
    equals decord's, progressive (decord's RGB of interlaced frames differs: x264 ``interlaced=1``
    by up to 181 levels). decord's RGB conversion dominated its decode: ``load_video`` of 16 of 48
    frames, interleaved over 6 clips, 224p 21.0 -> 15.7 ms, 720p 102.5 -> 67.1 ms against two
    decord readers (ad-hoc script, stop 18). Anything else, or any PyAV failure, reads through decord; ``backend``
    then says which one decoded."""

    def read(self, indices: list[int], workers: int = 1) -> np.ndarray:
        frames = self._read_pyav(indices, workers)
        if frames is not None:
            self.backend = "pyav"
            return frames
        self.backend = "decord"
        return super().read(indices, workers)

    def _read_pyav(self, indices: list[int], workers: int) -> np.ndarray | None:
        if self._dims is not None:  # a reduced-size decode: the two scalers differ
            return None
        try:
            reader = PyAVReader(self.src, threads=workers if workers > 1 else 0)
            if (reader.codec not in PYAV_EXACT_CODECS or reader.pix_fmt not in PYAV_EXACT_PIX_FMTS
                    or (reader.pix_fmt in PYAV_EVEN_HEIGHT_PIX_FMTS and reader.height % 2)
                    or reader.num_frames != self.num_frames or reader.interlaced):
                return None
            frames = reader.read(indices, workers)
            return None if reader.interlaced else frames  # (a decoded frame said so)
        except Exception:  # noqa: BLE001 - PyAV missing or failing: decord decodes instead
            return None


class FolderReader:
    """Frames of a folder, in natural name order; ``fps`` None (the folder does not say)."""

    backend = "pil"

    def __init__(self, src: Source, decode_size=None):
        self.src, self.decode_size = src, decode_size
        self.num_frames, self.fps = len(src.frame_files), None

    def read(self, indices: list[int]) -> np.ndarray:
        return _pil_frames(indices, self._frame, self.src.name, self.decode_size)

    def _frame(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.src.frame_files[i]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise CorruptVideoError(f"{self.src.name}: frame file {path.name} cannot be read: {e}") from e


class ImageReader:
    """A still-image file or bytes (JPEG, PNG, BMP, WebP) as a video of its frames: one for a
    still picture, each frame of an animated PNG / WebP; ``fps`` None."""

    backend = "pil"

    def __init__(self, src: Source, decode_size=None):
        from PIL import Image

        self.src, self.decode_size = src, decode_size
        try:
            self._image = Image.open(io.BytesIO(src.data) if src.data is not None else src.path)
            self._image.load()
        except (OSError, ValueError) as e:
            raise CorruptVideoError(f"{src.name}: corrupt {src.container} image: {e}") from e
        self.num_frames, self.fps = int(getattr(self._image, "n_frames", 1)), None

    def read(self, indices: list[int]) -> np.ndarray:
        return _pil_frames(indices, self._frame, self.src.name, self.decode_size)

    def _frame(self, i: int) -> np.ndarray:
        try:
            self._image.seek(i)
            return np.asarray(self._image.convert("RGB"))
        except (OSError, ValueError, EOFError) as e:
            raise CorruptVideoError(f"{self.src.name}: frame {i} of the {self.src.container} image "
                                    f"cannot be read: {e}") from e


def _pil_frames(indices: list[int], frame: Callable[[int], np.ndarray], name: str, decode_size) -> np.ndarray:
    """``frame(i)`` (uint8 RGB) of each index, each read once, stacked and resized; the frames
    must share a size (CorruptVideoError naming ``name`` otherwise)."""
    cache: dict[int, np.ndarray] = {}
    for i in indices:
        if i not in cache:
            cache[i] = frame(i)
    sizes = {a.shape for a in cache.values()}
    if len(sizes) > 1:
        raise CorruptVideoError(f"{name}: frames differ in size {sorted(sizes)}")
    return _maybe_resize(np.stack([cache[i] for i in indices]), decode_size)


class ArrayReader:
    backend = "array"

    def __init__(self, src: Source, decode_size=None):
        self.src, self.decode_size = src, decode_size
        self.num_frames, self.fps = src.array.shape[0], None

    def read(self, indices: list[int]) -> np.ndarray:
        return _maybe_resize(self.src.array[np.asarray(indices, dtype=np.int64)], self.decode_size)


def _maybe_resize(frames: np.ndarray, decode_size) -> np.ndarray:
    dims = decode_dims(frames.shape[1], frames.shape[2], decode_size)
    if dims is None or dims == (frames.shape[2], frames.shape[1]):
        return frames
    return resize_frames_uint8(frames, dims[1], dims[0])


class _PyAVSized(PyAVReader):
    def __init__(self, src: Source, decode_size=None):
        super().__init__(src)
        self.out_size = decode_dims(self.height, self.width, decode_size)


def _openers(src: Source, backend: str) -> list[Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    if src.kind == "folder":
        return [FolderReader]
    if src.kind == "array":
        return [ArrayReader]
    if src.is_image:
        return [ImageReader]
    if src.is_gif or backend == "pyav":
        return [_PyAVSized]
    if backend == "decord":
        return [DecordReader]
    return [FastDecordReader if backend == "auto" else DecordReader, _PyAVSized]


def read_video(src: Source, choose_indices: Callable[[int, float | None], list[int]],
               decode_size=None, backend: str = "auto", workers: int = 1):
    """Open ``src``, pick indices with ``choose_indices(num_frames, fps)``, decode those frames
    (decord: on up to ``workers`` readers in parallel where the frames span several keyframes).

    Returns ``(frames uint8 [n, H, W, 3], indices, num_frames, fps, backend_used)``. With
    ``backend="auto"`` a decord failure (import, open or decode) falls back to PyAV; errors from
    ``choose_indices`` (e.g. a bound outside the video) propagate unchanged.
    """
    failures: list[str] = []
    last_exc: BaseException | None = None
    for opener in _openers(src, backend):
        try:
            reader = opener(src, decode_size)
        except VideoError:
            raise
        except Exception as e:  # decord/PyAV raise their own types (RuntimeError, DECORDError, ...)
            failures.append(f"{getattr(opener, 'backend', opener.__name__)} could not open it: "
                            f"{_short(e)}")
            last_exc = e
            continue
        indices = choose_indices(reader.num_frames, reader.fps)
        try:
            parallel = workers > 1 and getattr(reader, "parallel_read", False)
            frames = reader.read(indices, workers) if parallel else reader.read(indices)
        except VideoError:
            raise
        except Exception as e:
            failures.append(f"{reader.backend} could not decode frames {_preview(indices)}: {_short(e)}")
            last_exc = e
            continue
        return frames, indices, reader.num_frames, reader.fps, reader.backend
    raise _classify(src, failures, opened=any("could not decode" in f for f in failures)) from last_exc


def _classify(src: Source, failures: list[str], opened: bool) -> VideoError:
    detail = "; ".join(failures)
    if "cannot find video stream" in detail:  # decord's words for a container without video
        return EmptyVideoError(f"{src.name}: container holds no video stream (zero frames): {detail}")
    if opened or src.container is not None:
        what = f"looks like {src.container}" if src.container else "opened as a video"
        return CorruptVideoError(f"{src.name}: corrupt video stream ({what} but cannot be decoded): {detail}")
    if src.data is None:  # a file: its bytes are not echoed (a server's client could read them)
        return NotAVideoError(f"{src.name}: not a video (unrecognised content): {detail}")
    return NotAVideoError(f"{src.name}: not a video (unrecognised content starting {src.head(16)!r}): {detail}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _preview(indices: list[int]) -> str:
    return str(list(indices)) if len(indices) <= 8 else f"[{indices[0]}, ..., {indices[-1]}] ({len(indices)})"


def decode_frames(source, indices: list[int], decode_size=None, backend: str = "auto") -> np.ndarray:
    """Decode exactly ``indices`` (0-based, in presentation order) of any source as uint8 RGB."""
    src = source if isinstance(source, Source) else resolve_source(source)

    def fixed(num_frames: int, fps) -> list[int]:
        bad = [i for i in indices if not 0 <= i < num_frames]
        if bad:
            raise IndexError(f"{src.name}: frame indices {bad[:8]} outside 0..{num_frames - 1}")
        return list(indices)

    return read_video(src, fixed, decode_size, backend)[0]


def probe(source, backend: str = "auto") -> tuple[int, float | None]:
    """(number of frames, fps or None); decodes at most the first frame."""
    src = source if isinstance(source, Source) else resolve_source(source)
    info: dict = {}

    def record(n: int, fps) -> list[int]:
        info.update(n=n, fps=fps)
        return [0]

    read_video(src, record, None, backend)
    return info["n"], info["fps"]
