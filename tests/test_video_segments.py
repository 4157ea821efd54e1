"""Parallel decoding over keyframe segments: the split plan (stllm_engine/video/segments.py) and
decord readers decoding its runs in parallel, on real encoded files (the frames carry their index
as a marker, so the tests check which frames came back, and that they equal one reader's)."""
import itertools

import numpy as np
import pytest

from stllm_engine.testing import videos as tv
from stllm_engine.video import CorruptVideoError, decode, load_video, uniform_indices
from stllm_engine.video.segments import MIN_RUN_FRAMES, decode_cost, min_run_frames, split_runs


def brute_cost(indices, keys):
    """Frames one reader decodes, simulated frame by frame."""
    pos, total = None, 0
    for t in indices:
        k = max((x for x in keys if x <= t), default=0)
        if pos is None or k > pos:  # seek to the keyframe, decode k..t
            total += t - k + 1
        else:
            total += t - pos
        pos = t
    return total


@pytest.mark.parametrize("indices,keys,want", [
    ([5], [0], 6),
    ([5, 5], [0], 6),  # a repeated frame costs nothing more
    ([1, 4, 7], [0], 8),
    ([1, 14, 27], [0, 12, 24], 2 + 3 + 4),  # a seek to every frame's keyframe
    ([3, 10, 13], [0, 12], 4 + 7 + 2),
    ([0, 47], [0, 12, 24, 36], 1 + 12),
])
def test_decode_cost(indices, keys, want):
    assert decode_cost(indices, keys) == want == brute_cost(indices, keys)


def best_largest_run(indices, keys, n):
    """The smallest largest-run cost of any split of ``indices`` into exactly n contiguous runs."""
    L = len(indices)
    cost = [[decode_cost(indices[a:b], keys) if b > a else 0 for b in range(L + 1)] for a in range(L + 1)]
    inf = float("inf")
    dp = [[inf] * (L + 1) for _ in range(n + 1)]  # dp[r][j]: the first j indices in r runs
    dp[0][0] = 0
    for r in range(1, n + 1):
        for j in range(r, L + 1):
            dp[r][j] = min(max(dp[r - 1][i], cost[i][j]) for i in range(r - 1, j))
    return dp[n][L]


def check_runs(runs, indices):
    assert list(itertools.chain(*runs)) == list(indices) and all(runs)


@pytest.mark.parametrize("total,gop,frames", [(480, 60, 16), (480, 250, 16), (480, 12, 16), (1000, 30, 64),
                                              (301, 7, 33)])
@pytest.mark.parametrize("parts", [2, 3, 8])
def test_split_runs_is_balanced_and_keeps_the_order(total, gop, frames, parts):
    indices, keys = uniform_indices(total, frames), list(range(0, total, gop))
    runs = split_runs(indices, keys, parts, min_frames=16)
    check_runs(runs, indices)
    assert 2 <= len(runs) <= parts
    assert all(decode_cost(r, keys) >= 16 for r in runs)
    worst = max(decode_cost(r, keys) for r in runs)
    # no contiguous split into as many runs has a smaller largest run: brute force over the cut
    # points for up to 3 runs, an exhaustive dynamic programme over all splits for more
    n = len(runs)
    if n <= 3:
        best = min(max(decode_cost(indices[a:b], keys) for a, b in zip((0,) + cut, cut + (len(indices),)))
                   for cut in itertools.combinations(range(1, len(indices)), n - 1))
    else:
        best = best_largest_run(indices, keys, n)
    assert worst == best
    assert worst < decode_cost(indices, keys)


@pytest.mark.parametrize("indices,keys,parts,min_frames", [
    (uniform_indices(48, 16), [0, 12, 24, 36], 2, 32),  # a short clip: one reader
    (uniform_indices(480, 16), list(range(0, 480, 60)), 1, 32),  # one part asked for
    ([40, 3, 200, 100], [0, 50, 100, 150], 2, 1),  # not sorted: decoded as asked, one reader
    ([7], [0], 4, 1),
])
def test_split_runs_keeps_one_run(indices, keys, parts, min_frames):
    assert split_runs(indices, keys, parts, min_frames) == [list(indices)]


def test_split_runs_uses_fewer_parts_than_asked_when_runs_would_be_short():
    indices, keys = uniform_indices(480, 16), list(range(0, 480, 60))
    total = decode_cost(indices, keys)
    runs = split_runs(indices, keys, 64, min_frames=100)
    check_runs(runs, indices)
    assert 2 <= len(runs) <= total // 100 and all(decode_cost(r, keys) >= 100 for r in runs)


@pytest.mark.parametrize("pixels,want", [(None, MIN_RUN_FRAMES), (0, MIN_RUN_FRAMES), (398 * 224, 12),
                                          (854 * 480, 4), (1280 * 720, 4), (1920 * 1080, 4), (3840 * 2160, 4)])
