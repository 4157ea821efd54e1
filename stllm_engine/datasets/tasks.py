"""Synthetic multiple-choice tasks over clips of moving shapes.

Each task is a function ``(rng, answer_class, num_frames, size) -> Scene``; the caller picks the
answer class (for balance) and the option order. Four tasks need time (direction, appearance
order, flash count, speed change); two do not (colour, shape) and act as controls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from stllm_engine.datasets.render import COLOURS, SHAPES, blank_clip, draw


@dataclass
class Scene:
    clip: np.ndarray  # uint8 [T, H, W, 3]
    question: str
    answer: str
    distractors: list[str]  # wrong options
    signature: tuple  # discrete scene parameters: equal signatures = same instance


@dataclass(frozen=True)
class Task:
    name: str  # MVBench-style display name (the task table key)
    key: str  # file stem: json/<key>.json, videos/<key>/
    classes: tuple[str, ...]  # answer values cycled for balance ("" = answer set by the scene)
    temporal: bool
    make: Callable[..., Scene]


def _pick_objects(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """``n`` objects with pairwise different colours and shapes (n <= 3)."""
    colours = list(rng.permutation(list(COLOURS)))[:n]
    shapes = list(rng.permutation(list(SHAPES)))[:n]
    return [(str(c), str(s)) for c, s in zip(colours, shapes)]


def _q(v: float) -> int:
    return int(round(v * 4))  # signature resolution: quarter pixels


def moving_direction(rng, answer, num_frames, size) -> Scene:
    (colour, shape), = _pick_objects(rng, 1)
    r = size * rng.uniform(0.09, 0.13)
    travel = size * rng.uniform(0.45, 0.6)
    lo, hi = r + 1, size - r - 1
    start_along = rng.uniform(lo, hi - travel)
    across = rng.uniform(lo, hi)
    sign = 1 if answer in ("right", "down") else -1
    if sign < 0:
        start_along = size - start_along
    clip = blank_clip(num_frames, size)
    for t in range(num_frames):
        along = start_along + sign * travel * t / max(num_frames - 1, 1)
        cx, cy = (along, across) if answer in ("left", "right") else (across, along)
        draw(clip[t], shape, colour, cx, cy, r)
    return Scene(clip, f"In which direction is the {colour} {shape} moving?", answer,
                 [d for d in ("left", "right", "up", "down") if d != answer],
                 ("dir", colour, shape, answer, _q(r), _q(travel), _q(start_along), _q(across)))


def appearance_order(rng, answer, num_frames, size) -> Scene:
    objs = _pick_objects(rng, 3)
    slots = [(size * 0.25, size * 0.3), (size * 0.75, size * 0.3), (size * 0.5, size * 0.72)]
    slots = [slots[i] for i in rng.permutation(3)]
    r = size * 0.11
    gap = max(2, num_frames // 5)
    first = int(rng.integers(0, max(1, num_frames - 2 * gap - 2)))
    onsets = [first, first + gap, first + 2 * gap]
    clip = blank_clip(num_frames, size)
    for (colour, shape), (cx, cy), on in zip(objs, slots, onsets):
        for t in range(on, num_frames):
            draw(clip[t], shape, colour, cx, cy, r)
    names = [f"the {c} {s}" for c, s in objs]
    return Scene(clip, "Which shape appeared first?", names[0], names[1:],
                 ("order", tuple(objs), tuple(_q(x) for s in slots for x in s), first, gap))


COUNT_WORDS = ("once", "twice", "three times", "four times")


def flash_count(rng, answer, num_frames, size) -> Scene:
    k = COUNT_WORDS.index(answer) + 1
    (colour, shape), = _pick_objects(rng, 1)
    r = size * rng.uniform(0.12, 0.16)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    # 2k-1 alternating on/off runs of >= 2 frames (on first), then spare frames spread over
    # them and over a leading and a trailing off run
    inner = 2 * k - 1
    if 2 * inner > num_frames:
        raise ValueError(f"flash_count needs at least {2 * inner} frames for {k} flashes")
    lengths = np.full(inner + 2, 2)
    lengths[0] = lengths[-1] = 0
    for i in rng.choice(inner + 2, size=num_frames - 2 * inner, replace=True):
        lengths[i] += 1
    clip = blank_clip(num_frames, size)
    t = 0
    for j, n in enumerate(lengths):
        if j % 2 == 1:  # runs 1, 3, ... are "on"
            for f in range(t, t + n):
                draw(clip[f], shape, colour, cx, cy, r)
        t += n
    return Scene(clip, f"How many times does the {colour} {shape} flash?", answer,
                 [w for w in COUNT_WORDS if w != answer],
                 ("flash", colour, shape, k, _q(r), _q(cx), _q(cy), tuple(int(x) for x in lengths)))


SPEEDS = ("It speeds up", "It slows down", "It moves at a constant speed")


def speed_change(rng, answer, num_frames, size) -> Scene:
    (colour, shape), = _pick_objects(rng, 1)
    r = size * rng.uniform(0.09, 0.12)
    travel = size - 2 * r - 4
    cy = rng.uniform(r + 1, size - r - 1)
    s = np.linspace(0.0, 1.0, num_frames)
    frac = {SPEEDS[0]: s ** 2.5, SPEEDS[1]: 1 - (1 - s) ** 2.5, SPEEDS[2]: s}[answer]
    right = bool(rng.integers(0, 2))
    clip = blank_clip(num_frames, size)
    for t in range(num_frames):
        x = r + 2 + travel * frac[t]
        draw(clip[t], shape, colour, x if right else size - x, cy, r)
    return Scene(clip, f"How does the speed of the {colour} {shape} change?", answer,
                 [v for v in SPEEDS if v != answer],
                 ("speed", colour, shape, answer, right, _q(r), _q(cy)))


def object_colour(rng, answer, num_frames, size) -> Scene:
    shape = str(rng.choice(SHAPES))
    r = size * rng.uniform(0.15, 0.25)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    clip = blank_clip(num_frames, size)
    for t in range(num_frames):
        draw(clip[t], shape, answer, cx, cy, r)
    return Scene(clip, f"What colour is the {shape}?", answer,
                 [c for c in COLOURS if c != answer], ("colour", shape, answer, _q(r), _q(cx), _q(cy)))


def object_shape(rng, answer, num_frames, size) -> Scene:
    colour = str(rng.choice(list(COLOURS)))
    r = size * rng.uniform(0.15, 0.25)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    clip = blank_clip(num_frames, size)
    for t in range(num_frames):
        draw(clip[t], answer, colour, cx, cy, r)
    return Scene(clip, f"What shape is the {colour} object?", answer,
                 [s for s in SHAPES if s != answer], ("shape", colour, answer, _q(r), _q(cx), _q(cy)))


TASKS: tuple[Task, ...] = (
    Task("Moving Direction", "moving_direction", ("left", "right", "up", "down"), True, moving_direction),
    Task("Appearance Order", "appearance_order", ("",), True, appearance_order),
    Task("Flash Count", "flash_count", COUNT_WORDS, True, flash_count),
    Task("Speed Change", "speed_change", SPEEDS, True, speed_change),
    Task("Object Colour", "object_colour", tuple(COLOURS), False, object_colour),
    Task("Object Shape", "object_shape", SHAPES, False, object_shape),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}
