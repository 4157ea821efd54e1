"""Where the default model and the sample video come from.

The package ships its default model under ``stllm_engine/assets/default_model`` once a trained
one exists (the embedded-model issue). Until then the default is a tiny, UNTRAINED checkpoint
written in the official layout into the user cache on first use: it runs the whole pipeline,
but its answers are noise, and every caller is told so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class DefaultModel:
    path: Path
    trained: bool


def cache_dir() -> Path:
    root = os.environ.get("STLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stllm-engine")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_model() -> DefaultModel:
    shipped = ASSETS / "default_model"
    if (shipped / "config.json").is_file():
        return DefaultModel(shipped, trained=True)
    folder = cache_dir() / "untrained-tiny"
    if not (folder / "config.json").is_file():
        from stllm_engine.testing.checkpoints import write_tiny_checkpoint

        write_tiny_checkpoint(folder, vit="eva", video_input="all", seed=0)
    return DefaultModel(folder, trained=False)


def sample_question() -> dict | None:
    """The shipped sample's ``{"question", "expected", ...}`` (``assets/sample.json``), or None."""
    import json

    p = ASSETS / "sample.json"
    return json.loads(p.read_text()) if p.is_file() and (ASSETS / "sample.mp4").is_file() else None


def sample_video() -> Path:
    shipped = ASSETS / "sample.mp4"
    if shipped.is_file():
        return shipped
    path = cache_dir() / "sample.mp4"
    if not path.is_file():
        from stllm_engine.testing.videos import write_video

        write_video(path, num_frames=48, size=(320, 240), fps=8, seed=0)
    return path