def test_min_run_frames_scales_with_the_frame_size(pixels, want):
    assert min_run_frames(pixels) == want


def test_the_split_needs_enough_pixels(long_clips, monkeypatch):
    """The reader reads the stored frame size from the header; 96x64 frames are too small for a
    second reader at 16 of 240 frames, so the decode stays on one reader unless the runs are
    allowed to be short."""
    src = decode.resolve_source(long_clips["gop20"])
    reader = decode.DecordReader(src)
    assert reader._source_pixels() == 96 * 64
    assert decode.DecordReader(decode.resolve_source(long_clips["gop20"].read_bytes()))._source_pixels() == 96 * 64
    calls = []
    real = decode.split_runs

    def spy(i, k, p, m):
        calls.append(m)
        return real(i, k, p, m)
    monkeypatch.setattr(decode, "split_runs", spy)
    frames = reader.read(uniform_indices(240, 16), workers=2)
    assert calls == [min_run_frames(96 * 64)] and len(real(uniform_indices(240, 16), list(range(0, 240, 20)), 2,
                                                           calls[0])) == 1
    assert [tv.read_frame_index(f) for f in frames] == uniform_indices(240, 16)
    calls.clear()
    reader.read([3, 7, 11], workers=2)  # no keyframe among them: no split asked for
    assert calls == []


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return {"gop20": tv.write_video(d / "gop20.mp4", 240, (96, 64), 24, seed=4, gop=20),
            "bframes": tv.write_video(d / "bframes.mp4", 240, (96, 64), 24, seed=5, gop=48, bframes=2)}


@pytest.mark.parametrize("clip", ["gop20", "bframes", "gop20 bytes"])
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("num_frames", [16, 61])
@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_parallel_decode_returns_the_same_frames(long_clips, clip, workers, num_frames, backend, monkeypatch):
    """Runs over keyframe segments on parallel readers (decord's, or PyAV containers for
    ``pyav`` and the engine's ``auto``) give one reader's frames, in order."""
    import decord

    from stllm_engine.video import pyav_reader

    name, _, kind = clip.partition(" ")
    path = long_clips[name].read_bytes() if kind == "bytes" else long_clips[name]
    keys = list(decord.VideoReader(str(long_clips[name])).get_key_indices())
    indices = uniform_indices(240, num_frames)
    monkeypatch.setattr(decode, "min_run_frames", lambda pixels: 8)
    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 8)
    assert len(split_runs(indices, keys, workers, min_frames=8)) > 1  # the split happens
    passes = []
    real_seeking = pyav_reader.PyAVReader._read_seeking

    def seeking(self, wanted, out, threads):
        passes.append((list(wanted), threads))
        return real_seeking(self, wanted, out, threads)
    monkeypatch.setattr(pyav_reader.PyAVReader, "_read_seeking", seeking)
    one = load_video(path, num_frames, decode_workers=1, preprocess=False, backend="decord")
    par = load_video(path, num_frames, decode_workers=workers, preprocess=False, backend=backend)
    assert par.backend == ("decord" if backend == "decord" else "pyav")
    if backend != "decord":  # one single-threaded container per run, the runs covering the frames
        assert len(passes) > 1 and all(t == 1 for _, t in passes)
        assert sorted(itertools.chain(*(w for w, _ in passes))) == sorted(set(indices))
    assert par.indices == one.indices == indices
    assert np.array_equal(par.frames, one.frames)
    assert [tv.read_frame_index(f) for f in par.frames] == indices
    pre = load_video(path, num_frames, decode_workers=workers, size=56, backend=backend)
    assert np.array_equal(pre.frames.numpy(), load_video(path, num_frames, size=56).frames.numpy())


@pytest.mark.parametrize("decode_size", [48, (40, 30)])
def test_parallel_pyav_runs_at_a_reduced_decode_size(long_clips, decode_size, monkeypatch):
    """PyAV's scaled decode (``decode_size``) on parallel containers equals its one-container decode."""
    from stllm_engine.video import pyav_reader

    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 8)
    one = load_video(long_clips["gop20"], 16, decode_size=decode_size, backend="pyav", preprocess=False)
    par = load_video(long_clips["gop20"], 16, decode_size=decode_size, backend="pyav", preprocess=False,
                     decode_workers=3)
    want = (48, 72) if decode_size == 48 else (30, 40)  # 96x64 frames: the shorter side 48, or (W, H)
    assert par.frames.shape == (16, *want, 3) and np.array_equal(par.frames, one.frames)
    assert par.indices == one.indices == uniform_indices(240, 16)


