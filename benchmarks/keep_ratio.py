"""Answer quality against the inference-time keep ratio (the share of video tokens the LLM sees;
ST-LLM was trained with 10-70% of them masked).

    python benchmarks/keep_ratio.py [--ratios 1 0.7 0.5 0.3 0.1] [--modes even random] [--out FILE]

The shipped default model (``stllm_engine/assets/default_model``, trained by this project on
synthetic temporal video QA, without token masking: its training runs have masking off, so the curve
is what dropping tokens costs a model that never saw it) answers its shipped held-out items (``tests/data/default_model_heldout``:
12 Flash Count + 12 Appearance Order clips, none seen in training; ``--data`` takes any
MVBench-format folder) through ``llm.answer`` (greedy, the release's chat defaults), once per keep
ratio and mode (``even``: every k-th token, the default rule; ``random``: seeded). Score = exact
match of the answer sentence. Rows: ``accuracy`` at each ratio against the accuracy with every token
(ratio = kept accuracy / full accuracy), with ``video_tokens`` and the per-task accuracies in each
row's config (the default model's prompts are too short for its prefill time to say anything; the
speed side is the prefill's length, ``benchmarks/prefill_lengths.py``). Writes
``benchmarks/results/eval-keep-ratio-<device>.json`` (an evaluation record of the default model:
accuracy can be 0) and a PNG of accuracy against the ratio for each mode.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, format_table, write_result  # noqa: E402
from plot import plot_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tests" / "data" / "default_model_heldout"


def score(llm, items, keep_ratio: float, mode: str, seed: int) -> tuple[dict[str, list[int]], int]:
    """({task: [0/1 per item]}, video tokens of one prompt)."""
    from stllm_engine.datasets.chat import chat_answer

    reqs = [{"video": str(it.video_path), "question": it.question, "keep_ratio": keep_ratio, "keep_mode": mode,
             "keep_seed": seed + i} for i, it in enumerate(items)]
    outs = llm.generate(reqs, llm.params(max_new_tokens=30))
    got: dict[str, list[int]] = {}
    for it, out in zip(items, outs):
        if out.error is not None:
            raise RuntimeError(f"{it.video_path.name}: {out.error}")
        want = chat_answer(it.task, it.question, it.answer)
        got.setdefault(it.task, []).append(int(llm.postprocess(out) == want))
    tokens = outs[0].num_prompt_tokens - len(llm.engine.prompt_ids(items[0].question))
    return got, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HELDOUT, help="MVBench-format folder (default: the shipped held-out items)")
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: the shipped default model)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3, 0.2, 0.1])
    ap.add_argument("--modes", nargs="+", default=["even", "random"], choices=("even", "random"))
    ap.add_argument("--seed", type=int, default=0, help="first keep_seed of the random mode (one per item)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if any(not 0 < r <= 1 for r in args.ratios):
        ap.error("--ratios must lie in (0, 1]")
    from stllm_engine import STLLM
    from stllm_engine.default_model import default_model
    from stllm_engine.evaluation import load_items

    folder = args.model or default_model().path
    llm = STLLM.from_pretrained(folder, dtype="float32", vision_cache_bytes=0)
    items = load_items(args.data)
    llm.generate([{"video": str(items[0].video_path), "question": items[0].question}], llm.params(max_new_tokens=2))
    full, full_tokens = score(llm, items, 1.0, "even", args.seed)
    n = sum(len(v) for v in full.values())
    acc_full = sum(map(sum, full.values())) / n
    rows, lines = [], []
    for mode in args.modes:
        for r in sorted(set(args.ratios) - {1.0}, reverse=True):
            got, tokens = score(llm, items, r, mode, args.seed)
            acc = sum(map(sum, got.values())) / n
            per_task = {t: round(sum(v) / len(v), 4) for t, v in got.items()}
            cfg = {"model": Path(folder).name, "items": n, "keep_ratio": r, "keep_mode": mode,
                   "video_tokens": tokens, "full_video_tokens": full_tokens, "per_task_accuracy": per_task,
                   "full_per_task_accuracy": {t: round(sum(v) / len(v), 4) for t, v in full.items()}}
            rows.append({"config": cfg, "metric": "accuracy", "engine": round(acc, 4),
                         "baseline": "the same model with every video token (keep_ratio 1)",
                         "baseline_value": round(acc_full, 4), "ratio": round(acc / acc_full, 3) if acc_full else 0.0,
                         "unit": "accuracy"})
            lines.append(f"  {mode:6s} keep {r:4.2f}: {tokens:4d} video tokens, accuracy {acc:.3f} "
                         f"({', '.join(f'{t} {a:.2f}' for t, a in per_task.items())})")
    print(f"{n} held-out items, {Path(folder).name}; every token: {full_tokens} video tokens, accuracy "
          f"{acc_full:.3f}")
    print("\n".join(lines))
    print(format_table(rows, ["keep_mode", "keep_ratio", "video_tokens"]))
    device = device_name("cpu")
    out = write_result("eval-keep-ratio", device, rows, args.out or RESULTS / f"eval-keep-ratio-{device}.json")
    print(f"wrote {out}")
    for mode in args.modes:
        png = out.with_name(f"{out.stem}-{mode}.png")
        print(f"wrote {plot_result(out, 'keep_ratio', 'accuracy', {'keep_mode': mode}, png)}")


if __name__ == "__main__":
    main()
