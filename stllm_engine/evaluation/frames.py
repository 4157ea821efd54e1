"""Read the sampled frames of one MVBench item as the model's normalised input tensor.

Videos go through :func:`stllm_engine.video.load_video` (MVBench sampling, bound, fps-1 mode).
GIFs and frame folders (``00001.jpg`` ..., first index 1) use the release's fixed fps (25 / 3)
with the same sampling rule, are read with PIL and preprocessed by
:func:`stllm_engine.video.preprocess.preprocess_frames`.
"""
from __future__ import annotations

import numpy as np
import torch

from stllm_engine.evaluation.mvbench_data import DEFAULT_FPS, MVBenchDataError, MVBenchItem
from stllm_engine.video.preprocess import preprocess_frames
from stllm_engine.video.sampling import mvbench_indices


def read_item_frames(item: MVBenchItem, num_segments: int = 16, size: int = 224) -> torch.Tensor:
    """float32 [T, 3, size, size] for ``item``; ``num_segments`` 0 selects the fps-1 mode."""
    if not item.video_path.exists():
        raise MVBenchDataError(f"task {item.task!r}: video {item.video_path} not found")
    if item.data_type == "video":
        from stllm_engine.video import load_video

        return load_video(str(item.video_path), num_frames=max(num_segments, 1), sampling="mvbench",
                          bound=item.bound, fps1=num_segments == 0, size=size).frames
    if item.data_type == "gif":
        return preprocess_frames(_read_gif(item, num_segments), size)
    if item.data_type == "frame":
        return preprocess_frames(_read_folder(item, num_segments), size)
    raise MVBenchDataError(f"unknown data type {item.data_type!r}")


def _read_gif(item: MVBenchItem, num_segments: int) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(item.video_path) as gif:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    idx = mvbench_indices(len(frames), DEFAULT_FPS["gif"], num_segments, item.bound,
                          source=str(item.video_path))
    # the release's read_gif walks the GIF keeping frames whose index is sampled: each once, so a
    # GIF shorter than the segments gives fewer frames (videos and frame folders keep repeats)
    return np.stack([frames[i] for i in sorted(set(idx))])


def _read_folder(item: MVBenchItem, num_segments: int) -> np.ndarray:
    from PIL import Image

    if not item.video_path.is_dir():
        raise MVBenchDataError(f"frame item {item.video_path} is not a folder")
    count = sum(1 for _ in item.video_path.iterdir())
    idx = mvbench_indices(count, DEFAULT_FPS["frame"], num_segments, item.bound, first_idx=1,
                          source=str(item.video_path))
    images = []
    for i in idx:
        path = item.video_path / f"{i:05d}.jpg"
        if not path.is_file():
            raise MVBenchDataError(f"frame {path} not found (folder has {count} files)")
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    return np.stack(images)
