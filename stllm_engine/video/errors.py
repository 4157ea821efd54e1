"""Errors raised while loading a video. Every message names the source and the problem."""
from __future__ import annotations


class VideoError(ValueError):
    """Base class: the video input could not be used."""


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The path does not exist."""


class NotAVideoError(VideoError):
    """The input is not a video, GIF, frame folder or frame array (e.g. a text file)."""


class EmptyVideoError(VideoError):
    """The input is a valid container / folder / array that holds zero frames."""


class CorruptVideoError(VideoError):
    """The input looks like a video but its stream cannot be opened or decoded."""


class VideoBoundError(VideoError):
    """A (start, end) bound in seconds lies outside the video or is reversed."""
