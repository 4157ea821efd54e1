"""Real encoded test videos of moving synthetic shapes (mp4, GIF, folders of JPEG/PNG frames).

Every frame carries its frame index as a 12-bit block pattern (2 rows x 6 columns of black/white
blocks) along the top of the frame's *central square* (side ``min(W, H)``). A center crop keeps
that square, so :func:`read_frame_index` reads the index back from a decoded frame, a
reduced-resolution decode, or a resized + center-cropped frame alike; the blocks are large solid
areas, so they survive h264/mpeg4 compression and GIF palettes.

Content is a pure function of (frame index, size, seed, num_frames): a seeded background colour and
a few shapes (circle, square, triangle) moving on straight lines that bounce off the frame edges.
The drawing functions work in place on ``[H, W, 3]`` uint8 arrays and are meant for reuse (the
synthetic-QA data draws its scenes with them).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
MARKER_ROWS, MARKER_COLS = 2, 6
MARKER_BITS = MARKER_ROWS * MARKER_COLS  # frame indices are stored modulo 2**12
VIDEO_SUFFIXES = {".mp4": "mp4", ".mkv": "mkv", ".gif": "gif"}
FRAME_FORMATS = ("jpg", "png")


# --- drawing (in place on [H, W, 3] uint8) ------------------------------------------------------
def _grid(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    return np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres (y, x)


def draw_circle(img: np.ndarray, center: tuple[float, float], radius: float, color) -> np.ndarray:
    """Fill a disc at ``center`` = (x, y) in pixels."""
    yy, xx = _grid(img)
    img[(xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius ** 2] = color
    return img


def draw_square(img: np.ndarray, center: tuple[float, float], half: float, color) -> np.ndarray:
    """Fill an axis-aligned square of side ``2 * half`` centred at (x, y)."""
    yy, xx = _grid(img)
    img[(np.abs(xx - center[0]) <= half) & (np.abs(yy - center[1]) <= half)] = color
    return img


def draw_triangle(img: np.ndarray, center: tuple[float, float], half: float, color) -> np.ndarray:
    """Fill an upward isosceles triangle inscribed in the square of half side ``half`` at (x, y)."""
    yy, xx = _grid(img)
    cx, cy = center
    t = (yy - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
    inside = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * half)
    img[inside] = color
    return img


DRAW = {"circle": draw_circle, "square": draw_square, "triangle": draw_triangle}


def draw_shape(img: np.ndarray, kind: str, center: tuple[float, float], half: float, color) -> np.ndarray:
    """Draw ``kind`` (one of :data:`SHAPES`); ``color`` is an RGB triple or a :data:`COLORS` name."""
    if kind not in DRAW:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    rgb = COLORS[color] if isinstance(color, str) else color
    return DRAW[kind](img, center, half, rgb)


# --- scenes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MovingShape:
    """A shape moving on a straight line (fractions of the frame per frame), bouncing at the edges."""

    kind: str
    color: str
    half: float  # half size as a fraction of min(W, H)
    start: tuple[float, float]  # (x, y) as fractions of (W, H)
    velocity: tuple[float, float]  # fractions of (W, H) per frame

    def center(self, index: int, size: tuple[int, int]) -> tuple[float, float]:
        """Pixel centre (x, y) at frame ``index`` in a frame of ``size`` = (W, H)."""
        w, h = size
        r = self.half * min(w, h)
        out = []
        for p0, v, extent in ((self.start[0], self.velocity[0], w),
                              (self.start[1], self.velocity[1], h)):
            lo, hi = r, max(extent - r, r + 1e-6)
            span = hi - lo
            pos = (p0 * extent - lo + v * extent * index) % (2 * span)  # triangle wave = bounce
            out.append(lo + (pos if pos <= span else 2 * span - pos))
        return out[0], out[1]


def scene_shapes(seed: int = 0, num_shapes: int = 3) -> list[MovingShape]:
    """Deterministic shapes for ``seed``: one of each kind first, distinct colours."""
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    picked = rng.permutation(len(colors))[:num_shapes]
    shapes = []
    for i in range(num_shapes):
        speed = rng.uniform(0.02, 0.06, size=2) * rng.choice([-1, 1], size=2)
        shapes.append(MovingShape(kind=SHAPES[i % len(SHAPES)], color=colors[picked[i % len(picked)]],
                                  half=float(rng.uniform(0.08, 0.14)),
                                  start=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.35, 0.8))),
                                  velocity=(float(speed[0]), float(speed[1]))))
    return shapes


def _marker_blocks(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each marker bit, most significant first, in a frame of (W, H)."""
    w, h = size
    s = min(w, h)
    ox, oy = (w - s) / 2, (h - s) / 2
    bw, bh = 0.75 * s / MARKER_COLS, s / 6 / MARKER_ROWS
    boxes = []
    for r in range(MARKER_ROWS):
        for c in range(MARKER_COLS):
            x0, y0 = ox + s / 8 + c * bw, oy + r * bh
            boxes.append((round(x0), round(y0), round(x0 + bw), round(y0 + bh)))
    return boxes


