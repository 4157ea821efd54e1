"""MVBench-format evaluation runner: data layouts, frame sampling, letter check, accuracy."""
import json

import numpy as np
import pytest
import torch

from stllm_engine.datasets import build_dataset
from stllm_engine.evaluation import (MVBenchDataError, check_answer, evaluate, format_question,
                                     load_items, load_task_table)
from stllm_engine.evaluation.frames import read_item_frames
from stllm_engine.testing.videos import read_frame_index, render_frames, write_frames
from stllm_engine.video.preprocess import CLIP_MEAN, CLIP_STD
from stllm_engine.video.sampling import mvbench_indices

SIZE = 64


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    x = frames * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class Letter:
    """Always answers option ``letter``; records what it was given."""

    image_size = SIZE

    def __init__(self, letter="A"):
        self.letter, self.calls = letter, []

    def mvbench_answer(self, frames, question, candidates):
        self.calls.append((frames, question, candidates))
        i = ord(self.letter) - ord("A")
        return f"({self.letter}) {candidates[i] if i < len(candidates) else ''}"


class Oracle(Letter):
    def __init__(self, items):
        super().__init__()
        self.answers = iter(items)

    def mvbench_answer(self, frames, question, candidates):
        item = next(self.answers)
        assert item.question == question and item.candidates == candidates
        return item.gt


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    build_dataset(out, n_train=1, n_test=4, seed=1, num_frames=16, size=32,
                  tasks=("Moving Direction", "Speed Change", "Object Shape"))
    return out / "test"


@pytest.fixture(scope="module")
def release_layout(tmp_path_factory):
    """A tiny data dir in the real MVBench layout: a video task with bound, a frame-folder task."""
    root = tmp_path_factory.mktemp("mvbench")
    (root / "json").mkdir()
    frames = render_frames(48, size=(160, 120), seed=2)
    write_frames(root / "video/star/Charades_v1_480/a.mp4", frames, fps=8)
    write_frames(root / "video/tvqa/frames_fps3_hq/clip1", frames[:30], fmt="jpg")
    seq = [{"video": "a.mp4", "question": "What happened?", "candidates": ["x", "y", "z"],
            "answer": "y", "start": 1.0, "end": 4.5}]
    epi = [{"video": "clip1", "question": "Why?", "candidates": ["p", "q"], "answer": "p",
            "start": 2.0, "end": 8.0}]
    (root / "json/action_sequence.json").write_text(json.dumps(seq))
    (root / "json/episodic_reasoning.json").write_text(json.dumps(epi))
    return root


@pytest.mark.parametrize("pred,gt,ok", [
    ("(A) left", "(A) left", True), ("(a) LEFT", "(A) left", True), ("A", "(A) left", True),
    ("B.", "(B) slows down", True), ("(B) left", "(A) left", False), ("", "(A) left", False),
    ("   ", "(A) x", False), (" (C) z", "(C) z", True), ("(D) up", "(C) up", False),
    ("(", "(A) x", False), ("(", "(C) z", False), ("( )", "(A) x", False), ("(.", "(B) y", False),
])
def test_check_answer(pred, gt, ok):
    assert check_answer(pred, gt) is ok


def test_a_repeated_option_gets_the_release_letter():
    """The release's qa_template keeps the last matching index: the runner's ground truth agrees
    with prompts.mvbench_gt."""
    from stllm_engine.evaluation.mvbench_data import MVBenchItem
    from stllm_engine.prompts import mvbench_gt

    fields = {f: None for f in MVBenchItem.__dataclass_fields__}
    item = MVBenchItem(**dict(fields, question="q", candidates=["a", "b", "a"], answer="a"))
    assert item.gt == mvbench_gt(item.candidates, item.answer) == "(C) a"


def test_format_question():
    assert format_question("Where?", ["left", "up"]) == "Question: Where?\nOptions:\n(A) left\n(B) up"


