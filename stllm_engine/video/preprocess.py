"""Batched frame preprocessing: the release's PIL transform, in torch.

The release (torchvision ``Resize(224, BICUBIC)`` + ``CenterCrop(224)`` + ``ToTensor`` +
``Normalize`` on PIL images) does, per frame: resize the shorter side to ``size`` (the longer to
``int(size * long / short)``; no resampling when the size already matches) with PIL's bicubic
(a = -0.5, kernel support widened by the scale when shrinking, i.e. antialiased), as a horizontal
then a vertical pass, each rounded and clipped to uint8; crop at
``top = int(round((h - size) / 2))``, ``left = int(round((w - size) / 2))``; divide by 255;
normalise with the CLIP mean/std.

On the CPU the resize runs on the uint8 frames themselves (``F.interpolate(mode='bicubic',
antialias=True)`` on a channels-last uint8 tensor: torch's SIMD port of Pillow's fixed-point
resampler, two passes with uint8 in between as PIL): 16 frames of 1280x720 -> 398x224 took 17 ms
vs 110 ms for PIL and 276 ms for the float path (1 thread). Elsewhere (CUDA) the same passes run on
float tensors, each rounded half up and clamped to [0, 255] like PIL's uint8 output
(:func:`resize_pil_like`). Cropping happens before the float conversion where no resize is needed.
**Agreement with PIL**, measured on decoded h264 frames and uniform noise (tests/
test_video_preprocess.py sizes, 1280x720 down to 100x60, portrait, upscaling): identical except for
<= 0.31% of values on the CPU uint8 path (< 0.07% on the float path), which differ by one uint8
level (the two fixed-point implementations round differently), rarely two when upscaling (the
first pass's difference is amplified by the second). Tolerance: **max |ours - PIL| <= 2/255 before
normalisation, <= 2/(255*std) ~= 0.030 after** (:data:`PIL_TOLERANCE`); 224x224 input is exact.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_TOLERANCE = 2.0 / (255.0 * min(CLIP_STD)) + 1e-5  # normalised units


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``size`` and the longer ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size`` x ``size`` crop (torchvision's rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _as_nchw_float(frames) -> torch.Tensor:
    """uint8 [T, H, W, C] (C = 1, 3 or 4; alpha dropped) -> float [T, 3, H, W] in 0..255."""
    return _as_nchw_uint8(frames).float()


def resize_pil_like(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bicubic resize of float [T, C, H, W] values 0..255 as PIL does it (see module docstring)."""
    h, w = x.shape[-2:]
    if out_w != w:
        x = F.interpolate(x, size=(h, out_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.add_(0.5).floor_().clamp_(0, 255)  # PIL rounds half up
    if out_h != h:
        x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.add_(0.5).floor_().clamp_(0, 255)
    return x


def resize_frames_uint8(frames, out_h: int, out_w: int) -> np.ndarray:
    """Resize uint8 [T, H, W, 3] frames to (out_h, out_w) as PIL's bicubic does (CPU)."""
    x = _resize_uint8(_as_nchw_uint8(frames), out_h, out_w)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def preprocess_frames(frames, size: int = 224, device: torch.device | str | None = None,
                      chunk_size: int = 16) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] (numpy or torch) -> float32 [T, 3, size, size], normalised.

    Works ``chunk_size`` frames at a time to bound memory on long high-resolution clips.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(frames) == 0:
        raise ValueError("preprocess_frames got zero frames")
    dev = torch.device(device) if device is not None else (
        frames.device if isinstance(frames, torch.Tensor) else torch.device("cpu"))
    mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
    h, w = frames.shape[1:3]
    nh, nw = resize_shape(h, w, size)
    top, left = crop_offsets(nh, nw, size)
    out = torch.empty((len(frames), 3, size, size), dtype=torch.float32, device=dev)

    def run(begin: int, end: int) -> None:
        for s in range(begin, end, chunk_size):
            chunk = frames[s:min(s + chunk_size, end)]
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.to(dev)
            if dev.type == "cpu":
                x = _resize_uint8(_as_nchw_uint8(chunk), nh, nw)[:, :, top:top + size, left:left + size]
            else:
                x = _as_nchw_uint8(chunk).to(dev).float()
                x = resize_pil_like(x, nh, nw)[:, :, top:top + size, left:left + size]
            # normalised in place in the output: one uint8 -> float32 copy of the crop and no
            # float temporary (16 frames at 224: 3.4 -> 1.4 ms; the same values)
            dst = out[s:s + len(x)]
            dst.copy_(x)
            dst.div_(255.0).sub_(mean).div_(std)

    parts = cpu_resize_parts(len(frames), (h, w) != (nh, nw)) if dev.type == "cpu" else 1
    if parts == 1:
        run(0, len(frames))
        return out
    bounds = [len(frames) * i // parts for i in range(parts + 1)]
    with ThreadPoolExecutor(parts - 1, thread_name_prefix="stllm-resize") as pool:
        rest = [pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        run(bounds[0], bounds[1])
        for f in rest:
            f.result()
    return out


def cpu_resize_parts(frames: int, resizing: bool) -> int:
    """How many groups of frames preprocess on parallel threads on the CPU: one a torch thread
    when the frames need resizing, else 1. torch's antialiased uint8 resize keeps to about one
    core (16 frames of 1280x720 -> 398x224: 13.7 ms on 1 thread, 13.2 on 2), so frame groups on
    their own threads (each op releases the GIL) did it in 6.6 ms on 2 cores."""
    if not resizing:
        return 1
    return max(1, min(frames, torch.get_num_threads()))


def _as_nchw_uint8(frames) -> torch.Tensor:
    """uint8 [T, H, W, C] -> uint8 [T, 3, H, W] view (channels-last strides, no copy for RGB)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must be uint8 [T, H, W, 3] (or 1/4 channels), got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[-1] == 4:
        x = x[..., :3]
    elif x.shape[-1] == 1:
        x = x.expand(*x.shape[:3], 3)
    return x.permute(0, 3, 1, 2)


def _resize_uint8(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """PIL-style antialiased bicubic resize of uint8 [T, 3, H, W] on the CPU (no-op if same size)."""
    if x.shape[-2:] == (out_h, out_w):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)
