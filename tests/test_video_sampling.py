"""Sampling rules against hand-computed index lists (rounding is half-to-even, as in the release)."""
import numpy as np
import pytest

from stllm_engine.video import VideoBoundError, VideoError
from stllm_engine.video.sampling import fps1_segments, mvbench_indices, uniform_indices


# uniform: seg = (total-1)/n, frame i = (round(seg*i) + round(seg*(i+1))) // 2
@pytest.mark.parametrize("total,n,expected", [
    (32, 8, [2, 6, 10, 14, 17, 21, 25, 29]),  # seg 3.875; 15.5 -> 16
    (10, 4, [1, 3, 5, 8]),  # seg 2.25; 4.5 -> 4 (half to even)
    (6, 4, [0, 1, 3, 4]),  # seg 1.25; 2.5 -> 2 (half-up would give [0, 2, 3, 4])
    (100, 16, [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 83, 90, 96]),
    (5, 16, [0, 1, 2, 2, 3]),  # total < num_frames: n = total, repeats possible
    (16, 16, [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 13, 14]),  # 7.5 -> 8
    (2, 8, [0, 0]),
    (1, 16, [0]),
    (3, 1, [1]),
])
def test_uniform_hand_computed(total, n, expected):
    assert uniform_indices(total, n) == expected


@pytest.mark.parametrize("total,n", [(0, 4), (-1, 4), (10, 0), (10, -2), (10.0, 4)])
def test_uniform_rejects_bad_args(total, n):
    with pytest.raises(ValueError, match="uniform_indices"):
        uniform_indices(total, n)


# mvbench: frame i = int(start_idx + seg/2 + round(seg*i)), seg = (end_idx - start_idx)/num_segments
@pytest.mark.parametrize("total,fps,segs,bound,expected", [
    (32, 8.0, 8, None, [1, 5, 9, 13, 17, 20, 24, 28]),  # max_frame 31, seg 3.875
    (32, 8.0, 8, (1, 3), [9, 11, 13, 15, 17, 19, 21, 23]),  # 8..24, seg 2
    (32, 8.0, 4, (2, 10), [17, 21, 25, 28]),  # end past the video: clamped to 31, seg 3.75
    (32, 8.0, 4, (0.3125, 2.3125), [4, 8, 12, 16]),  # round(2.5) = 2, round(18.5) = 18
    (32, 8.0, 4, (-5, 2), [2, 6, 10, 14]),  # negative start clamped to 0
    (10, 2.0, 16, None, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8]),  # more segments than frames
    # fps-1 mode (num_segments 0): clamp(floor(seconds), 4, 16)
    (32, 8.0, 0, None, [3, 11, 19, 26]),  # 31/8 = 3.875 s -> 4 (lower clamp)
    (100, 10.0, 0, None, [5, 16, 27, 38, 49, 60, 71, 82, 93]),  # 9.9 s -> 9, seg 11
    (200, 10.0, 0, None, [6, 18, 31, 43, 56, 68, 81, 93, 106, 118, 130, 143, 155, 168, 180, 193]),  # 19.9 s -> 16
    (100, 10.0, 0, (0.5, 6.7), [10, 20, 31, 41, 51, 62]),  # bound length 6.2 s -> 6
    (32, 8.0, 0, (0, 2), [2, 6, 10, 14]),  # bound length 2 s -> 4
])
def test_mvbench_hand_computed(total, fps, segs, bound, expected):
    assert mvbench_indices(total, fps, segs, bound) == expected


def test_mvbench_frame_folder_is_one_based():
    # release read_frame: max_frame = number of files, first_idx = 1; fps 3
    assert mvbench_indices(32, 3.0, 8, (1, 3), first_idx=1) == [3, 4, 5, 5, 6, 7, 7, 8]
    assert mvbench_indices(30, 3.0, 4, None, first_idx=1) == [4, 11, 18, 26]  # 1..30, seg 7.25; 14.5 -> 14


@pytest.mark.parametrize("seconds,expected", [
    (0.0, 4), (3.99, 4), (4.0, 4), (4.5, 4), (9.9, 9), (15.99, 15), (16.0, 16), (16.5, 16), (1e6, 16)])
def test_fps1_clamp(seconds, expected):
    assert fps1_segments(seconds) == expected


@pytest.mark.parametrize("bound,match", [
    ((10, 12), r"bound \(10s, 12s\) lies outside the video, which lasts 4s \(32 frames at 8 fps\)"),
    ((4.1, 5.0), "lies outside the video"),  # start frame round(32.8) = 33, two past the last
    ((-3, -1), "lies outside the video"),
    ((3, 1), "not an increasing pair"),
    ((float("nan"), 1), "not an increasing pair"),
])
def test_mvbench_bound_errors(bound, match):
    with pytest.raises(VideoBoundError, match=match) as info:
        mvbench_indices(32, 8.0, 8, bound, source="clip.mp4")
    assert "clip.mp4" in str(info.value)
    assert isinstance(info.value, VideoError) and isinstance(info.value, ValueError)


def test_mvbench_bound_at_the_last_frame_is_valid():
    assert mvbench_indices(32, 8.0, 2, (3.875, 3.9)) == [31, 31]


def release_get_index(total: int, fps: float, n: int, bound) -> list[int]:
    """The release's get_index, line by line (no checks)."""
    max_frame = total - 1
    start_idx, end_idx = max(0, round(bound[0] * fps)), min(round(bound[1] * fps), max_frame)
    seg = (end_idx - start_idx) / n
    return [int(start_idx + seg / 2 + np.round(seg * i)) for i in range(n)]


@pytest.mark.parametrize("total,fps,bound", [(48, 24.0, (1.99, 2.0)), (48, 24.0, (2.0, 2.5)), (32, 8.0, (4.0, 5.0))])
def test_mvbench_bound_starting_in_the_last_half_frame_samples_the_release_frames(total, fps, bound):
    """A start that rounds to one past the last frame (the video's end, within half a frame) is
    not outside: the release samples the last frames (its segment runs backwards by one)."""
    want = release_get_index(total, fps, 8, bound)
    assert mvbench_indices(total, fps, 8, bound) == want
    assert all(total - 2 <= i <= total - 1 for i in want)


def test_mvbench_folder_bound_before_first_file():
    with pytest.raises(VideoBoundError, match="selects no frame"):
        mvbench_indices(30, 3.0, 4, (0.0, 0.1), first_idx=1)


@pytest.mark.parametrize("args", [(0, 8.0, 8), (32, 0.0, 8), (32, float("inf"), 8), (32, 8.0, -1)])
def test_mvbench_rejects_bad_args(args):
    with pytest.raises(ValueError, match="mvbench_indices"):
        mvbench_indices(*args)
