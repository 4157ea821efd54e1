"""Batched torch preprocessing against the release's PIL path (Resize shorter side, BICUBIC;
CenterCrop; ToTensor; Normalize), re-derived here with PIL directly."""
import numpy as np
import pytest
import torch
from PIL import Image

from stllm_engine.testing.videos import render_frames, write_video
from stllm_engine.video import CLIP_MEAN, CLIP_STD, PIL_TOLERANCE, decode_frames, preprocess_frames
from stllm_engine.video.preprocess import crop_offsets, resize_frames_uint8, resize_shape


def pil_reference(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """One frame through PIL the way torchvision's Resize(size) + CenterCrop(size) do it."""
    img = Image.fromarray(frame)
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    a = np.asarray(img)[top:top + size, left:left + size].astype(np.float32) / 255.0
    return ((a - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)


SIZES = [(1280, 720), (224, 224), (320, 240), (161, 121), (120, 200), (300, 224), (224, 300),
         (225, 223), (100, 60), (640, 360), (160, 120)]


@pytest.mark.parametrize("wh", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_pil_on_decoded_frames(tmp_path, wh):
    path = write_video(tmp_path / "v.mp4", 2, wh, seed=wh[0])
    frames = decode_frames(path, [0, 1])
    noise = np.random.default_rng(wh[1]).integers(0, 256, (1, wh[1], wh[0], 3), dtype=np.uint8)
    frames = np.concatenate([frames, noise])
    ours = preprocess_frames(frames).numpy()
    ref = np.stack([pil_reference(f) for f in frames])
    assert ours.shape == ref.shape == (3, 3, 224, 224) and ours.dtype == np.float32
    diff = np.abs(ours - ref)
    assert diff.max() <= PIL_TOLERANCE
    assert (diff > 1e-5).mean() < 5e-3  # off-by-one-level values are rare (measured <= 0.31%)
    if wh == (224, 224):
        assert diff.max() < 1e-6  # no resampling at all


@pytest.mark.parametrize("size", [112, 64, 97])
def test_other_output_sizes(size):
    frames = render_frames(2, (150, 110), seed=3)
    ours = preprocess_frames(frames, size=size).numpy()
    ref = np.stack([pil_reference(f, size) for f in frames])
    assert ours.shape == (2, 3, size, size)
    assert np.abs(ours - ref).max() <= PIL_TOLERANCE


@pytest.mark.parametrize("hw,size,shape,offsets", [
    ((720, 1280), 224, (224, 398), (0, 87)),  # int(398.2); (398-224)/2 = 87
    ((121, 161), 224, (224, 298), (0, 37)),
    ((200, 120), 224, (373, 224), (74, 0)),  # portrait: (373-224)/2 = 74.5 -> 74 (half to even)
    ((224, 224), 224, (224, 224), (0, 0)),
])
def test_resize_shape_and_crop_offsets(hw, size, shape, offsets):
    assert resize_shape(*hw, size) == shape
    assert crop_offsets(*shape, size) == offsets


def test_crop_rounding_half_to_even():
    assert crop_offsets(224, 299, 224) == (0, 38)  # 37.5 -> 38
    assert crop_offsets(224, 297, 224) == (0, 36)  # 36.5 -> 36


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunking_and_input_types_agree(chunk):
    frames = render_frames(5, (96, 72), seed=4)
    base = preprocess_frames(frames)
    assert torch.equal(preprocess_frames(frames, chunk_size=chunk), base)
    assert torch.equal(preprocess_frames(torch.from_numpy(frames), chunk_size=chunk), base)


@pytest.mark.parametrize("threads,frames", [(1, 5), (2, 5), (3, 5), (4, 2), (8, 1)])
@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_parallel_frame_groups_equal_one_thread(threads, frames, chunk):
    """On the CPU frames that need resizing split into one group a torch thread (ragged groups,
    more threads than frames, chunks inside groups): the same tensor as one group."""
    from stllm_engine.video.preprocess import cpu_resize_parts

    x = render_frames(frames, (200, 120), seed=frames)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = preprocess_frames(x, chunk_size=chunk)
        torch.set_num_threads(threads)
        assert cpu_resize_parts(frames, True) == min(threads, frames)
        assert cpu_resize_parts(frames, False) == 1
        assert torch.equal(preprocess_frames(x, chunk_size=chunk), want)
    finally:
        torch.set_num_threads(old)


def test_alpha_and_gray_channels():
    rgb = render_frames(2, (80, 64), seed=5)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:3] + (1,), 7, np.uint8)], axis=-1)
    assert torch.equal(preprocess_frames(rgba), preprocess_frames(rgb))
    gray = rgb[..., :1]
    assert torch.equal(preprocess_frames(gray), preprocess_frames(np.repeat(gray, 3, axis=-1)))


@pytest.mark.parametrize("out_hw", [(60, 80), (240, 320), (33, 47)])
def test_resize_frames_uint8_matches_pil(out_hw):
    frames = render_frames(2, (160, 120), seed=6)
    ours = resize_frames_uint8(frames, *out_hw)
    ref = np.stack([np.asarray(Image.fromarray(f).resize(out_hw[::-1], Image.BICUBIC)) for f in frames])
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-2  # tiny outputs: more edge pixels


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"\[T, H, W, 3\]"),
    (np.zeros((2, 8, 8, 2), np.uint8), r"\[T, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3), np.uint8), "zero frames"),
])
def test_rejects_bad_frames(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess_frames(bad)
