"""PyAV reads leave out the disposable frames that are not wanted (H.264 pictures no other picture
refers to: slices all with nal_ref_idc 0, no parameter set in the sample), on real encoded files
whose frames carry their index:
which frames are disposable (against FFmpeg's own ``skip_frame=NONREF``), that they are not
decoded, and that every wanted frame, disposable or not, decodes to the same pixels."""
import av
import numpy as np
import pytest

from stllm_engine.testing import videos as tv
from stllm_engine.video import load_video, uniform_indices
from stllm_engine.video import pyav_reader
from stllm_engine.video.pyav_reader import PyAVReader, disposable_test, h264_disposable
from stllm_engine.video.segments import decode_cost
from stllm_engine.video.sources import resolve_source


def nal(header: int, payload: bytes = b"\x88\x84", length: int = 4) -> bytes:
    body = bytes([header]) + payload
    return len(body).to_bytes(length, "big") + body


@pytest.mark.parametrize("sample,length,want", [
    (nal(0x01), 4, True),                            # non-reference slice (nal_ref_idc 0, type 1)
    (nal(0x41), 4, False),                           # reference slice (nal_ref_idc 2)
    (nal(0x21), 4, False),                           # nal_ref_idc 1
    (nal(0x65), 4, False),                           # IDR slice
    (nal(0x06) + nal(0x01), 4, True),                # SEI, then a non-reference slice
    (nal(0x09) + nal(0x06), 4, False),               # no slice at all
    (nal(0x01) + nal(0x41), 4, False),               # one of two slices (or fields) is a reference
    (nal(0x01) + nal(0x01), 4, True),
    (nal(0x09) + nal(0x06) + nal(0x01) + nal(0x0C), 4, True),  # AUD, SEI, the slice, filler
    (nal(0x68) + nal(0x01), 4, False),               # a PPS update rides in the sample: decoded
    (nal(0x67) + nal(0x68) + nal(0x01), 4, False),   # SPS + PPS
    (nal(0x01) + nal(0x0A), 4, False),               # end of sequence
    (nal(0x0E) + nal(0x01), 4, False),               # an SVC prefix unit: not known to be inert
    (nal(0x01, length=2), 2, True),                  # 2-byte length prefixes
    (nal(0x41, length=1), 1, False),
    (nal(0x01)[:-1], 4, False),                      # truncated: malformed, decoded
    (nal(0x01) + b"\x00", 4, False),                 # trailing bytes
    (b"\x00\x00\x00\x00" + nal(0x01), 4, False),     # a zero-length unit
    (b"", 4, False),
])
def test_h264_disposable_reads_nal_ref_idc(sample, length, want):
    assert h264_disposable(memoryview(sample), length) is want


def avcc(length_size: int) -> bytes:
    return bytes([1, 0x4D, 0x40, 0x1F, 0xFC | (length_size - 1), 0xE1, 0x00])


@pytest.mark.parametrize("codec,extradata,sample,want", [
    ("h264", avcc(4), nal(0x01), True), ("h264", avcc(2), nal(0x01, length=2), True),
    ("h264", avcc(4), nal(0x41), False),
])
def test_disposable_test_reads_the_stream_record(codec, extradata, sample, want):
    assert disposable_test(codec, extradata)(memoryview(sample)) is want


@pytest.mark.parametrize("codec,extradata", [
    ("h264", b"\x00\x00\x00\x01\x67\x4d"),  # Annex B: start codes
    ("h264", b""), ("h264", None), ("vp9", avcc(4)),
    ("hevc", bytes([1] + [0] * 20 + [0x0F, 0])),  # HEVC: left out (multi-slice x265 went wrong)
])
def test_no_disposable_test_for_other_streams(codec, extradata):
    assert disposable_test(codec, extradata) is None


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("disposable")
    return {"b2": tv.write_video(d / "b2.mp4", 240, (96, 64), 24, seed=5, gop=48, bframes=2),
            "b3": tv.write_video(d / "b3.mkv", 120, (64, 48), 24, seed=6, gop=60, bframes=3),
            "p": tv.write_video(d / "p.mp4", 120, (64, 48), 24, seed=7, gop=20),
            "x265": tv.write_video(d / "x265.mp4", 96, (64, 48), 24, seed=8, gop=48, codec="libx265")}


def nonref_ords(path) -> list[int]:
    """FFmpeg's own answer: the frames its H.264 decoder drops with ``skip_frame=NONREF``."""
    with av.open(str(path)) as c:
        every = sorted(f.pts for f in c.decode(video=0))
    with av.open(str(path)) as c:
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        kept = {f.pts for f in c.decode(video=0)}
    return [o for o, p in enumerate(every) if p not in kept]