def draw_frame_index(img: np.ndarray, index: int) -> np.ndarray:
    """Write ``index % 4096`` as black (0) / white (1) blocks; see the module docstring."""
    h, w = img.shape[:2]
    value = index % (1 << MARKER_BITS)
    for bit, (x0, y0, x1, y1) in enumerate(_marker_blocks((w, h))):
        on = (value >> (MARKER_BITS - 1 - bit)) & 1
        img[y0:y1, x0:x1] = 255 if on else 0
    return img


def read_frame_index(frame) -> int:
    """Read the index marker back from an RGB uint8 frame ``[H, W, 3]`` (numpy or torch)."""
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"read_frame_index expects [H, W, 3], got shape {a.shape}")
    h, w = a.shape[:2]
    value = 0
    for x0, y0, x1, y1 in _marker_blocks((w, h)):
        mx, my = (x1 - x0) // 4, (y1 - y0) // 4  # inner half of the block
        patch = a[y0 + my:max(y1 - my, y0 + my + 1), x0 + mx:max(x1 - mx, x0 + mx + 1)]
        value = (value << 1) | int(patch.astype(np.float32).mean() > 127.5)
    return value


def render_frame(index: int, size: tuple[int, int] = (320, 240), seed: int = 0,
                 shapes: list[MovingShape] | None = None) -> np.ndarray:
    """One frame ``[H, W, 3]`` uint8: background, moving shapes, then the index marker."""
    w, h = _check_size(size)
    rng = np.random.default_rng(seed + 10_000)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(50, 110, size=3, dtype=np.uint8)
    s = min(w, h)
    for shp in shapes if shapes is not None else scene_shapes(seed):
        draw_shape(img, shp.kind, shp.center(index, (w, h)), shp.half * s, shp.color)
    return draw_frame_index(img, index)


