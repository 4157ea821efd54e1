"""MVBench-format evaluation: per-task multiple-choice accuracy of any answerer.

Works on the real MVBench data (``json/`` + videos, the release's task table) and on the
synthetic set (``tasks.json``). CLI::

    python -m stllm_engine.evaluation.mvbench --data DIR --model CKPT \
        --backend reference|engine --out results.json [--limit N] [--segments N|0] [--split test]
        [--video-tokens release|own] [--ask-simple]

The published ST-LLM MVBench run (``script/inference/mvbench/test_mvbench.sh``) is
``--segments 0 --ask-simple``: one frame a second (4 to 16) and the video tokens first.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stllm_engine.evaluation.answerers import MVBenchAnswerer
from stllm_engine.evaluation.frames import read_item_frames
from stllm_engine.evaluation.mvbench_data import check_answer, load_items, resolve_split


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalResult:
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per item: task, video, gt, pred, correct

    @property
    def average(self) -> float:
        """Mean of the per-task accuracies (MVBench's "Avg")."""
        return sum(s.accuracy for s in self.tasks.values()) / len(self.tasks) if self.tasks else 0.0

    @property
    def overall(self) -> float:
        """Accuracy over all items."""
        total = sum(s.total for s in self.tasks.values())
        return sum(s.correct for s in self.tasks.values()) / total if total else 0.0

    def to_json(self, **meta) -> dict:
        return {**meta, "average": self.average, "overall": self.overall,
                "tasks": {k: {**asdict(v), "accuracy": v.accuracy} for k, v in self.tasks.items()},
                "records": self.records}

    def table(self) -> str:
        w = max([len("task")] + [len(k) for k in self.tasks])
        lines = [f"{'task':<{w}}  {'correct':>7}  {'total':>5}  {'acc %':>6}", "-" * (w + 26)]
        for k, s in self.tasks.items():
            lines.append(f"{k:<{w}}  {s.correct:>7}  {s.total:>5}  {100 * s.accuracy:>6.2f}")
        lines.append("-" * (w + 26))
        n = sum(s.total for s in self.tasks.values())
        lines.append(f"{'average of tasks':<{w}}  {'':>7}  {n:>5}  {100 * self.average:>6.2f}")
        lines.append(f"{'all items':<{w}}  {'':>7}  {n:>5}  {100 * self.overall:>6.2f}")
        return "\n".join(lines)


def evaluate(answerer: MVBenchAnswerer, data_dir: str | Path, *, num_segments: int = 16,
             limit: int | None = None, tasks: list[str] | None = None,
             progress: bool = True) -> EvalResult:
    """Ask ``answerer`` every item of ``data_dir`` (``limit`` items per task at most).

    ``num_segments`` frames per item, 0 for the release's fps-1 mode.
    """
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0 (0 = fps 1), got {num_segments}")
    if not hasattr(answerer, "mvbench_answer"):
        raise TypeError(f"{type(answerer).__name__} has no mvbench_answer(frames, question, candidates)")
    size = int(getattr(answerer, "image_size", 224))
    items = load_items(data_dir, tasks=tasks, limit=limit)
    result = EvalResult()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="mvbench", unit="q")
    for item in items:
        frames = read_item_frames(item, num_segments, size)
        pred = str(answerer.mvbench_answer(frames, item.question, list(item.candidates)))
        ok = check_answer(pred, item.gt)
        score = result.tasks.setdefault(item.task, TaskScore())
        score.total += 1
        score.correct += int(ok)
        result.records.append({"task": item.task, "video": str(item.video_path),
                               "question": item.question, "candidates": item.candidates,
                               "gt": item.gt, "pred": pred, "correct": ok})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{100 * result.overall:.1f}%")
    if bar is not None:
        bar.close()
    return result


def main(argv: list[str] | None = None) -> EvalResult:
    import argparse

    from stllm_engine.evaluation.answerers import BACKENDS, VIDEO_TOKENS, load_answerer

    p = argparse.ArgumentParser(description="MVBench-format multiple-choice evaluation")
    p.add_argument("--data", required=True, help="data dir (json/ + videos, optional tasks.json)")
    p.add_argument("--model", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--backend", choices=BACKENDS, default="reference")
    p.add_argument("--out", help="write results JSON here")
    p.add_argument("--limit", type=int, default=None, help="items per task at most")
    p.add_argument("--segments", type=int, default=None,
                   help="frames per item; 0 = fps-1 mode; default: the model's num_frames")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: all)")
    p.add_argument("--split", default="test", help="split folder used when --data holds splits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--video-tokens", choices=VIDEO_TOKENS, default="release",
                   help="release: every frame's tokens whatever video_input (the release's MVBench "
                        "quirk); own: the checkpoint's own projector (all/mean/residual)")
    p.add_argument("--ask-simple", action="store_true",
                   help="the published test_mvbench.sh prompt layout (the release's --ask_simple: video "
                        "tokens first); with --segments 0 that script's protocol")
    a = p.parse_args(argv)
    data = resolve_split(a.data, a.split)
    answerer = load_answerer(a.backend, a.model, a.device, a.video_tokens, a.ask_simple)
    segments = a.segments if a.segments is not None else int(getattr(answerer, "num_frames", 16))
    t0 = time.time()
    result = evaluate(answerer, data, num_segments=segments, limit=a.limit, tasks=a.tasks)
    print(result.table())
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"data": str(data), "model": str(a.model), "backend": a.backend,
                "video_tokens": a.video_tokens, "ask_simple": a.ask_simple, "segments": segments, "limit": a.limit,
                "seconds": round(time.time() - t0, 2)}
        out.write_text(json.dumps(result.to_json(**meta), indent=1) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
