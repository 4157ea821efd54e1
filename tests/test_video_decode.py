"""Decoding real encoded files: every source kind, both backends, reduced resolution, bad inputs.

Each test frame carries its index as a block marker (stllm_engine.testing.videos), so the tests
check *which* frames came back, not just how many.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from stllm_engine.testing import videos as tv
from stllm_engine.video.sources import resolve_source
from stllm_engine.video import (CLIP_MEAN, CLIP_STD, CorruptVideoError, EmptyVideoError, NotAVideoError,
                                VideoBoundError, VideoError, VideoNotFoundError, decode, decode_frames,
                                load_video, probe, pyav_reader, uniform_indices)

T, W, H, FPS = 32, 160, 120, 8


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    out = {
        "mp4": tv.write_video(d / "clip.mp4", T, (W, H), FPS, seed=1, gop=5, bframes=2),
        "mkv": tv.write_video(d / "clip.mkv", T, (W, H), FPS, seed=1),
        "gif": tv.write_video(d / "clip.gif", T, (W, H), FPS, seed=1),
        "jpg": tv.write_video(d / "jpgs", T, (W, H), FPS, fmt="jpg", seed=1),
        "png": tv.write_video(d / "pngs", T, (W, H), FPS, fmt="png", seed=1),
        "odd": tv.write_video(d / "odd.mp4", 12, (161, 121), FPS, seed=2),
        "portrait": tv.write_video(d / "portrait.mp4", 12, (90, 160), FPS, seed=3),
    }
    out["bytes"] = out["mp4"].read_bytes()
    out["gif_bytes"] = out["gif"].read_bytes()
    out["array"] = tv.render_frames(T, (W, H), seed=1)
    out["tensor"] = torch.from_numpy(out["array"].copy())
    return out


def markers(frames) -> list[int]:
    return [tv.read_frame_index(f) for f in frames]


def unnormalize(frames: torch.Tensor) -> np.ndarray:
    """Preprocessed [T, 3, S, S] back to uint8 [T, S, S, 3] (to read the markers)."""
    x = frames * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


KINDS = ["mp4", "mkv", "bytes", "gif", "gif_bytes", "jpg", "png", "array", "tensor"]
INDEX_SETS = [[0], [T - 1], [5, 3, 3, 30, 0], list(range(0, T, 3)), [17, 18, 19]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda i: "-".join(map(str, i[:5])))
def test_every_source_decodes_the_requested_frames(media, kind, indices):
    frames = decode_frames(media[kind], indices)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), H, W, 3)
    assert markers(frames) == indices


@pytest.mark.parametrize("kind", KINDS)
def test_load_video_uniform_every_source(media, kind):
    v = load_video(media[kind], num_frames=8)
    assert v.indices == [2, 6, 10, 14, 17, 21, 25, 29]
    assert v.frames.shape == (8, 3, 224, 224) and v.frames.dtype == torch.float32
    assert v.num_total_frames == T
    assert markers(unnormalize(v.frames)) == v.indices  # the marker survives resize + crop
    if kind in ("mp4", "mkv", "bytes"):
        assert v.fps == pytest.approx(FPS)
    if kind in ("jpg", "png", "array", "tensor"):
        assert v.fps is None


@pytest.mark.parametrize("kind", ["mp4", "bytes", "mkv", "odd", "portrait"])
@pytest.mark.parametrize("decode_size", [None, 56, "half"])
def test_decord_and_pyav_agree(media, kind, decode_size):
    n = 12 if kind in ("odd", "portrait") else T
    if decode_size == "half":  # (W, H) keeping the aspect, so the marker stays readable
        decode_size = {"odd": (80, 60), "portrait": (45, 80)}.get(kind, (80, 60))
    idx = [n - 1, 0, 7, 8, 3, 3]
    a = decode_frames(media[kind], idx, decode_size=decode_size, backend="decord")
    b = decode_frames(media[kind], idx, decode_size=decode_size, backend="pyav")
    assert a.shape == b.shape
    assert markers(a) == markers(b) == idx
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    if decode_size is None:
        assert diff.max() == 0  # same ffmpeg decoder and colour conversion
    else:
        assert diff.mean() < 1.5  # different scalers; only edges differ


@pytest.mark.parametrize("codec,pix_fmt,fast", [
    ("libx264", "yuv420p", True), ("libx264", "yuv444p", True), ("libx264", "yuvj420p", True),
    ("libx265", "yuv420p", True), ("libvpx-vp9", "yuv420p", True),
    ("libx264", "yuv420p10le", False), ("mpeg4", "yuv420p", False),  # PyAV's pixels differ: decord decodes
])
def test_auto_decodes_with_pyav_only_where_its_pixels_are_decords(tmp_path, codec, pix_fmt, fast):
    """``auto`` (the engine): decord's frame index with PyAV's decode where that is bit-identical;
    ``release`` (the reference): decord decodes. Same indices and pixels either way."""
    path = tv.write_video(tmp_path / "clip.mkv", 24, (W, H), FPS, seed=4, codec=codec, pix_fmt=pix_fmt,
                          **({"bframes": 2, "gop": 7} if codec == "libx264" else {}))
    for n in (16, 5):
        auto = load_video(path, num_frames=n, preprocess=False)
        release = load_video(path, num_frames=n, preprocess=False, backend="release")
        assert release.backend == "decord" and auto.backend == ("pyav" if fast else "decord")
        assert auto.indices == release.indices and np.array_equal(auto.frames, release.frames)
        assert markers(auto.frames) == auto.indices


@pytest.mark.parametrize("codec,pix_fmt", [("mjpeg", "yuvj420p"), ("libvpx-vp9", "yuv420p")])
@pytest.mark.parametrize("height", [120, 121])
def test_odd_height_420_stays_on_decord(tmp_path, codec, pix_fmt, height):
    """4:2:0 at an odd height: the two FFmpegs upsample the last chroma row differently (up to
    75 levels), so ``auto`` decodes with decord there; an even height keeps PyAV. Same pixels."""
    path = tv.write_video(tmp_path / "clip.mkv", 10, (W, height), FPS, seed=5, codec=codec, pix_fmt=pix_fmt)
    auto = load_video(path, num_frames=5, preprocess=False)
    release = load_video(path, num_frames=5, preprocess=False, backend="release")
    assert auto.backend == ("pyav" if height % 2 == 0 else "decord")
    assert auto.indices == release.indices and np.array_equal(auto.frames, release.frames)


def _remux(src, dst, shift_pts):
    """Copy ``src``'s video packets to ``dst`` with pts/dts = ``shift_pts(i, pts)`` (packet i)."""
    import av

    with av.open(str(src)) as ic, av.open(str(dst), "w") as oc:
        ist = ic.streams.video[0]
        ost = oc.add_stream_from_template(ist)
        for i, pk in enumerate(p for p in ic.demux(ist) if p.size):
            pk.stream = ost
            pk.pts, pk.dts = shift_pts(i, pk.pts), shift_pts(i, pk.dts)
            pk.time_base = ist.time_base
            oc.mux(pk)
    return dst


