"""Synthetic temporal video-QA set: rendered content, balance, determinism, held-out split."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from stllm_engine.datasets import TASKS, TASKS_BY_NAME, SyntheticConfig, build_dataset
from stllm_engine.datasets.render import BACKGROUND, COLOURS, write_mp4
from stllm_engine.datasets.synthetic import make_sample
from stllm_engine.datasets.tasks import COUNT_WORDS, SPEEDS


def _foreground(clip):
    return (np.abs(clip.astype(int) - np.array(BACKGROUND)).sum(-1) > 60)  # [T, H, W]


def _centroids(clip):
    fg = _foreground(clip)
    out = []
    for m in fg:
        ys, xs = np.nonzero(m)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def _scene(name, answer, frames, size, seed=0):
    task = TASKS_BY_NAME[name]
    return task.make(np.random.default_rng(seed), answer, frames, size)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    build_dataset(out, n_train=12, n_test=6, seed=3, num_frames=16, size=32)
    return out


@pytest.mark.parametrize("frames,size", [(14, 32), (16, 64), (24, 112)])
@pytest.mark.parametrize("answer", ["left", "right", "up", "down"])
def test_direction_clip_moves_that_way(answer, frames, size):
    c = _centroids(_scene("Moving Direction", answer, frames, size).clip)
    dx, dy = c[-1] - c[0]
    expect = {"left": (dx < -size * 0.3), "right": (dx > size * 0.3),
              "up": (dy < -size * 0.3), "down": (dy > size * 0.3)}[answer]
    assert expect and min(abs(dx), abs(dy)) < 1.0


@pytest.mark.parametrize("frames,size", [(14, 32), (16, 64), (32, 96)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("answer", COUNT_WORDS)
def test_flash_count_on_runs(answer, frames, size, seed):
    on = _foreground(_scene("Flash Count", answer, frames, size, seed).clip).any(axis=(1, 2))
    starts = int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))
    assert starts == COUNT_WORDS.index(answer) + 1
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, on.astype(int), -1]) != 0))
    assert runs.min() >= 2 or not on[0] or not on[-1]  # inner runs hold at least 2 frames


@pytest.mark.parametrize("answer", SPEEDS)
@pytest.mark.parametrize("frames", [14, 16, 32])
def test_speed_change_profile(answer, frames):
    c = _centroids(_scene("Speed Change", answer, frames, 64).clip)
    step = np.abs(np.diff(c[:, 0]))
    first, last = step[: frames // 3].mean(), step[-(frames // 3):].mean()
    if answer == SPEEDS[0]:
        assert last > 2 * first
    elif answer == SPEEDS[1]:
        assert first > 2 * last
    else:
        assert abs(first - last) < 0.5


@pytest.mark.parametrize("frames,size", [(14, 32), (16, 64)])
@pytest.mark.parametrize("seed", range(4))
def test_appearance_order_first_object(frames, size, seed):
    s = _scene("Appearance Order", "", frames, size, seed)
    colour = s.answer.split()[1]  # "the red circle"
    ref = np.array(COLOURS[colour])
    hit = (np.abs(s.clip.astype(int) - ref).sum(-1) < 30).any(axis=(1, 2))
    first_any = int(np.argmax(_foreground(s.clip).any(axis=(1, 2))))
    assert hit[first_any]
    for other in s.distractors:
        ref_o = np.array(COLOURS[other.split()[1]])
        assert not (np.abs(s.clip[first_any].astype(int) - ref_o).sum(-1) < 30).any()


def test_static_tasks_show_the_answer():
    s = _scene("Object Colour", "green", 16, 64)
    assert (np.abs(s.clip.astype(int) - np.array(COLOURS["green"])).sum(-1) == 0).sum() > 50
    assert _foreground(s.clip[0]).sum() == _foreground(s.clip[-1]).sum()


def test_balance_and_options(dataset):
    table = json.loads((dataset / "train" / "tasks.json").read_text())
    assert set(table) == {t.name for t in TASKS}
    for name, (json_file, prefix, dtype, bound) in table.items():
        assert dtype == "video" and bound is False
        entries = json.loads((dataset / "train" / "json" / json_file).read_text())
        assert len(entries) == 12
        letters = Counter(e["candidates"].index(e["answer"]) for e in entries)
        n_opts = len(entries[0]["candidates"])
        assert set(letters.values()) == {12 // n_opts}, (name, letters)
        if TASKS_BY_NAME[name].classes != ("",):
            answers = Counter(e["answer"] for e in entries)
            assert set(answers.values()) == {12 // len(TASKS_BY_NAME[name].classes)}, (name, answers)
        for e in entries:
            assert len(set(e["candidates"])) == len(e["candidates"]) and e["answer"] in e["candidates"]
            assert (dataset / "train" / prefix / e["video"]).is_file()


def test_held_out_split_disjoint(dataset):
    sig = {s: json.loads((dataset / s / "meta.json").read_text())["signatures"] for s in ("train", "test")}
    train = {x for v in sig["train"].values() for x in v}
    test = {x for v in sig["test"].values() for x in v}
    assert len(train) == 12 * len(TASKS) and len(test) == 6 * len(TASKS)
    assert not train & test

    def digests(split):
        return {hashlib.sha1(p.read_bytes()).hexdigest() for p in (dataset / split).rglob("*.mp4")}
    assert not digests("train") & digests("test")


def test_redraw_avoids_taken_instances():
    cfg = SyntheticConfig(n_train=1, n_test=1, num_frames=16, size=32)
    task = TASKS_BY_NAME["Object Shape"]
    _, _, sig = make_sample(task, "test", 0, cfg)
    _, _, sig2 = make_sample(task, "test", 0, cfg, taken={sig})
    assert sig2 != sig


def test_deterministic_from_seed(tmp_path):
    kw = dict(n_train=2, n_test=1, num_frames=14, size=32, tasks=("Flash Count", "Object Colour"))
    a, b, c = (build_dataset(tmp_path / n, seed=s, **kw) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "train/json/flash_count.json").read_text() != (c / "train/json/flash_count.json").read_text()


def test_mp4_decodes_to_the_rendered_clip(tmp_path):
    import av

    s = _scene("Moving Direction", "up", 16, 64)
    write_mp4(tmp_path / "x.mp4", s.clip, fps=8)
    with av.open(str(tmp_path / "x.mp4")) as cont:
        stream = cont.streams.video[0]
        assert float(stream.average_rate) == 8
        frames = np.stack([f.to_ndarray(format="rgb24") for f in cont.decode(video=0)])
    assert frames.shape == (16, 64, 64, 3)
    assert np.abs(frames.astype(int) - s.clip.astype(int)).mean() < 3


@pytest.mark.parametrize("bad", [dict(num_frames=10), dict(size=33), dict(size=16), dict(n_train=-1),
                                 dict(tasks=("Nope",)), dict(fps=0)])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_write_mp4_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "x.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)


def test_split_loads_in_the_evaluation_runner(dataset):
    from stllm_engine.evaluation import load_items

    items = load_items(dataset / "train")
    assert len(items) == 12 * len(TASKS)
    assert {i.task for i in items} == {t.name for t in TASKS}
    for it in items:
        assert it.video_path.is_file() and it.bound is None and it.data_type == "video"
        assert it.gt == f"({'ABCD'[it.candidates.index(it.answer)]}) {it.answer}"
