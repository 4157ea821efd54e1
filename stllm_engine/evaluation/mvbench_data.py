"""MVBench-format data: task tables, annotation loading, frame sampling, question/answer format.

A data directory holds ``json/<task>.json`` annotation lists and the videos. The task table maps a
task name to ``(json file, video prefix, data type, bound)`` as in the release's ``mv_bench.py``:
json files resolve against ``<data>/json/``, relative prefixes against ``<data>/``. A directory
may carry its own ``tasks.json`` (the synthetic set does); otherwise the real MVBench table below
is used (prefixes as in the MVBench release's ``video/`` folder).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stllm_engine.prompts import check_answer as release_check_answer
from stllm_engine.prompts import mvbench_question

DATA_TYPES = ("video", "gif", "frame")
# default fps of the data types that carry none (release: GIFs 25, TVQA frame folders 3)
DEFAULT_FPS = {"gif": 25.0, "frame": 3.0}

MVBENCH_TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "video/star/Charades_v1_480/", "video", True),
    "Action Prediction": ("action_prediction.json", "video/star/Charades_v1_480/", "video", True),
    "Action Antonym": ("action_antonym.json", "video/ssv2_video/", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "video/Moments_in_Time_Raw/videos/", "video", False),
    "Unexpected Action": ("unexpected_action.json", "video/FunQA_test/test/", "video", False),
    "Object Existence": ("object_existence.json", "video/clevrer/video_validation/", "video", False),
    "Object Interaction": ("object_interaction.json", "video/star/Charades_v1_480/", "video", True),
    "Object Shuffle": ("object_shuffle.json", "video/perception/videos/", "video", False),
    "Moving Direction": ("moving_direction.json", "video/clevrer/video_validation/", "video", False),
    "Action Localization": ("action_localization.json", "video/sta/sta_video/", "video", True),
    "Scene Transition": ("scene_transition.json", "video/scene_qa/video/", "video", False),
    "Action Count": ("action_count.json", "video/perception/videos/", "video", False),
    "Moving Count": ("moving_count.json", "video/clevrer/video_validation/", "video", False),
    "Moving Attribute": ("moving_attribute.json", "video/clevrer/video_validation/", "video", False),
    "State Change": ("state_change.json", "video/perception/videos/", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "video/nturgbd/", "video", False),
    "Character Order": ("character_order.json", "video/perception/videos/", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "video/vlnqa/", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "video/tvqa/frames_fps3_hq/", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "video/clevrer/video_validation/", "video", False),
}


class MVBenchDataError(ValueError):
    """A data directory, task table or annotation entry is malformed."""


@dataclass
class MVBenchItem:
    task: str
    video_path: Path
    data_type: str  # video | gif | frame
    bound: tuple[float, float] | None  # (start, end) seconds
    question: str  # raw question text
    candidates: list[str]
    answer: str  # raw answer text (one of candidates)

    @property
    def answer_letter(self) -> str:
        """The answer's option letter: its last position among the candidates, as the release's
        ``qa_template`` (and :func:`~stllm_engine.prompts.mvbench_gt`) picks a repeated option."""
        return chr(ord("A") + len(self.candidates) - 1 - self.candidates[::-1].index(self.answer))

    @property
    def gt(self) -> str:
        """Ground truth as the release formats it: ``"(B) answer"``."""
        return f"({self.answer_letter}) {self.answer}"


def format_question(question: str, candidates: list[str]) -> str:
    """``"Question: q\\nOptions:\\n(A) c0\\n(B) c1"`` (the release's MVBench question text)."""
    return mvbench_question(question, candidates)


def check_answer(pred: str, gt: str) -> bool:
    """The release's option-letter check (:func:`stllm_engine.prompts.check_answer`).

    Unlike the release, where an empty first word is "contained" in every option, a prediction
    whose first word names no option - blank, or only the ``"("`` the MVBench answer is primed
    with (the model said nothing, or "###" first) - is wrong; leading spaces are stripped.
    """
    pred = pred.strip()
    first = pred.split()[0] if pred else ""
    return any(ch.isalnum() for ch in first) and release_check_answer(pred, gt)


def resolve_split(data_dir: str | Path, split: str) -> Path:
    """``data_dir/split`` when ``data_dir`` is a dataset root holding splits (as
    :func:`stllm_engine.datasets.build_dataset` writes), else ``data_dir`` itself."""
    d = Path(data_dir)
    return d / split if (d / split / "tasks.json").is_file() else d


def load_task_table(data_dir: str | Path) -> dict[str, tuple[str, str, str, bool]]:
    """``<data>/tasks.json`` if present, else the tasks of :data:`MVBENCH_TASKS` whose json exists."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MVBenchDataError(f"data directory {data_dir} does not exist")
    table_file = data_dir / "tasks.json"
    if table_file.is_file():
        try:
            raw = json.loads(table_file.read_text())
        except json.JSONDecodeError as e:
            raise MVBenchDataError(f"{table_file} is not valid JSON: {e}") from e
        table = {}
        for name, row in raw.items():
            if not (isinstance(row, list) and len(row) == 4 and row[2] in DATA_TYPES):
                raise MVBenchDataError(f"{table_file}: task {name!r} must be [json, prefix, "
                                       f"one of {DATA_TYPES}, bound], got {row!r}")
            table[name] = (str(row[0]), str(row[1]), str(row[2]), bool(row[3]))
        return table
    table = {k: v for k, v in MVBENCH_TASKS.items() if (data_dir / "json" / v[0]).is_file()}
    if not table:
        raise MVBenchDataError(f"{data_dir} has neither tasks.json nor any MVBench json/<task>.json "
                               "(for a synthetic dataset root, pass its train/ or test/ folder)")
    return table


def load_items(data_dir: str | Path, tasks: list[str] | None = None,
               limit: int | None = None) -> list[MVBenchItem]:
    """All items of the selected tasks (table order); ``limit`` caps items per task."""
    data_dir = Path(data_dir)
    table = load_task_table(data_dir)
    if tasks:
        unknown = [t for t in tasks if t not in table]
        if unknown:
            raise MVBenchDataError(f"unknown tasks {unknown}; {data_dir} has {list(table)}")
        table = {t: table[t] for t in tasks}
    items = []
    for name, (json_file, prefix, data_type, has_bound) in table.items():
        path = data_dir / "json" / json_file
        if not path.is_file():
            raise MVBenchDataError(f"task {name!r}: annotation file {path} not found")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MVBenchDataError(f"{path} is not valid JSON: {e}") from e
        root = Path(prefix) if Path(prefix).is_absolute() else data_dir / prefix
        for i, e in enumerate(entries[:limit] if limit else entries):
            items.append(_item(name, root, data_type, has_bound, e, f"{path}[{i}]"))
    return items


def _item(task: str, root: Path, data_type: str, has_bound: bool, e: dict, where: str) -> MVBenchItem:
    missing = [k for k in ("video", "question", "candidates", "answer") if k not in e]
    if has_bound:
        missing += [k for k in ("start", "end") if k not in e]
    if missing:
        raise MVBenchDataError(f"{where}: missing fields {missing}")
    cands = [str(c) for c in e["candidates"]]
    if str(e["answer"]) not in cands:
        raise MVBenchDataError(f"{where}: answer {e['answer']!r} is not among candidates {cands}")
    bound = (float(e["start"]), float(e["end"])) if has_bound else None
    return MVBenchItem(task, root / str(e["video"]), data_type, bound, str(e["question"]),
                       cands, str(e["answer"]))