@pytest.mark.parametrize("clip", ["b2", "b3", "p", "x265"])
def test_the_disposable_frames_are_those_ffmpeg_skips_as_non_reference(clips, clip):
    """H.264: FFmpeg's own skip_frame=NONREF set. HEVC: none, though FFmpeg has some (in multi-slice
    x265 streams leaving them out changed later frames' pixels, FFmpeg's NONREF decode's too)."""
    reader = PyAVReader(resolve_source(clips[clip]))
    assert reader.codec == ("hevc" if clip == "x265" else "h264")
    assert reader.disposable_ords == ([] if clip == "x265" else nonref_ords(clips[clip]))
    assert (len(reader.disposable_ords) > 0) is (clip not in ("p", "x265"))
    if clip == "x265":
        assert nonref_ords(clips[clip])  # what is not skipped


@pytest.mark.parametrize("clip", ["b2", "b3"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("pick", ["uniform", "disposable", "every"])
def test_unwanted_disposable_frames_are_not_decoded(clips, clip, workers, pick, monkeypatch):
    """Sparse reads skip disposable frames, and wanted disposable frames still come back: the
    pixels equal a read that decodes every packet."""
    monkeypatch.setattr(pyav_reader, "min_run_frames", lambda pixels: 8)
    reader = PyAVReader(resolve_source(clips[clip]))
    n = reader.num_frames
    indices = {"uniform": uniform_indices(n, 16), "disposable": reader.disposable_ords[::5],
               "every": list(range(n))}[pick]
    got = reader.read(indices, workers)
    skipped = reader.frames_skipped
    assert [tv.read_frame_index(f) for f in got] == indices
    reader.skip_disposable = False  # the plain decode: every packet
    assert np.array_equal(got, reader.read(indices, workers)) and reader.frames_skipped == 0
    if workers == 1:  # (a parallel run also skips those before its first frame that another run decodes)
        assert skipped == len(set(reader.disposable_ords) - set(indices)) if pick == "every" else \
            0 < skipped <= len(set(reader.disposable_ords) - set(indices))
    else:
        assert skipped <= len(reader.disposable_ords) and (skipped > 0 or pick == "every")


@pytest.mark.parametrize("clip", ["b2", "x265"])
def test_the_engine_decode_of_a_b_frame_clip_equals_decord(clips, clip):
    """The engine's reader (``auto``: PyAV, skipping) gives the release's decord frames."""
    got = load_video(clips[clip], 16, preprocess=False, decode_workers=2)
    assert got.backend == "pyav"
    want = load_video(clips[clip], 16, preprocess=False, backend="release")
    assert np.array_equal(got.frames, want.frames) and got.indices == want.indices


def brute_cost(indices, keys, disposable):
    """Frames one reader decodes, simulated frame by frame (unwanted disposable ones skipped)."""
    pos, total, want = None, 0, set(indices)
    for t in indices:
        k = max((x for x in keys if x <= t), default=0)
        start = k if pos is None or k > pos else pos + 1
        total += sum(1 for f in range(start, t + 1) if f in want or f not in disposable)
        pos = t
    return total


@pytest.mark.parametrize("indices,keys,disposable", [
    ([10], [0], [2, 5, 8]), ([4, 10], [0], [2, 5, 8]), ([5, 10], [0], [2, 5, 8]),
    ([1, 14, 27], [0, 12, 24], [13, 15, 25, 26]), ([0, 47], [0, 12, 24, 36], list(range(1, 47, 3))),
    ([3, 10, 13], [0, 12], []),
])
def test_decode_cost_leaves_out_disposable_frames(indices, keys, disposable):
    assert decode_cost(indices, keys, disposable) == brute_cost(indices, keys, set(disposable))


def test_interlaced_h264_is_left_to_decord(tmp_path):
    """decord's RGB of interlaced frames differs from PyAV's (x264 interlaced=1: up to 181 levels
    on every frame), so the engine's decode reads such a stream through decord, as the release."""
    frames = tv.render_frames(24, size=(64, 48), seed=9)
    path = tmp_path / "interlaced.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=24)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        st.options = {"preset": "veryfast", "crf": "23", "x264-params": "interlaced=1:tff=1:bframes=2:keyint=12"}
        for f in frames:
            for packet in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    assert PyAVReader(resolve_source(path)).interlaced
    got = load_video(path, 8, preprocess=False, decode_workers=2)
    want = load_video(path, 8, preprocess=False, backend="release")
    assert got.backend == "decord" and np.array_equal(got.frames, want.frames)
    progressive = tv.write_video(tmp_path / "progressive.mp4", 12, (64, 48), 24, seed=10)
    assert not PyAVReader(resolve_source(progressive)).interlaced
