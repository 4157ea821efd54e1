"""Normalise what a caller passes as a video into a :class:`Source`, sniff its format, hash it.

Accepted: a path (str / ``os.PathLike``) to a video file, a GIF, a still image (JPEG, PNG, BMP,
WebP: a video of its frames, one for a still picture) or a folder of frames; raw bytes (``bytes``,
``bytearray``, ``memoryview``, or a binary file-like object with ``read``); a numpy array or torch
tensor of uint8 frames ``[T, H, W, 3]``.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EmptyVideoError, NotAVideoError, VideoNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGE_CONTAINERS = ("jpeg", "png", "bmp", "webp")  # sniffed still-image formats, read through PIL
_HASH_MEMO: dict[tuple, str] = {}  # _memo_key(file) -> sha256
_HASH_MEMO_MAX = 4096
_HASH_MEMO_LOCK = threading.Lock()  # frame-loader and hash threads add entries
HASH_THREAD_BYTES = 8 << 20  # files this large hash on a thread beside the decode (hash_beside)


@dataclass
class Source:
    """One video input. ``kind``: file | bytes | folder | array; ``container``: the sniffed
    format of file/bytes input (``gif``, ``mp4``, ``mkv``, ... or None if unrecognised)."""

    kind: str
    name: str  # for messages: the path, "<bytes: N>", "<array [T, H, W, 3]>"
    path: Path | None = None
    data: bytes | None = None
    array: np.ndarray | None = None
    frame_files: list[Path] = field(default_factory=list)
    container: str | None = None

    @property
    def is_gif(self) -> bool:
        return self.container == "gif"

    @property
    def is_image(self) -> bool:
        """A still-image file or bytes (decord reads a JPEG as an empty stream)."""
        return self.container in IMAGE_CONTAINERS

    def head(self, n: int = 512) -> bytes:
        if self.data is not None:
            return self.data[:n]
        with open(self.path, "rb") as f:
            return f.read(n)


def sniff_container(head: bytes) -> str | None:
    """Recognise a media container from its first bytes (None if unknown)."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if head[:4] == b"RIFF" and head[8:11] == b"AVI":
        return "avi"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # BITMAPFILEHEADER: its reserved words are 0
        return "bmp"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpegts"
    if head[:16] == bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"):
        return "asf"
    return None


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def not_found_message(path: str) -> str:
    """Why a video path names no file: it does not exist, or it is a URL (nothing is downloaded)."""
    if URL_RE.match(path):
        return (f"video not found: {path} is a URL; videos are read from local files (nothing is "
                f"downloaded): download it and pass its path or its bytes")
    return f"video not found: {path} does not exist"


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a video (see :func:`not_found_message`, or the OS refuses to look
    it up, e.g. a name too long), else None: a cheap check before a request is queued."""
    try:
        if Path(path).exists():
            return None
    except OSError as e:  # ENAMETOOLONG and the like
        shown = path if len(path) <= 120 else path[:60] + "..." + path[-40:]
        return f"video path cannot be looked up: {shown}: {e.strerror or e}"
    return not_found_message(path)


def resolve_source(source) -> Source:
    """Classify ``source``; raises :class:`VideoNotFoundError`, :class:`EmptyVideoError` (empty
    file / folder without frames / zero-length array) or :class:`NotAVideoError` (wrong type,
    dtype or shape)."""
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source).strip():  # Path("") would be the working directory
            raise VideoNotFoundError("video not found: the path is empty")
        path = Path(source)
        if not path.exists():
            raise VideoNotFoundError(not_found_message(os.fspath(source)))
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and p.is_file()), key=_natural_key)
            if not files:
                raise EmptyVideoError(f"{path}: folder holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
            return Source("folder", str(path), path=path, frame_files=files)
        if path.stat().st_size == 0:
            raise EmptyVideoError(f"{path}: file is empty (0 bytes)")
        src = Source("file", str(path), path=path)
        src.container = sniff_container(src.head())
        return src
    if hasattr(source, "read") and not isinstance(source, (bytes, bytearray, memoryview)):
        source = source.read()
        if not isinstance(source, (bytes, bytearray)):
            raise NotAVideoError("file-like video source must be opened in binary mode")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise EmptyVideoError("<bytes: 0>: video bytes are empty")
        return Source("bytes", f"<bytes: {len(data)}>", data=data, container=sniff_container(data[:512]))
    return _array_source(source)


def _array_source(source) -> Source:
    try:
        import torch
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().contiguous().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(source, np.ndarray):
        raise NotAVideoError(f"unsupported video source of type {type(source).__name__}: expected a path, "
                             f"bytes, or a uint8 array [T, H, W, 3]")
    name = f"<array {list(source.shape)} {source.dtype}>"
    if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
        raise NotAVideoError(f"{name}: frame arrays must be uint8 [T, H, W, 3]")
    if source.shape[0] == 0:
        raise EmptyVideoError(f"{name}: frame array holds zero frames")
    if source.shape[1] == 0 or source.shape[2] == 0:
        raise NotAVideoError(f"{name}: frames have zero height or width")
    return Source("array", name, array=np.ascontiguousarray(source))


def _memo_key(src: Source) -> tuple:
    """A file's identity for the hash memo: path, inode, size, mtime and ctime. The ctime changes
    with every write and cannot be set back, as ``cp -p``, ``rsync -t`` or ``tar x`` set the mtime
    (a same-size overwrite with the old mtime was answered from the old content)."""
    st = src.path.stat()
    return str(src.path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def memoised_hash(src: Source) -> str | None:
    """A file's content hash if :func:`content_hash` has computed it for this path, size and
    times (one ``stat``, :func:`_memo_key`); None otherwise and for other sources."""
    return _HASH_MEMO.get(_memo_key(src)) if src.kind == "file" else None


def hash_beside(src: Source) -> Callable[[], str]:
    """Start :func:`content_hash` of ``src``; returns a function that gives the digest. A file
    of ``HASH_THREAD_BYTES`` or more, not hashed before, is read and hashed on a thread (hashlib
    and file reads release the GIL) so that decoding runs meanwhile: sha256 ran at ~0.9 GB/s here,
    ~0.1 s for a 100 MB clip; anything else is hashed now."""
    if src.kind == "file" and memoised_hash(src) is None and src.path.stat().st_size >= HASH_THREAD_BYTES:
        pool = ThreadPoolExecutor(1, thread_name_prefix="stllm-hash")
        future = pool.submit(content_hash, src)
        pool.shutdown(wait=False)
        return future.result
    digest = content_hash(src)
    return lambda: digest


def content_hash(src: Source) -> str:
    """sha256 hex digest of the content: file bytes (memoised per path, inode, size and times, so a
    repeat costs one ``stat``), the bytes, every frame file's name and bytes, or an array's dtype,
    shape and bytes. Equal content gives equal hashes whatever the path."""
    h = hashlib.sha256()
    if src.kind == "file":
        key = _memo_key(src)
        if key in _HASH_MEMO:
            return _HASH_MEMO[key]
        with open(src.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        with _HASH_MEMO_LOCK:
            if len(_HASH_MEMO) >= _HASH_MEMO_MAX:
                _HASH_MEMO.pop(next(iter(_HASH_MEMO)))
            _HASH_MEMO[key] = digest
        return digest
    if src.kind == "bytes":
        h.update(src.data)
    elif src.kind == "folder":
        for p in src.frame_files:
            h.update(p.name.encode() + b"\0")
            h.update(p.read_bytes())
    else:
        h.update(f"{src.array.dtype}{src.array.shape}".encode())
        h.update(src.array.data)
    return h.hexdigest()