def test_pyav_reads_a_stream_with_repeated_timestamps(tmp_path):
    """Two packets with one timestamp (an MJPEG mkv): PyAV decodes every frame in order instead
    of losing one to a pts lookup (decord cannot open such a file; ``auto`` falls back to PyAV)."""
    src = tv.write_video(tmp_path / "src.mkv", 30, (W, H), FPS, seed=6, codec="mjpeg", pix_fmt="yuvj420p")
    with __import__("av").open(str(src)) as c:
        step = int(1 / (FPS * c.streams.video[0].time_base))
    dup = _remux(src, tmp_path / "dup.mkv", lambda i, t: (i - (i in (10, 20))) * step)
    for backend in ("pyav", "auto"):
        v = load_video(dup, num_frames=30, preprocess=False, backend=backend)
        assert v.backend == "pyav" and markers(v.frames) == v.indices
        assert {9, 10, 19, 20} <= set(v.indices)  # both frames of each shared timestamp


def test_parallel_decord_readers_keep_one_readers_frames_on_negative_start(tmp_path):
    """An mp4 whose first frames are timed before 0 (an ``ffmpeg -ss -c copy`` cut): decord's
    seeking and sequential paths disagree on it, so ``decode_workers`` > 1 keeps the one reader
    the release reads with, and gets its frames."""
    import decord

    import av

    src = tmp_path / "src.mp4"
    with av.open(str(src), "w") as out:  # x264's defaults (scene cuts: keyframes 0, 8, 20, ...)
        stream = out.add_stream("libx264", rate=24, options={"g": "12", "bf": "3"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for f in tv.render_frames(48, (320, 240), seed=0):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(src)) as c:
        step = int(1 / (24 * c.streams.video[0].time_base))
    cut = _remux(src, tmp_path / "cut.mp4", lambda i, t: t - 3 * step)
    vr = decord.VideoReader(str(cut))
    assert float(vr.get_frame_timestamp(0)[0]) < 0
    want = vr.get_batch(uniform_indices(len(vr), 16)).asnumpy()
    for backend in ("release", "auto"):
        for workers in (1, 2, 4):
            v = load_video(cut, num_frames=16, preprocess=False, backend=backend, decode_workers=workers)
            assert np.array_equal(v.frames, want), (backend, workers)


def test_auto_falls_back_to_decord_when_pyav_fails(media, monkeypatch):
    want = load_video(media["mp4"], num_frames=8, preprocess=False, backend="release")

    def broken(self, indices):
        raise RuntimeError("simulated PyAV failure")
    monkeypatch.setattr(pyav_reader.PyAVReader, "read", broken)
    got = load_video(media["mp4"], num_frames=8, preprocess=False)
    assert got.backend == "decord" and np.array_equal(got.frames, want.frames)


@pytest.mark.parametrize("kind", ["mp4", "gif", "jpg", "array"])
@pytest.mark.parametrize("decode_size,shape", [(56, (56, 74)), ((80, 60), (60, 80)), (120, (120, 160))])
def test_reduced_resolution_decode(media, kind, decode_size, shape):
    idx = [1, 20, 31]
    frames = decode_frames(media[kind], idx, decode_size=decode_size)
    assert frames.shape == (3, *shape, 3)
    assert markers(frames) == idx


def test_decode_size_224_matches_full_decode_after_preprocessing(tmp_path):
    path = tv.write_video(tmp_path / "big.mp4", 8, (448, 336), FPS)
    full = load_video(path, num_frames=4)
    small = load_video(path, num_frames=4, decode_size=224)
    assert small.indices == full.indices
    assert markers(unnormalize(small.frames)) == full.indices
    # decoding at 224 (ffmpeg scaler) vs decoding full then PIL-like bicubic: close, not equal
    assert (small.frames - full.frames).abs().mean() < 0.05


def test_pyav_seeks_instead_of_decoding_from_the_start(media, monkeypatch):
    def no_sequential(*a, **k):
        raise AssertionError("sequential decode used for a seekable mp4")

    monkeypatch.setattr(pyav_reader.PyAVReader, "_read_sequential", no_sequential)
    idx = [30, 2, 16, 31, 9]
    assert markers(decode_frames(media["mp4"], idx, backend="pyav")) == idx


class _TrackedContainer:
    """A PyAV container whose demux generators say whether they were run to their end."""

    def __init__(self, container, log: list):
        self._c, self._log = container, log

    def __getattr__(self, name):
        return getattr(self._c, name)

    def demux(self, *a, **k):
        state = {"finished": False}
        self._log.append(state)

        def gen():
            yield from self._c.demux(*a, **k)
            state["finished"] = True
        return gen()


@pytest.mark.parametrize("kind", ["mp4", "bytes", "gif"])
@pytest.mark.parametrize("workers", [1, 3])
def test_pyav_reads_finish_every_demux_generator(media, monkeypatch, kind, workers):
    """Soak audit: PyAV leaks ~160 bytes of native memory for each demux generator left before
    the end of the file, and reads stop early by design (once per seek). Every generator a read
    opens is now run to its end before its container closes, and the frames stay the same."""
    log: list = []
    opened = pyav_reader.PyAVReader._open
    monkeypatch.setattr(pyav_reader.PyAVReader, "_open", lambda self: _TrackedContainer(opened(self), log))
    reader = pyav_reader.PyAVReader(resolve_source(media[kind]))
    del log[:]  # (the opening scan reads to the end itself)
    idx = [2, 9, 16, 30, 31] if kind != "gif" else [3, 7]
    assert markers(reader.read(idx, workers)) == idx
    assert log and all(s["finished"] for s in log), log


def test_pyav_seeking_reads_leak_no_native_memory(tmp_path):
    """The leak itself, through glibc's heap counters: 300 seeking reads of a clip with a
    keyframe every 4 frames, 8 frames 8 apart (a seek each), grew the heap ~1.26 kB a read
    before (one lost packet per seek), 0 after."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        import gc
        gc.collect()
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    clip = tv.write_video(tmp_path / "gop4.mp4", 64, (64, 48), FPS, seed=4, gop=4)
    reader = pyav_reader.PyAVReader(resolve_source(clip))
    idx = list(range(1, 64, 8))  # a seek a frame
    for _ in range(30):
        reader.read(idx)
    before = in_use()
    for _ in range(300):
        reader.read(idx)
    grown = (in_use() - before) / 300
    assert grown < 400, f"{grown:.0f} bytes of native heap per read"


def test_auto_falls_back_to_pyav_when_decord_fails(media, monkeypatch):
    class Broken(decode.DecordReader):
        def read(self, indices):
            raise RuntimeError("decord exploded")

    monkeypatch.setattr(decode, "DecordReader", Broken)
    v = load_video(media["mp4"], num_frames=4)
    assert v.backend == "pyav" and markers(unnormalize(v.frames)) == v.indices == [4, 12, 19, 27]
    with pytest.raises(CorruptVideoError, match="decord could not decode frames .*decord exploded"):
        load_video(media["mp4"], num_frames=4, backend="decord")


def test_auto_falls_back_when_decord_is_missing(media, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    v = load_video(media["bytes"], num_frames=4)
    assert v.backend == "pyav" and v.indices == [4, 12, 19, 27]


def test_mvbench_sampling_per_source_kind(media):
    v = load_video(media["mp4"], num_frames=8, sampling="mvbench", bound=(1, 3))
    assert v.indices == [9, 11, 13, 15, 17, 19, 21, 23] == markers(unnormalize(v.frames))
    # GIFs use the release's 25 fps: bound (0.2, 1.0) -> frames 5..25, seg 5
    g = load_video(media["gif"], num_frames=4, sampling="mvbench", bound=(0.2, 1.0))
    assert g.indices == [7, 12, 17, 22] == markers(unnormalize(g.frames))
    # folders: 3 fps, files numbered from 1; release indices [3, 4, 5, 5, 6, 7, 7, 8] -> positions - 1
    f = load_video(media["jpg"], num_frames=8, sampling="mvbench", bound=(1, 3))
    assert f.indices == [2, 3, 4, 4, 5, 6, 6, 7] == markers(unnormalize(f.frames))
    # fps-1 mode: 31 / 8 = 3.875 s -> 4 segments
    assert load_video(media["mp4"], sampling="mvbench", fps1=True).indices == [3, 11, 19, 26]


def test_arrays_need_fps_for_bounds(media):
    with pytest.raises(VideoError, match="no frame rate; pass fps="):
        load_video(media["array"], sampling="mvbench", fps1=True)
    v = load_video(media["array"], sampling="mvbench", bound=(1, 3), num_frames=8, fps=8)
    assert v.indices == [9, 11, 13, 15, 17, 19, 21, 23] and v.fps == 8


def test_content_hash(media, tmp_path):
    a = load_video(media["mp4"], num_frames=2)
    copy = tmp_path / "copy.mp4"
    shutil.copy(media["mp4"], copy)
    assert load_video(copy, num_frames=2).content_hash == a.content_hash
    assert load_video(media["bytes"], num_frames=2).content_hash == a.content_hash
    assert load_video(media["mkv"], num_frames=2).content_hash != a.content_hash
    arr = load_video(media["array"], num_frames=2).content_hash
    assert load_video(media["tensor"], num_frames=2).content_hash == arr
    assert load_video(media["array"][:-1], num_frames=2).content_hash != arr
    assert len(a.content_hash) == 64
    copy.write_bytes(media["mkv"].read_bytes())  # same path, new content -> new hash
    assert load_video(copy, num_frames=2).content_hash != a.content_hash


def test_the_reference_read_hashes_nothing(media, tmp_path):
    """The reference's reads (``hash_content=False``) leave the file-hash memo alone: before, the
    reference's run of a benchmark paid the hash that the engine's run then found memoised."""
    from stllm_engine.video import sources

    copy = tmp_path / "fresh.mp4"
    shutil.copy(media["mp4"], copy)
    src = sources.resolve_source(copy)
    v = load_video(copy, num_frames=2, backend="release", hash_content=False)
    assert v.content_hash is None and sources.memoised_hash(src) is None
    assert load_video(copy, num_frames=2).content_hash == sources.memoised_hash(src) is not None


def test_a_same_size_overwrite_with_the_old_mtime_is_hashed_again(tmp_path):
    """``cp -p`` / ``rsync -t`` / ``tar x`` write new content and set the old mtime: the memo
    (path, size, mtime) answered the old content's hash, so the engine answered about the old
    video. The ctime still moves."""
    import hashlib

    from stllm_engine.video import sources

    path = tmp_path / "clip.bin"
    path.write_bytes(b"A" * 4096)
    st = path.stat()
    src = sources.resolve_source(path)
    assert sources.content_hash(src) == hashlib.sha256(b"A" * 4096).hexdigest() == sources.memoised_hash(src)
    path.write_bytes(b"B" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert sources.memoised_hash(src) is None
    assert sources.content_hash(src) == hashlib.sha256(b"B" * 4096).hexdigest()


def test_large_files_hash_on_a_thread_beside_the_decode(media, tmp_path, monkeypatch):
    """A file not hashed before and at least HASH_THREAD_BYTES large is hashed on a thread while
    it decodes; the digest is the same sha256, memoised afterwards; small files hash inline."""
    import hashlib
    import threading

    from stllm_engine.video import memoised_hash, resolve_source, sources

    path = tmp_path / "big.mp4"
    shutil.copy(media["mp4"], path)
    threads = []
    real = sources.content_hash

    def spy(src):
        threads.append(threading.current_thread().name)
        return real(src)
    monkeypatch.setattr(sources, "content_hash", spy)
    monkeypatch.setattr(sources, "HASH_THREAD_BYTES", 1)
    assert memoised_hash(resolve_source(path)) is None
    v = load_video(path, num_frames=4)
    assert v.content_hash == hashlib.sha256(path.read_bytes()).hexdigest() == memoised_hash(resolve_source(path))
    assert len(threads) == 1 and threads[0].startswith("stllm-hash")
    load_video(path, num_frames=4)  # memoised: hashed inline (a stat and a lookup)
    assert threads[1] == threading.current_thread().name
    monkeypatch.setattr(sources, "HASH_THREAD_BYTES", 1 << 40)
    small = tmp_path / "small.mp4"
    shutil.copy(media["mkv"], small)
    load_video(small, num_frames=4)
    assert threads[2] == threading.current_thread().name
    with pytest.raises(VideoNotFoundError):
        load_video(tmp_path / "missing.mp4", num_frames=4)


def test_probe(media):
    assert probe(media["mp4"]) == (T, pytest.approx(FPS))
    assert probe(media["jpg"]) == (T, None)


# --- bad inputs ------------------------------------------------------------------------------
BACKENDS = ["auto", "pyav", "decord"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_path(tmp_path, backend):
    p = tmp_path / "nope.mp4"
    with pytest.raises(VideoNotFoundError, match="nope.mp4 does not exist") as info:
        load_video(p, backend=backend)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_file_renamed_mp4(tmp_path, backend):
    """The error names the file but not its bytes (OpenAI-client audit: it echoed a file's first
    16 bytes, so a server's client could read the head of any file, file:///etc/passwd's too);
    bytes a caller sent itself are still shown."""
    p = tmp_path / "notes.mp4"
    p.write_text("these are my notes, not a video\n" * 4)
    with pytest.raises(NotAVideoError, match=r"notes.mp4: not a video") as e:
        load_video(p, backend=backend)
    assert "these are my" not in str(e.value)
    with pytest.raises(NotAVideoError, match=r"not a video .*these are my"):
        load_video(p.read_bytes(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_frame_file(tmp_path, backend):
    p = tv.write_empty_video(tmp_path / "empty.mp4")
    with pytest.raises(EmptyVideoError, match="empty.mp4: .*zero frames"):
        load_video(p, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["truncate", "no_index"])
def test_corrupt_mp4(tmp_path, backend, mode):
    p = tv.write_corrupt_video(tmp_path / f"broken_{mode}.mp4", mode=mode)
    with pytest.raises(CorruptVideoError, match=f"broken_{mode}.mp4: corrupt"):
        load_video(p, backend=backend)
    with pytest.raises(CorruptVideoError):
        load_video(p.read_bytes(), backend=backend)


@pytest.mark.parametrize("kind", ["mp4", "gif", "jpg"])
def test_bound_beyond_the_end(media, kind):
    with pytest.raises(VideoBoundError, match=r"bound \(40s, 50s\) lies outside the video") as info:
        load_video(media[kind], sampling="mvbench", bound=(40, 50))
    assert str(media[kind]) in str(info.value)


@pytest.mark.parametrize("make,err,match", [
    (lambda d: d / "zero.mp4", EmptyVideoError, "file is empty"),
    (lambda d: d / "nothing", EmptyVideoError, "holds no frame images"),
    (lambda d: b"", EmptyVideoError, "bytes are empty"),
    (lambda d: b"\x00\x01garbage" * 40, NotAVideoError, "not a video"),
    (lambda d: np.zeros((0, 8, 8, 3), np.uint8), EmptyVideoError, "zero frames"),
    (lambda d: np.zeros((4, 8, 8, 3), np.float32), NotAVideoError, "must be uint8"),
    (lambda d: np.zeros((4, 8, 8), np.uint8), NotAVideoError, r"\[T, H, W, 3\]"),
    (lambda d: 42, NotAVideoError, "unsupported video source of type int"),
    (lambda d: "", VideoNotFoundError, "the path is empty"),  # not the working directory's frames
    (lambda d: "https://example.com/a.mp4", VideoNotFoundError, "is a URL; .*nothing is downloaded"),
    (lambda d: "rtsp://camera.local/stream", VideoNotFoundError, "is a URL"),
    (lambda d: b"\xff\xd8\xff\xe0" + b"\x00" * 300, CorruptVideoError, "corrupt jpeg image"),
])
def test_other_bad_inputs(tmp_path, make, err, match):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("no frames here")
    with pytest.raises(err, match=match):
        load_video(make(tmp_path))


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bmp", "webp"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_a_still_image_is_a_one_frame_video(tmp_path, fmt, as_bytes):
    """A single image file (decord read a JPEG as a stream with no frames) or its bytes, whatever
    its name says: a video of one frame (the chat rule samples min(total, num_frames) frames)."""
    from PIL import Image

    img = tv.render_frame(7, (W, H), seed=1)
    path = tmp_path / f"still.{'img' if fmt == 'bmp' else fmt}"  # the content decides, not the suffix
    Image.fromarray(img).save(path, format=fmt.upper(), **({"quality": 95} if fmt in ("jpeg", "webp") else {}))
    src = path.read_bytes() if as_bytes else path
    assert probe(src) == (1, None)
    f = load_video(src, num_frames=4, preprocess=False)
    assert f.frames.shape == (1, H, W, 3) and f.indices == [0] and f.backend == "pil"
    assert markers(f.frames) == [7]
    assert markers(decode_frames(src, [0, 0, 0])) == [7] * 3
    if fmt in ("png", "bmp"):  # lossless
        assert np.array_equal(f.frames[0], img)


def test_animated_png_frames(tmp_path):
    from PIL import Image

    frames = tv.render_frames(6, (W, H), seed=1)
    path = tmp_path / "anim.png"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(a) for a in frames[1:]],
                                    duration=125)
    assert probe(path) == (6, None)
    assert markers(decode_frames(path, [5, 0, 3])) == [5, 0, 3]


def test_unreadable_frame_in_folder(tmp_path):
    folder = tv.write_video(tmp_path / "frames", 6, (W, H), fmt="png")
    (folder / "00003.png").write_text("not a png")
    with pytest.raises(CorruptVideoError, match="frame file 00003.png cannot be read"):
        load_video(folder, num_frames=6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampling="random"), "unknown sampling"),
    (dict(bound=(0, 1)), "apply to sampling='mvbench' only"),
    (dict(fps1=True), "apply to sampling='mvbench' only"),
    (dict(num_frames=0), "num_frames"),
    (dict(backend="ffmpeg"), "unknown video backend"),
])
def test_bad_arguments(media, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_video(media["mp4"], **kwargs)


def test_pyav_keeps_its_codec_libraries_once_the_engine_loaded_decord(tmp_path):
    """The engine imports its video stack (decord loads its FFmpeg 4 libraries globally): PyAV,
    imported first, still opens its own libvpx (it failed with EINVAL when decord came first)."""
    code = ("import sys; from stllm_engine.engine.llm_engine import _import_video_stack; _import_video_stack(); "
            "from stllm_engine.testing.videos import write_video; "
            "write_video(sys.argv[1], 8, (64, 48), codec='libvpx-vp9'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.mkv")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert load_video(tmp_path / "c.mkv", num_frames=8, preprocess=False).frames.shape == (8, 48, 64, 3)
