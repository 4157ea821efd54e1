"""``CheckpointError`` and the helper that lists offending keys readably."""
from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, unreadable or does not match its config."""


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Sorted keys, all of them when few, else the first ``limit`` and how many more."""
    ks = sorted(keys)
    if len(ks) <= limit:
        return ", ".join(ks)
    return ", ".join(ks[:limit]) + f", ... (+{len(ks) - limit} more, {len(ks)} in all)"


def mismatch_report(missing: Iterable[str], unexpected: Iterable[str],
                    wrong_shape: dict[str, tuple[tuple, tuple]], limit: int = 12) -> str:
    """One message naming missing keys, unexpected keys and shape mismatches (with counts)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {format_keys(missing, limit)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {format_keys(unexpected, limit)}")
    if wrong_shape:
        items = [f"{k} (checkpoint {tuple(got)}, expected {tuple(want)})"
                 for k, (got, want) in sorted(wrong_shape.items())]
        shown = "; ".join(items[:limit])
        if len(items) > limit:
            shown += f"; ... (+{len(items) - limit} more)"
        parts.append(f"{len(items)} shape mismatches: {shown}")
    return "; ".join(parts)
