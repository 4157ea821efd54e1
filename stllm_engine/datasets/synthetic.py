"""Build the synthetic temporal video-QA set in MVBench's on-disk format.

Layout written by :func:`build_dataset` (one folder per split, each a self-contained MVBench-style
data directory that :mod:`stllm_engine.evaluation.mvbench` reads)::

    <out>/<split>/tasks.json                  task -> [json file, video prefix, "video", bound]
    <out>/<split>/json/<key>.json             [{"video", "question", "candidates", "answer"}, ...]
    <out>/<split>/videos/<key>/<key>_00000.mp4
    <out>/<split>/meta.json                   generation parameters + instance signatures

Answers are balanced: sample i of a task takes answer class ``i % K`` and option letter
``(i + i // K) % n_options``. Train and test draw from different seed streams, and a test instance
whose scene signature occurs in train is redrawn, so the held-out split never overlaps train.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stllm_engine.datasets.render import write_mp4
from stllm_engine.datasets.tasks import TASKS, TASKS_BY_NAME, Scene, Task

SPLITS = {"train": 1, "test": 2}  # seed-stream ids


@dataclass
class SyntheticConfig:
    """Clip and split sizes; ``n_train``/``n_test`` count samples per task."""

    n_train: int = 120
    n_test: int = 40
    seed: int = 0
    num_frames: int = 16
    size: int = 64
    fps: int = 8
    tasks: tuple[str, ...] = field(default_factory=lambda: tuple(t.name for t in TASKS))

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 0")
        if self.num_frames < 14:
            raise ValueError(f"num_frames must be >= 14 (four flashes need it), got {self.num_frames}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be even and >= 32, got {self.size}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        unknown = [t for t in self.tasks if t not in TASKS_BY_NAME]
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS_BY_NAME)}")
        self.tasks = tuple(self.tasks)


def signature_hash(sig: tuple) -> str:
    return hashlib.sha1(repr(sig).encode()).hexdigest()[:16]


def make_sample(task: Task, split: str, index: int, cfg: SyntheticConfig,
                taken: set[str] = frozenset()) -> tuple[Scene, list[str], str]:
    """Generate sample ``index`` of ``task``: (scene, ordered candidates, signature hash).

    Redraws (new attempt seed) while the signature is in ``taken``.
    """
    k = len(task.classes)
    task_id = [t.name for t in TASKS].index(task.name)
    for attempt in range(1000):
        rng = np.random.default_rng([cfg.seed, SPLITS[split], task_id, index, attempt])
        scene = task.make(rng, task.classes[index % k], cfg.num_frames, cfg.size)
        sig = signature_hash(scene.signature)
        if sig not in taken:
            break
    else:
        raise RuntimeError(f"could not draw a fresh instance of {task.name} #{index}")
    n_opts = 1 + len(scene.distractors)
    others = [scene.distractors[i] for i in rng.permutation(len(scene.distractors))]
    pos = (index + index // k) % n_opts  # every k consecutive samples cover k letters
    candidates = others[:pos] + [scene.answer] + others[pos:]
    return scene, candidates, sig


def build_split(out_dir: str | Path, split: str, n: int, cfg: SyntheticConfig,
                taken: set[str] = frozenset(), progress: bool = False) -> set[str]:
    """Write one split; returns the set of instance signatures it holds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(out_dir) / split
    (root / "json").mkdir(parents=True, exist_ok=True)
    table, sigs_out = {}, {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(cfg.tasks), desc=f"synthetic {split}", unit="clip")
    for name in cfg.tasks:
        task = TASKS_BY_NAME[name]
        entries, sigs = [], []
        for i in range(n):
            scene, candidates, sig = make_sample(task, split, i, cfg, taken | set(sigs))
            video = f"{task.key}_{i:05d}.mp4"
            write_mp4(root / "videos" / task.key / video, scene.clip, cfg.fps)
            entries.append({"video": video, "question": scene.question,
                            "candidates": candidates, "answer": scene.answer})
            sigs.append(sig)
            if bar is not None:
                bar.update(1)
        (root / "json" / f"{task.key}.json").write_text(json.dumps(entries, indent=1) + "\n")
        table[name] = [f"{task.key}.json", f"videos/{task.key}/", "video", False]
        sigs_out[name] = sigs
    if bar is not None:
        bar.close()
    (root / "tasks.json").write_text(json.dumps(table, indent=1) + "\n")
    meta = {"split": split, "config": asdict(cfg), "signatures": sigs_out}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {s for v in sigs_out.values() for s in v}


def build_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, *,
                  num_frames: int = 16, size: int = 64, fps: int = 8,
                  tasks: tuple[str, ...] | None = None, progress: bool = False) -> Path:
    """Write the train and held-out test splits under ``out_dir``; returns ``out_dir``.

    ``n_train`` / ``n_test`` are samples per task. Same arguments, same files.
    """
    cfg = SyntheticConfig(n_train=n_train, n_test=n_test, seed=seed, num_frames=num_frames,
                          size=size, fps=fps, tasks=tuple(tasks) if tasks else
                          tuple(t.name for t in TASKS))
    out = Path(out_dir)
    train_sigs = build_split(out, "train", cfg.n_train, cfg, progress=progress)
    build_split(out, "test", cfg.n_test, cfg, taken=train_sigs, progress=progress)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the synthetic temporal video-QA set")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=120, help="samples per task")
    p.add_argument("--n-test", type=int, default=40, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    a = p.parse_args(argv)
    out = build_dataset(a.out, a.n_train, a.n_test, a.seed, num_frames=a.frames, size=a.size,
                        fps=a.fps, progress=True)
    print(f"wrote {out}/train and {out}/test")


if __name__ == "__main__":
    main()
