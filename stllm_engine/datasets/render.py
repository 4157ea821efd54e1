"""Frames for synthetic clips: filled shapes on a plain background, encoded as mp4.

A frame is uint8 ``[H, W, 3]``; a clip ``[T, H, W, 3]``. Shapes are placed by centre and
half-extent in pixels (floats), so motion is sub-pixel smooth before encoding. Drawing and
encoding reuse :mod:`stllm_engine.testing.videos`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stllm_engine.testing.videos import draw_shape, write_frames

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (32, 32, 32)
_HALF = {"circle": 1.0, "square": 0.85, "triangle": 1.0}  # similar areas for one radius


def blank_clip(num_frames: int, size: int) -> np.ndarray:
    """A clip of ``num_frames`` background frames, ``size`` x ``size`` pixels."""
    if num_frames <= 0 or size <= 0:
        raise ValueError(f"clip needs num_frames > 0 and size > 0, got {num_frames}, {size}")
    clip = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    clip[...] = BACKGROUND
    return clip


def draw(frame: np.ndarray, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    """Paint one shape of radius ``r`` centred at (cx, cy) into ``frame`` in place."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if shape not in _HALF:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    draw_shape(frame, shape, (cx, cy), r * _HALF[shape], COLOURS[colour])


def write_mp4(path: str | Path, clip: np.ndarray, fps: int) -> Path:
    """Encode ``clip`` uint8 [T, H, W, 3] (even H, W) as an H.264 mp4."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"clip must be uint8 [T, H, W, 3], got {clip.dtype} {clip.shape}")
    if clip.shape[1] % 2 or clip.shape[2] % 2:
        raise ValueError(f"synthetic clips need even frame sizes, got {clip.shape[2]}x{clip.shape[1]}")
    return write_frames(path, clip, fps=fps, fmt="mp4", crf=12)