@pytest.mark.parametrize("letter", ["A", "B", "C"])
def test_constant_answerer_accuracy(synth, letter):
    items = load_items(synth)
    ans = Letter(letter)
    res = evaluate(ans, synth, num_segments=8, progress=False)
    assert set(res.tasks) == {"Moving Direction", "Speed Change", "Object Shape"}
    for task, score in res.tasks.items():
        mine = [it for it in items if it.task == task]
        expect = sum(it.answer_letter == letter for it in mine)
        assert (score.correct, score.total) == (expect, len(mine)) == (expect, 4)
    # balanced letters: 4 items per task over 3-4 options -> 1 or 2 correct per task
    assert res.overall == sum(s.correct for s in res.tasks.values()) / 12
    assert abs(res.average - np.mean([s.accuracy for s in res.tasks.values()])) < 1e-12
    frames, question, candidates = ans.calls[0]
    assert frames.shape == (8, 3, SIZE, SIZE) and frames.dtype == torch.float32
    assert question == items[0].question and candidates == items[0].candidates


def test_oracle_gets_everything_and_json(synth, tmp_path):
    res = evaluate(Oracle(load_items(synth)), synth, num_segments=4, progress=False)
    assert res.overall == 1.0 and res.average == 1.0
    out = res.to_json(model="oracle")
    assert out["tasks"]["Speed Change"] == {"correct": 4, "total": 4, "accuracy": 1.0}
    assert len(out["records"]) == 12 and all(r["correct"] for r in out["records"])
    json.dumps(out)
    assert "average of tasks" in res.table()


def test_limit_and_task_selection(synth):
    res = evaluate(Letter(), synth, num_segments=4, limit=2, tasks=["Object Shape"], progress=False)
    assert list(res.tasks) == ["Object Shape"] and res.tasks["Object Shape"].total == 2
    with pytest.raises(MVBenchDataError, match="unknown tasks"):
        load_items(synth, tasks=["Nope"])


def test_fps1_mode_frame_count(synth):
    ans = Letter()
    evaluate(ans, synth, num_segments=0, limit=1, progress=False)
    assert all(c[0].shape[0] == 4 for c in ans.calls)  # 16 frames at 8 fps: 2 s -> clamp to 4


def test_release_layout_table_and_bounds(release_layout):
    table = load_task_table(release_layout)
    assert set(table) == {"Action Sequence", "Episodic Reasoning"}
    items = load_items(release_layout)
    seq = next(i for i in items if i.task == "Action Sequence")
    assert seq.bound == (1.0, 4.5) and seq.gt == "(B) y" and seq.data_type == "video"
    assert seq.video_path == release_layout / "video/star/Charades_v1_480/a.mp4"


@pytest.mark.parametrize("segments", [4, 7, 0])
def test_frame_folder_sampling_reads_the_right_frames(release_layout, segments):
    item = next(i for i in load_items(release_layout) if i.data_type == "frame")
    frames = read_item_frames(item, segments, SIZE)
    got = [read_frame_index(f) + 1 for f in _to_uint8(frames)]  # files are 1-based
    assert got == mvbench_indices(30, 3.0, segments, (2.0, 8.0), first_idx=1)
    assert len(got) == (segments or 6)