@pytest.mark.parametrize("workers", [1, 2])
def test_pyav_repeats_and_unsorted_indices_keep_their_places(long_clips, workers, monkeypatch):
    """The output holds each requested position, repeats and any order included, whether the
    frames came from one container or several."""
    from stllm_engine.video import pyav_reader
    from stllm_engine.video.sources import resolve_source

    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 8)
    indices = [200, 3, 3, 120, 61, 200, 0, 239]
    got = pyav_reader.PyAVReader(resolve_source(long_clips["gop20"])).read(indices, workers)
    assert got.shape[0] == len(indices) and [tv.read_frame_index(f) for f in got] == indices


@pytest.mark.parametrize("clip", ["gop20", "bframes", "gop20 bytes"])
@pytest.mark.parametrize("num_frames", [4, 16, 61, 240])
@pytest.mark.parametrize("bound", [None, (4.0, 7.5)])
def test_the_engine_decode_equals_the_release_decode_across_keyframes(long_clips, clip, num_frames, bound):
    """``auto`` (PyAV decoding after decord's index; sparse frames seek from keyframe to
    keyframe, dense ones decode straight through) against ``release`` (decord): same indices,
    same pixels, the frames carrying their own index."""
    name, _, kind = clip.partition(" ")
    path = long_clips[name].read_bytes() if kind == "bytes" else long_clips[name]
    kw = dict(sampling="mvbench", bound=bound) if bound else {}
    auto = load_video(path, num_frames, decode_workers=2, preprocess=False, **kw)
    release = load_video(path, num_frames, preprocess=False, backend="release", **kw)
    assert auto.backend == "pyav" and release.backend == "decord"
    assert auto.indices == release.indices and np.array_equal(auto.frames, release.frames)
    assert [tv.read_frame_index(f) for f in auto.frames] == auto.indices


def test_a_failing_parallel_reader_fails_the_decode_cleanly(long_clips, monkeypatch):
    """A run's reader failing on its thread (decord raising mid-file) ends as a failed decode:
    ``release`` (decord decodes, as the release) falls back to PyAV (the same frames), ``decord``
    raises CorruptVideoError."""
    path = long_clips["gop20"]
    monkeypatch.setattr(decode, "min_run_frames", lambda pixels: 8)
    real_open = decode.DecordReader._open
    opened = []

    class Broken:
        def get_batch(self, indices):
            raise RuntimeError("simulated decode failure")

    def open_(self, decord, dims, threads=decode.DECORD_THREADS):
        opened.append(threads)  # the file's reader, then one single-threaded reader per run
        return Broken() if len(opened) == 3 else real_open(self, decord, dims, threads)
    monkeypatch.setattr(decode.DecordReader, "_open", open_)
    want = load_video(path, 16, backend="pyav", preprocess=False).frames
    got = load_video(path, 16, decode_workers=2, preprocess=False, backend="release")
    assert opened == [decode.DECORD_THREADS, 1, 1] and got.backend == "pyav" and np.array_equal(got.frames, want)
    opened.clear()
    with pytest.raises(CorruptVideoError, match="simulated decode failure"):
        load_video(path, 16, decode_workers=2, backend="decord")


def test_a_failing_parallel_pyav_container_fails_the_decode_cleanly(long_clips, monkeypatch):
    """A run's PyAV container failing on its thread: the engine's ``auto`` decode falls back to
    decord (the same frames), ``pyav`` raises CorruptVideoError naming the failure."""
    from stllm_engine.video import pyav_reader

    path = long_clips["gop20"]
    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 8)
    want = load_video(path, 16, backend="release", preprocess=False).frames
    real_seeking = pyav_reader.PyAVReader._read_seeking
    runs = []

    def seeking(self, wanted, out, threads):
        runs.append(wanted[0])
        if wanted[0] != uniform_indices(240, 16)[0]:  # every run but the first fails
            raise RuntimeError("simulated container failure")
        return real_seeking(self, wanted, out, threads)
    monkeypatch.setattr(pyav_reader.PyAVReader, "_read_seeking", seeking)
    got = load_video(path, 16, decode_workers=2, preprocess=False)
    assert len(runs) == 2 and got.backend == "decord" and np.array_equal(got.frames, want)
    with pytest.raises(CorruptVideoError, match="simulated container failure"):
        load_video(path, 16, decode_workers=2, backend="pyav")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_decode_workers_must_be_a_positive_int(long_clips, bad):
    with pytest.raises(ValueError, match="decode_workers"):
        load_video(long_clips["gop20"], 4, decode_workers=bad)


def test_pyav_output_refuses_a_frame_of_another_size():
    from stllm_engine.video.pyav_reader import _Output

    out = _Output([5, 9], "clip.mp4")
    out.put(5, np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(CorruptVideoError, match=r"clip.mp4: frame 9 is 8x4, the first decoded frame 6x4"):
        out.put(9, np.zeros((4, 8, 3), np.uint8))