def render_frames(num_frames: int = 32, size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """All frames ``[T, H, W, 3]`` uint8 of the clip :func:`write_video` encodes."""
    if not isinstance(num_frames, int) or num_frames < 0:
        raise ValueError(f"num_frames must be an int >= 0, got {num_frames!r}")
    w, h = _check_size(size)
    shapes = scene_shapes(seed)
    out = np.empty((num_frames, h, w, 3), np.uint8)
    for i in range(num_frames):
        out[i] = render_frame(i, (w, h), seed, shapes)
    return out


def _check_size(size) -> tuple[int, int]:
    if len(size) != 2 or any(not isinstance(v, (int, np.integer)) or v < 8 for v in size):
        raise ValueError(f"size must be (W, H) with both >= 8, got {size!r}")
    return int(size[0]), int(size[1])


# --- writers -----------------------------------------------------------------------------------
def _resolve_fmt(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = VIDEO_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot infer the format of {path} from its suffix; pass fmt="
                             f"one of mp4, mkv, gif, jpg, png")
    if fmt not in ("mp4", "mkv", "gif") + FRAME_FORMATS:
        raise ValueError(f"unsupported fmt {fmt!r}; expected mp4, mkv, gif, jpg or png")
    return fmt


def write_frames(path, frames: np.ndarray, fps: float = 8, fmt: str | None = None,
                 gop: int = 12, crf: int = 10, faststart: bool = False, bframes: int = 0,
                 codec: str | None = None, pix_fmt: str | None = None) -> Path:
    """Encode ``frames`` [T, H, W, 3] uint8 to ``path``.

    mp4/mkv: libx264 (mpeg4 if absent), yuv420p (yuv444p for odd sizes, which 4:2:0 cannot hold),
    keyframe every ``gop`` frames, ``bframes`` B-frames (reordered decode); ``codec`` / ``pix_fmt``
    override the encoder and its pixel format (e.g. libx265, libvpx-vp9, yuv420p10le). gif: PyAV's GIF encoder (rgb8 palette). jpg/png: ``path`` is a
    folder of ``00001.jpg, 00002.jpg, ...`` (1-based, the layout of MVBench's frame folders).
    """
    import av  # testing code only

    path = Path(path)
    fmt = _resolve_fmt(path, fmt)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if fmt in FRAME_FORMATS:
        from PIL import Image

        path.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(path / f"{i + 1:05d}.{fmt}", quality=95)
        return path
    t, h, w = frames.shape[:3]
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    opts = {"movflags": "faststart"} if faststart and fmt == "mp4" else {}
    with av.open(str(path), "w", format={"mp4": "mp4", "mkv": "matroska", "gif": "gif"}[fmt],
                 options=opts) as out:
        if fmt == "gif":
            stream = out.add_stream("gif", rate=rate)
            stream.pix_fmt = "rgb8"
        else:
            codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
            stream = out.add_stream(codec, rate=rate)
            odd = (w % 2) or (h % 2)
            if odd and codec != "libx264" and pix_fmt is None:
                raise ValueError(f"odd frame size {w}x{h} needs libx264 (yuv444p) or a codec and pix_fmt "
                                 "that hold it (e.g. mjpeg, yuvj420p)")
            stream.pix_fmt = pix_fmt or ("yuv444p" if odd else "yuv420p")
            stream.gop_size = gop
            stream.options = ({"crf": str(crf), "preset": "ultrafast", "bf": str(bframes)}
                              if codec == "libx264" else {"qscale": "2"} if codec == "mpeg4" else {})
        stream.width, stream.height = w, h
        out.start_encoding()
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_video(path, num_frames: int = 32, size: tuple[int, int] = (320, 240), fps: float = 8,
                fmt: str | None = None, seed: int = 0, **encode_kw) -> Path:
    """Render the seeded clip and encode it (format from the suffix unless ``fmt``); see
    :func:`write_frames` for formats and ``encode_kw`` (gop, crf, faststart, bframes)."""
    if num_frames < 1:
        raise ValueError("write_video needs num_frames >= 1; use write_empty_video for zero frames")
    return write_frames(path, render_frames(num_frames, size, seed), fps, fmt, **encode_kw)


def write_empty_video(path, size: tuple[int, int] = (160, 120), fps: float = 8) -> Path:
    """A valid mp4 container that holds zero video frames."""
    return write_frames(path, np.zeros((0, size[1], size[0], 3), np.uint8), fps, "mp4")


def write_corrupt_video(path, mode: str = "truncate", num_frames: int = 32,
                        size: tuple[int, int] = (160, 120)) -> Path:
    """A broken mp4. ``truncate``: header (faststart) intact, second half of the data cut off, so
    it opens but decoding fails. ``no_index``: cut in half without faststart, so the index (moov)
    is lost and the file does not open at all."""
    if mode not in ("truncate", "no_index"):
        raise ValueError(f"unknown corrupt mode {mode!r}; expected 'truncate' or 'no_index'")
    path = Path(path)
    write_video(path, num_frames, size, fmt="mp4", faststart=(mode == "truncate"), crf=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