@pytest.mark.parametrize("segments", [3, 8])
def test_gif_sampling(tmp_path, segments):
    frames = render_frames(40, size=(96, 80), seed=4)
    write_frames(tmp_path / "gifs/g.gif", frames, fps=25)
    (tmp_path / "json").mkdir()
    (tmp_path / "json/g.json").write_text(json.dumps(
        [{"video": "g.gif", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    (tmp_path / "tasks.json").write_text(json.dumps({"Gif Task": ["g.json", "gifs/", "gif", False]}))
    item, = load_items(tmp_path)
    got = [read_frame_index(f) for f in _to_uint8(read_item_frames(item, segments, SIZE))]
    assert got == mvbench_indices(40, 25.0, segments, None)


def test_a_short_gif_keeps_each_sampled_frame_once(tmp_path):
    """The release's read_gif keeps a GIF frame if its index is sampled, so 16 segments of a
    10-frame GIF give 9 frames (the sampled indices repeat), not 16."""
    write_frames(tmp_path / "gifs/g.gif", render_frames(10, size=(64, 48), seed=5), fps=25)
    (tmp_path / "json").mkdir()
    (tmp_path / "json/g.json").write_text(json.dumps(
        [{"video": "g.gif", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    (tmp_path / "tasks.json").write_text(json.dumps({"Gif Task": ["g.json", "gifs/", "gif", False]}))
    item, = load_items(tmp_path)
    idx = mvbench_indices(10, 25.0, 16, None)
    assert len(idx) == 16 and len(set(idx)) < 16  # the case: repeats
    got = [read_frame_index(f) for f in _to_uint8(read_item_frames(item, 16, SIZE))]
    assert got == sorted(set(idx))


def test_bad_data_errors(tmp_path):
    with pytest.raises(MVBenchDataError, match="does not exist"):
        load_task_table(tmp_path / "missing")
    with pytest.raises(MVBenchDataError, match="neither tasks.json"):
        load_task_table(tmp_path)
    (tmp_path / "json").mkdir()
    (tmp_path / "json/moving_direction.json").write_text(json.dumps(
        [{"video": "v.mp4", "question": "q", "candidates": ["a", "b"], "answer": "c"}]))
    with pytest.raises(MVBenchDataError, match="not among candidates"):
        load_items(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps({"T": ["t.json", "v/", "movie", False]}))
    with pytest.raises(MVBenchDataError, match="must be"):
        load_task_table(tmp_path)


def test_missing_video_is_named(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json/t.json").write_text(json.dumps(
        [{"video": "nope.mp4", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    (tmp_path / "tasks.json").write_text(json.dumps({"T": ["t.json", "v/", "video", False]}))
    with pytest.raises(MVBenchDataError, match="nope.mp4"):
        evaluate(Letter(), tmp_path, progress=False)


@pytest.mark.parametrize("segments", [4, 9, 0])
def test_video_bound_sampling(release_layout, segments):
    item = next(i for i in load_items(release_layout) if i.data_type == "video")
    got = [read_frame_index(f) for f in _to_uint8(read_item_frames(item, segments, SIZE))]
    assert got == mvbench_indices(48, 8.0, segments, (1.0, 4.5))
    assert len(got) == (segments or 4)


def test_cli_with_the_reference_backend(synth, tmp_path):
    from stllm_engine.evaluation.mvbench import main
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0, num_frames=4, llm_num_layers=1)
    out = tmp_path / "res.json"
    # the dataset root resolves to its test split; frames default to the model's num_frames
    res = main(["--data", str(synth.parent), "--model", str(ckpt), "--backend", "reference",
                "--out", str(out), "--limit", "1", "--tasks", "Object Shape"])
    saved = json.loads(out.read_text())
    assert saved["backend"] == "reference" and saved["tasks"]["Object Shape"]["total"] == 1
    assert saved["segments"] == 4 and saved["data"] == str(synth)
    rec, = saved["records"]
    assert rec["pred"].startswith("(") and rec["correct"] == check_answer(rec["pred"], rec["gt"])
    assert res.overall == saved["overall"]


def test_engine_backend_error_is_clear(tmp_path):
    from stllm_engine.evaluation import load_answerer

    with pytest.raises(ValueError, match="backend must be"):
        load_answerer("tensorrt", str(tmp_path))


def test_engine_backend_needs_mvbench_answer(tmp_path):
    from stllm_engine.api import STLLM
    from stllm_engine.evaluation import load_answerer

    if hasattr(STLLM, "mvbench_answer"):
        from stllm_engine.testing.checkpoints import write_tiny_checkpoint

        ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0, num_frames=4, llm_num_layers=1)
        ans = load_answerer("engine", str(ckpt))
        assert ans.image_size == 56 and ans.num_frames == 4
    else:
        with pytest.raises(RuntimeError, match="no mvbench_answer"):
            load_answerer("engine", str(tmp_path))
