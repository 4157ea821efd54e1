"""Reproduce the shipped default model: data, three trainings, evaluation, table, shipping.

    .venv/bin/python scripts/train_default_model.py [--work build/default_model] [--stages ...]

Stages (all by default, in order):
  data   two synthetic sets (16 frames, 64 px, seed 0): ``data-300`` (train 300/task, test 40/task),
         the training data of the warm-up and the three base runs and of ``all-nomask-cont``, and
         ``data`` (train 1200/task: the same first 300 clips per task + 900 more; test 40/task drawn
         to avoid all 1200), the training data of later continuations and the held-out test split
         every run is evaluated on (``data-300/test`` differs from it in 7 items that collide
         with train clips 300..1199: appearance order 6, speed change 1)
  init   one random tiny-style checkpoint (sizes below)
  pretrain  shared warm-up of the visual pathway from that random init: 300 steps on the two
         static control tasks only (colour, shape; all tokens, no masking), the common starting
         point of the three runs (as the paper's variants share a pretrained InstructBLIP/Vicuna).
         Without it, 1200 steps on the full mix stayed at chance on every task (text prior only).
  train  three runs from the warm-up, same data (all six tasks)/steps/seed, in parallel:
         all-mask (dynamic masking + MVM, the paper's recipe), all-nomask, mean (no masking)
  continue  all-nomask-cont: all-nomask's final checkpoint trained 3000 more steps on the same
         data at a lower LR (3e-4, cosine to 3e-5, seed 1, 2 threads, alone on the machine)
  grow   init-grow4: all-nomask-cont's final checkpoint with its LLM deepened from 2 to 4 layers
         (layers 2, 3 = copies of layers 0, 1 with zero o_proj / down_proj: identity blocks, so the
         grown model answers exactly as the 2-layer one before training; see :func:`grow_llm`)
  continue (after grow)  grow4: init-grow4 trained 3000 steps on ``data`` (1200/task), lr 1e-3
         (cosine to 1e-4, 100 warmup steps, seed 1, 1 thread); grow4-recon, grow4-recon2: +3000
         steps each with the training-only frame-reconstruction loss (``--recon 2.0``);
         recon2-nomask-short / recon2-mask-short: the same 600-step fine-tune of grow4-recon2
         without / with dynamic masking + MVM (the masking comparison). CONTINUE lists them all
         (``grow`` alone re-writes init-grow4; ``continue`` grows it itself when needed)
  eval   MVBench-format accuracy on the held-out split, each model with its own video input
         (``--video-tokens own``), plus chat-path exact-match on the same items
  table  benchmarks/results/{train,eval}-<run>-cpu-2core.json and default_model.md
  ship   best run (see :func:`pick_shipped`) -> stllm_engine/assets/default_model (safetensors, no
         mvm_decoder) + sample.mp4 / sample.json (the first held-out Flash Count clip it answers
         right), and the first 12 held-out Flash Count / Appearance Order items ->
         tests/data/default_model_heldout (for the test)
Every command run is printed and recorded in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HELDOUT = ROOT / "tests" / "data" / "default_model_heldout"
ASSETS = ROOT / "stllm_engine" / "assets"
DEVICE = "cpu-2core"
PY = sys.executable

# model sizes (write_tiny_checkpoint overrides on the "tiny" preset): 56 px / patch 14 (17 tokens a
# frame), 8 frames, 4 Q-Former queries a frame (32 video tokens for "all"), LLM 2 x 128. The
# Q-Former cross-attends in both layers and reads the last 8 text tokens: with 96 text tokens and
# cross-attention in one layer its per-frame outputs were ~1% apart (text-dominated) and 2000 steps
# learned no temporal task.
SIZES = dict(vision_width=64, vision_depth=2, vision_num_heads=4, vision_mlp_dim=256,
             qformer_hidden_size=64, qformer_num_layers=2, qformer_num_heads=4,
             qformer_intermediate_size=128, qformer_num_query_tokens=4, qformer_max_txt_len=8,
             qformer_cross_attention_freq=1, qformer_max_position_embeddings=128,
             llm_hidden_size=128, llm_intermediate_size=344, llm_num_layers=2, llm_num_heads=4,
             llm_num_kv_heads=4, num_frames=8)
RUNS = {"all-mask": [], "all-nomask": ["--no-mask"], "mean": ["--video-input", "mean", "--no-mask"]}
# continued runs, in order: name -> (run it starts from, init folder under --work (None = that run's
# final checkpoint), training data dir under --work, extra flags, lr, steps, warmup, seed, threads)
CONTINUE = {
    "all-nomask-cont": ("all-nomask", None, "data-300", ["--no-mask"], "3e-4", 3000, 50, 1, 2),
    "grow4": ("all-nomask-cont", "init-grow4", "data", ["--no-mask"], "1e-3", 3000, 100, 1, 1),
    "grow4-recon": ("grow4", None, "data", ["--no-mask", "--recon", "2.0"], "1e-3", 3000, 100, 2, 1),
    "grow4-recon2": ("grow4-recon", None, "data", ["--no-mask", "--recon", "2.0"], "1e-3", 3000, 100,
                     3, 1),
    # the masking comparison: the same short fine-tune of grow4-recon2, with and without dynamic
    # masking + MVM (run side by side, one thread each)
    "recon2-nomask-short": ("grow4-recon2", None, "data", ["--no-mask", "--recon", "2.0"], "3e-4", 600,
                            50, 4, 1),
    "recon2-mask-short": ("grow4-recon2", None, "data", ["--recon", "2.0"], "3e-4", 600, 50, 4, 1),
}
# grown checkpoints: folder under --work -> (run whose final checkpoint is grown, LLM layers)
GROW = {"init-grow4": ("all-nomask-cont", 4)}
DATA_SETS = {"data-300": 300, "data": 1200}  # training clips per task; test 40/task in both
TEMPORAL = ("Moving Direction", "Appearance Order", "Flash Count", "Speed Change")
CONTROL = ("Object Colour", "Object Shape")
SAMPLE_TASK = "Flash Count"  # the temporal task the shipped model learned best (chat path)
HELDOUT_TASKS = ("Flash Count", "Appearance Order")  # shipped for tests/test_default_model.py
CHANCE = {"Moving Direction": 1 / 4, "Appearance Order": 1 / 3, "Flash Count": 1 / 4,
          "Speed Change": 1 / 3, "Object Colour": 1 / 4, "Object Shape": 1 / 3}


NOTES = """Findings (runs of 2026-11-25, cpu-2core; all rows on the `data/test` split, chat = words):
- MVBench format (answer = option letter): the 2-layer runs stay at chance on every task
  (they always answer (C)/(D)). The grown runs are mostly at chance too; Speed Change letters
  reached 50.0% (`grow4-recon2`) and 60.0% (`recon2-nomask-short`) vs 33.3% chance, the only
  letter scores above the two-standard-error line. The letter format is not solved.
- Chat path, base runs (300 clips/task): `all` without masking learned Flash Count (77.5%),
  Appearance Order (65.0%) and colour; `mean` (same steps) stays near chance on every temporal
  task (Flash Count 32.5%, Appearance Order 35.0%) while learning colour (100%): keeping the frame
  tokens (`all`) is what gives the temporal gain, as in the paper. `all-nomask-cont` (+3000
  steps, lr 3e-4): Appearance Order 100%, Flash Count 77.5%, Moving Direction 20.0 and Speed
  Change 37.5 (chance 25 / 33.3): those two not learned.
- Diagnosis of direction / speed (shipped `all-nomask-cont`, linear probes trained on 600
  training clips, tested on the 40 held-out ones): Moving Direction is linearly readable from
  the flattened ViT features (98% held-out) but not from the video tokens the LLM gets (25%;
  the probe fits only 58% of its own training clips): the Q-Former's 4 queries a frame drop
  *where* the object is. Speed Change is readable from the video tokens (80%) but the LLM
  answered 37.5%. An 800-step run on direction + speed only (lr 5e-4, from the shipped model)
  left direction at 20% (it answered a fixed word), and deepening the LLM alone (`grow4`: 4
  layers, 3000 steps on 1200 clips/task) gave Flash Count 90.0% and Speed Change 42.5% but
  direction still 22.5% (always "up").
- What worked: the training-only frame-reconstruction loss (`--recon 2.0`: a linear head
  reconstructs each frame at 8 x 8 from that frame's 4 video tokens, MSE; the head is not saved).
  `grow4-recon` (+3000 steps from `grow4`): Speed Change 42.5 -> 72.5%, Moving Direction 22.5 ->
  37.5%, Flash Count 90.0, Appearance Order 100, colour 100, shape 50: chat temporal average
  63.7 -> 75.0 (`all-nomask-cont`: 58.8). `grow4-recon2` (+3000 more steps, fresh recon head):
  Moving Direction 52.5% (it now tells horizontal from vertical every time but not always the
  sign: left -> "right", up -> "down"), Flash Count 92.5, shape 57.5, Speed Change 65.0; temporal
  average 77.5. **Shipped**: every temporal task is now above chance by more than two standard
  errors (direction 52.5 > 38.7 on 4 options), which `grow4-recon` missed for direction (37.5).
  `pick_shipped` accepts its Speed Change 72.5 -> 65.0 (3 of 40 items) as noise: it refuses a
  continued run only for a drop of more than two binomial standard errors (here 14.1 points) on a
  task the current pick is above chance on. (With the earlier "no drop at all" rule it would keep
  `grow4-recon`.)
- Masking (dynamic masking + MVM, the paper's recipe): (1) base runs, 2500 steps from the
  warm-up: MVM loss fell to ~0.000 within a few hundred steps and `all-mask` stayed at chance
  everywhere (it lost the colour task the warm-up had), while `all-nomask` learned three tasks.
  (2) At the new recipe, a short matched pair from `grow4-recon2` (600 steps, lr 3e-4, recon on,
  side by side): with masking chat Moving Direction 45.0 / Appearance Order 100 / Flash Count
  77.5 / Speed Change 57.5 (temporal 70.0), without 42.5 / 100 / 90.0 / 50.0 (temporal 70.6);
  controls 100 / 72.5 vs 100 / 65.0. The MVM loss fell from 1.74 to ~0.02-0.09 within the run.
  No masking gain beyond noise (40 items a task: one item = 2.5 points); both short fine-tunes
  scored below their start (77.5). The paper's gain (pretrained 7B models) is not reproduced at
  this scale.
- An aborted start (not in the table): `grow4` with masking from `init-grow4`, stopped at step
  120 of 3000 to give the core to `grow4-recon2`.
- Earlier attempts (not shipped): 16 frames, Q-Former reading 96 text tokens with cross-attention
  in one layer, no warm-up: 1200 steps at chance on all tasks; with the warm-up, 2000 steps still at
  chance on temporal tasks (per-frame Q-Former outputs were ~1% apart: text-dominated).
- Diagnostic commands (work dir /tmp/dm2; scripts not kept in the repo):
  `python -m stllm_engine.training.train --data /tmp/dm2/data --init stllm_engine/assets/default_model
  --out /tmp/dm2/runs/diag-dirspeed --steps 800 --batch-size 8 --lr 5e-4 --warmup 50 --seed 2 --chat
  --no-mask --save-every 400 --log-every 20 --tasks "Moving Direction" "Speed Change"` (3.4 min)."""


def sh(cmd: list[str], log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    out = log.open("w") if log else None
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
                            env={**os.environ, **(env or {})})


def run(cmd: list[str]) -> None:
    rc = sh(cmd).wait()
    if rc:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")


def pretrain_cmd(a) -> list[str]:
    return [PY, "-m", "stllm_engine.training.train", "--data", str(a.work / "data-300"),
            "--init", str(a.work / "init"), "--out", str(a.work / "pretrain"), "--steps", "300",
            "--batch-size", str(a.batch_size), "--lr", "1e-3", "--warmup", "20", "--seed", "0",
            "--chat", "--no-mask", "--tasks", "Object Colour", "Object Shape", "--save-every", "100",
            "--log-every", "10"]


def train_cmd(a, name: str) -> list[str]:
    return [PY, "-m", "stllm_engine.training.train", "--data", str(a.work / "data-300"),
            "--init", str(a.work / "pretrain" / "final"), "--out", str(a.work / "runs" / name),
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", "1e-3",
            "--warmup", "50", "--seed", "0", "--chat", "--save-every", "500",
            "--log-every", "20"] + RUNS[name]


def continue_cmd(a, name: str) -> list[str]:
    base, init, data, flags, lr, steps, warmup, seed, _ = CONTINUE[name]
    init = a.work / init if init else a.work / "runs" / base / "final"
    return [PY, "-m", "stllm_engine.training.train", "--data", str(a.work / data),
            "--init", str(init), "--out", str(a.work / "runs" / name),
            "--steps", str(steps), "--batch-size", str(a.batch_size), "--lr", lr, "--warmup",
            str(warmup), "--seed", str(seed), "--chat", "--save-every", "500",
            "--log-every", "20"] + flags


def run_cmd(a, name: str) -> list[str]:
    return continue_cmd(a, name) if name in CONTINUE else train_cmd(a, name)


def threads(name: str) -> int:
    return CONTINUE[name][-1] if name in CONTINUE else 1


def eval_cmd(a, name: str) -> list[str]:
    return [PY, "-m", "stllm_engine.evaluation.mvbench", "--data", str(a.work / "data"),
            "--model", str(a.work / "runs" / name / "final"), "--backend", "reference",
            "--video-tokens", "own", "--out", str(RESULTS / f"eval-{name}-{DEVICE}.json")]


def data_cmd(a, name: str) -> list[str]:
    return [PY, "-m", "stllm_engine.datasets.synthetic", "--out", str(a.work / name), "--n-train",
            str(DATA_SETS[name]), "--n-test", "40", "--seed", "0", "--frames", "16", "--size", "64"]


def stage_data(a) -> None:
    for name in DATA_SETS:
        run(data_cmd(a, name))


def stage_init(a) -> None:
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(a.work / "init", vit="eva", video_input="all", seed=0, shards=1,
                          fmt="safetensors", **SIZES)


def stage_pretrain(a) -> None:
    run(pretrain_cmd(a))


def grow_llm(src: Path, dst: Path, layers: int) -> None:
    """Write ``src`` with its LLM deepened to ``layers`` layers: new layer i is a copy of layer
    i mod n whose attention ``o_proj`` and MLP ``down_proj`` are zero, so each new block adds
    nothing to the residual stream (the grown model computes exactly what ``src`` does) until
    training moves those projections off zero. Tokenizer files are copied."""
    import torch

    from dataclasses import replace

    from stllm_engine.weights import load_checkpoint, write_checkpoint

    ckpt = load_checkpoint(src, dtype=torch.float32, progress=False)  # drops mvm_decoder.*
    sd, config = dict(ckpt.state_dict), ckpt.config
    n = config.llm.num_layers
    if layers <= n:
        raise ValueError(f"{src} already has {n} LLM layers (asked for {layers})")
    for i in range(n, layers):
        prefix = f"model.layers.{i % n}."
        for k in [k for k in sd if k.startswith(prefix)]:
            v = sd[k].clone()
            if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                v.zero_()
            sd[f"model.layers.{i}." + k[len(prefix):]] = v
    config = replace(config, llm=replace(config.llm, num_layers=layers), mvm_decoder=False,
                     torch_dtype="float32")
    if dst.exists():
        shutil.rmtree(dst)
    write_checkpoint(dst, config, sd, shards=1, fmt="safetensors")
    for p in src.iterdir():
        if p.name == "config.json" or p.suffix in (".bin", ".safetensors", ".pt") \
                or p.name.endswith(".index.json"):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)


def stage_grow(a) -> None:
    for folder, (base, layers) in GROW.items():
        grow_llm(a.work / "runs" / base / "final", a.work / folder, layers)
        print(f"grew {base} -> {a.work / folder} ({layers} LLM layers)")


def stage_train(a) -> None:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (a.work / "runs").mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in (n for n in a.runs if n in RUNS):
        procs[name] = (sh(train_cmd(a, name), a.work / "runs" / f"{name}.log", env), time.time())
    for name, (p, t0) in procs.items():
        if p.wait():
            raise SystemExit(f"training {name} failed; see {a.work / 'runs' / (name + '.log')}")
        (a.work / "runs" / name / "wall.json").write_text(json.dumps(
            {"seconds": round(time.time() - t0, 1), "threads": 1, "parallel_runs": len(procs)}) + "\n")


def stage_continue(a) -> None:
    for name in (n for n in a.runs if n in CONTINUE):
        init = CONTINUE[name][1]
        if init in GROW:  # the grow stage, run here as it needs the previous continuation
            base, layers = GROW[init]
            grow_llm(a.work / "runs" / base / "final", a.work / init, layers)
        env = {"OMP_NUM_THREADS": str(threads(name)), "MKL_NUM_THREADS": str(threads(name))}
        t0 = time.time()
        if sh(continue_cmd(a, name), a.work / "runs" / f"{name}.log", env).wait():
            raise SystemExit(f"training {name} failed; see {a.work / 'runs' / (name + '.log')}")
        (a.work / "runs" / name / "wall.json").write_text(json.dumps(
            {"seconds": round(time.time() - t0, 1), "threads": threads(name), "parallel_runs": 1}) + "\n")


def chat_eval(folder: Path, data: Path) -> dict:
    """Chat-path exact match (greedy, release chat defaults) on every held-out item."""
    from stllm_engine.datasets.chat import chat_answer
    from stllm_engine.evaluation import load_items
    from stllm_engine.reference import ReferenceSTLLM

    model = ReferenceSTLLM.from_pretrained(folder)
    scores: dict[str, list[int]] = {}
    examples = []
    for item in load_items(data / "test"):
        want = chat_answer(item.task, item.question, item.answer)
        got = model.answer(str(item.video_path), item.question, max_new_tokens=30)
        scores.setdefault(item.task, []).append(int(got == want))
        if len(examples) < 12:
            examples.append({"task": item.task, "question": item.question, "expected": want, "got": got})
    return {"tasks": {k: sum(v) / len(v) for k, v in scores.items()}, "examples": examples}


def stage_eval(a) -> None:
    for name in a.runs:
        run(eval_cmd(a, name))
        res = json.loads((RESULTS / f"eval-{name}-{DEVICE}.json").read_text())
        res["chat_exact_match"] = chat_eval(a.work / "runs" / name / "final", a.work / "data")
        (RESULTS / f"eval-{name}-{DEVICE}.json").write_text(json.dumps(res, indent=1) + "\n")


def _avg(d: dict, names) -> float:
    return sum(d[n] for n in names) / len(names)


def _scores(name: str) -> tuple[dict, dict, dict]:
    """(MVBench-format accuracy, chat exact match, items) per task of run ``name``, from its eval json."""
    ev = json.loads((RESULTS / f"eval-{name}-{DEVICE}.json").read_text())
    return ({k: v["accuracy"] for k, v in ev["tasks"].items()}, ev["chat_exact_match"]["tasks"],
            {k: v["total"] for k, v in ev["tasks"].items()})


def above_chance(acc: float, task: str, n: int) -> bool:
    """More than two standard errors of a chance-level guesser above chance (n items)."""
    p = CHANCE[task]
    return acc > p + 2 * (p * (1 - p) / n) ** 0.5


def clearly_lower(new: float, old: float, n: int) -> bool:
    """``new`` is more than two binomial standard errors (of ``old``, n items) below ``old``."""
    return new < old - 2 * (old * (1 - old) / n) ** 0.5


def base_chain(name: str) -> list[str]:
    """The runs ``name`` continues, oldest first (a base run, then continued runs)."""
    chain, b = [], CONTINUE[name][0]
    while b is not None:
        chain.insert(0, b)
        b = CONTINUE[b][0] if b in CONTINUE else None
    return chain


def pick_shipped(a) -> str:
    """The base run with the best chat temporal average, replaced by a continued run only if that
    one has a higher chat temporal average AND is not clearly worse, in either metric, on any task
    where the current pick is above chance (:func:`above_chance`; 40 items: > 38.7% / > 48.3% for
    4 / 3 options). Clearly worse = lower by more than two binomial standard errors of the current
    pick's accuracy (:func:`clearly_lower`; e.g. 72.5% on 40 items: below 58.4%): a drop of a few
    items out of 40 is noise, not a lost skill."""
    best = max((n for n in a.runs if n in RUNS), key=lambda n: _avg(_scores(n)[1], TEMPORAL))
    for name in (n for n in a.runs if n in CONTINUE):
        (*old, n), new = _scores(best), _scores(name)[:2]
        worse = [t for o, c in zip(old, new) for t in o
                 if above_chance(o[t], t, n[t]) and clearly_lower(c[t], o[t], n[t])]
        if _avg(new[1], TEMPORAL) > _avg(old[1], TEMPORAL) and not worse:
            best = name
    return best


def stage_table(a) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import git_commit

    def read_log(folder: Path) -> list[dict]:
        return [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]

    pre = read_log(a.work / "pretrain")
    shipped = pick_shipped(a)
    rows = []
    for name in a.runs:
        run_dir = a.work / "runs" / name
        log = read_log(run_dir)
        wall = run_dir / "wall.json"
        train = {"benchmark": f"train-{name}", "device": DEVICE, "commit": git_commit(),
                 "command": " ".join(run_cmd(a, name)).replace(PY, "python"),
                 "pretrain_command": " ".join(pretrain_cmd(a)).replace(PY, "python"),
                 "config": json.loads((run_dir / "train_config.json").read_text()),
                 "sizes": SIZES, "steps": log[-1]["step"], "train_seconds": log[-1]["seconds"],
                 "pretrain_steps": pre[-1]["step"], "pretrain_seconds": pre[-1]["seconds"],
                 "wall": json.loads(wall.read_text()) if wall.is_file() else None,
                 "final": log[-1], "log": log}
        if name in CONTINUE:  # steps and clock of the runs it continues (oldest first)
            chain = base_chain(name)
            logs = [read_log(a.work / "runs" / b) for b in chain]
            train.update(base_run=chain[-1], base_runs=chain,
                         base_steps=[l[-1]["step"] for l in logs],
                         base_seconds=[l[-1]["seconds"] for l in logs])
            if CONTINUE[name][1] in GROW:
                train["grown"] = {"folder": CONTINUE[name][1], "from": GROW[CONTINUE[name][1]][0],
                                  "llm_layers": GROW[CONTINUE[name][1]][1]}
        (RESULTS / f"train-{name}-{DEVICE}.json").write_text(json.dumps(train, indent=1) + "\n")
        ev = json.loads((RESULTS / f"eval-{name}-{DEVICE}.json").read_text())
        acc = {k: v["accuracy"] for k, v in ev["tasks"].items()}
        rows.append((name, acc, ev["chat_exact_match"]["tasks"], train))
    lines = ["# The shipped default model: trainings on synthetic temporal video QA", "",
             "Held-out test split: 40 items per task, MVBench format, multiple choice (letter check);",
             "each model evaluated with its own video input (`--video-tokens own`). Chat = exact match",
             "of the plain chat answer (`answer()`, greedy, repetition penalty 1.5) with the expected",
             "sentence, same items. Accuracies in %.", ""]
    tasks = list(TEMPORAL + CONTROL)
    lines.append("| model | " + " | ".join(tasks) + " | temporal avg | control avg | chat temporal | "
                 "chat control | steps | training time |")
    lines.append("|---" * (len(tasks) + 7) + "|")
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[t]:.1f}" for t in tasks)
                 + f" | {100 * _avg(CHANCE, TEMPORAL):.1f} | {100 * _avg(CHANCE, CONTROL):.1f}"
                 + f" | {100 * _avg(CHANCE, TEMPORAL):.1f} | {100 * _avg(CHANCE, CONTROL):.1f} | | |")
    for name, acc, chat, tr in rows:
        steps = [tr["pretrain_steps"], *tr.get("base_steps", []), tr["steps"]]
        mins = [tr["pretrain_seconds"], *tr.get("base_seconds", []), tr["train_seconds"]]
        label = name + (" (shipped)" if name == shipped else " (not shipped)" if name in CONTINUE else "")
        lines.append(f"| {label} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
                     + f" | {100 * _avg(acc, TEMPORAL):.1f} | {100 * _avg(acc, CONTROL):.1f}"
                     + f" | {100 * _avg(chat, TEMPORAL):.1f} | {100 * _avg(chat, CONTROL):.1f}"
                     + " | " + " + ".join(str(x) for x in steps if x is not None)
                     + " | " + " + ".join(f"{x / 60:.1f}" for x in mins if x is not None) + " min |")
    lines += ["", "Chat path per task (exact match of the answer sentence, %):", "",
              "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, acc, chat, tr in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * chat[t]:.1f}" for t in tasks) + " |")
    lines += ["", NOTES]
    lines += ["", f"Model: {SIZES} (write_tiny_checkpoint overrides of the tiny preset; ~1M parameters,",
              "the project-trained 1024-token BPE tokenizer). Training: batch "
              f"{a.batch_size}, AdamW lr 1e-3, cosine to 1e-4, seed 0. Steps = shared warm-up",
              "(controls only, from random init) + the run itself (all six tasks, 50 warmup steps);",
              "times are the training loops' own clocks (frame decoding of the first epoch included),",
              "one thread each, the three runs in parallel on a 2-core CPU shared with other work.",
              "Continued runs: + the steps of each run they continue, then their own (lr, warmup,",
              "seed, threads: `CONTINUE` in the script, commands below; cosine to 0.1 x lr).",
              "`all-nomask-cont` ran with 2 threads alone on the idle machine; `grow4`, `grow4-recon`,",
              "`grow4-recon2` with 1 thread pinned to one core (`taskset -c 1`) while the other core",
              "ran other work; `recon2-nomask-short` / `recon2-mask-short` side by side on that one",
              "core. `grow*` / `recon2-*` models have the LLM grown to 4 x 128 (`grow_llm`; 1.39M",
              "parameters instead of 1.0M); `--recon 2.0` adds the training-only frame-reconstruction",
              "loss (`stllm_engine/training/losses.py`: FrameReconHead, not saved in the model folder).",
              "Data: MVBench-format + chat-format examples of the training clips: 300 per task",
              "(`data-300`) for the warm-up, the three base runs and `all-nomask-cont`; 1200 per task",
              "(`data`) for the later runs. Every row is evaluated on `data/test` (40 per task; it avoids",
              "all 1200 training clips of each task).",
              "", "Commands (`scripts/train_default_model.py` runs all of them):", "", "```"]
    for name in DATA_SETS:
        lines.append(" ".join(data_cmd(a, name)).replace(PY, "python"))
    lines.append(f"python -c 'write_tiny_checkpoint(\"{a.work / 'init'}\", seed=0, shards=1, "
                 f"fmt=\"safetensors\", **SIZES)'  # SIZES in scripts/train_default_model.py")
    lines.append("OMP_NUM_THREADS=1 " + " ".join(shlex.quote(c) for c in pretrain_cmd(a)).replace(PY, "python"))
    for name in a.runs:
        init = CONTINUE[name][1] if name in CONTINUE else None
        if init in GROW:
            lines.append(f"python -c 'grow_llm(\"{a.work / 'runs' / GROW[init][0] / 'final'}\", "
                         f"\"{a.work / init}\", layers={GROW[init][1]})'  # in scripts/train_default_model.py")
        lines.append(f"OMP_NUM_THREADS={threads(name)} " + " ".join(run_cmd(a, name)).replace(PY, "python"))
    for name in a.runs:
        lines.append(" ".join(eval_cmd(a, name)).replace(PY, "python"))
    lines += ["```", ""]
    (RESULTS / "default_model.md").write_text("\n".join(lines))
    print("\n".join(lines))


def stage_ship(a) -> None:
    import torch

    from dataclasses import replace

    from stllm_engine.evaluation import load_items
    from stllm_engine.datasets.chat import chat_answer
    from stllm_engine.reference import ReferenceSTLLM
    from stllm_engine.weights import load_checkpoint, write_checkpoint

    # best = highest chat-path temporal average (the path the CLI uses; MVBench-format letter
    # accuracy stayed at chance for every run, see default_model.md)
    best = pick_shipped(a)
    src = a.work / "runs" / best / "final"
    ckpt = load_checkpoint(src, dtype=torch.float32, progress=False)  # drops mvm_decoder.*
    dst, new, old = (ASSETS / n for n in ("default_model", ".default_model.new", ".default_model.old"))
    for d in (new, old):
        if d.exists():
            shutil.rmtree(d)
    config = replace(ckpt.config, mvm_decoder=False, torch_dtype="float32")
    write_checkpoint(new, config, ckpt.state_dict, shards=1, fmt="safetensors")
    for p in src.iterdir():
        if p.name in ("config.json",) or p.suffix in (".bin", ".safetensors", ".pt") \
                or p.name.endswith(".index.json"):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, new / p.name)
    model = ReferenceSTLLM.from_pretrained(new)
    for item in load_items(a.work / "data" / "test", tasks=[SAMPLE_TASK]):
        want = chat_answer(item.task, item.question, item.answer)
        if model.answer(str(item.video_path), item.question) == want:
            break
    else:
        shutil.rmtree(new)
        raise SystemExit(f"no held-out {SAMPLE_TASK} clip answered correctly by {best}; shipped nothing")
    # swap: the new folder is complete before the old one moves away (two renames, no copy)
    if dst.exists():
        dst.rename(old)
    new.rename(dst)
    if old.exists():
        shutil.rmtree(old)
    shutil.copy2(item.video_path, ASSETS / ".sample.mp4.new")
    (ASSETS / ".sample.json.new").write_text(json.dumps(
        {"question": item.question, "expected": want,
         "source": f"held-out test split, {item.video_path.name}", "model": best}, indent=1) + "\n")
    os.replace(ASSETS / ".sample.mp4.new", ASSETS / "sample.mp4")
    os.replace(ASSETS / ".sample.json.new", ASSETS / "sample.json")
    ship_heldout(a.work / "data" / "test", per_task=12)
    print(f"shipped {best} -> {dst}; sample {item.video_path.name}: {want}")


def ship_heldout(test_dir: Path, per_task: int) -> None:
    """The first ``per_task`` held-out items of :data:`HELDOUT_TASKS` as an MVBench-format data dir."""
    if HELDOUT.exists():
        shutil.rmtree(HELDOUT)
    (HELDOUT / "json").mkdir(parents=True)
    table = json.loads((test_dir / "tasks.json").read_text())
    keep = {}
    for task in HELDOUT_TASKS:
        json_name, prefix, kind, bound = table[task]
        entries = json.loads((test_dir / "json" / json_name).read_text())[:per_task]
        (HELDOUT / "json" / json_name).write_text(json.dumps(entries, indent=1) + "\n")
        for e in entries:
            (HELDOUT / prefix).mkdir(parents=True, exist_ok=True)
            shutil.copy2(test_dir / prefix / e["video"], HELDOUT / prefix / e["video"])
        keep[task] = [json_name, prefix, kind, bound]
    (HELDOUT / "tasks.json").write_text(json.dumps(keep, indent=1) + "\n")


STAGES = {"data": stage_data, "init": stage_init, "pretrain": stage_pretrain, "train": stage_train,
          "continue": stage_continue, "grow": stage_grow, "eval": stage_eval,
          "table": stage_table, "ship": stage_ship}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "build" / "default_model")
    # "grow" alone re-writes the grown init folders; "continue" grows them itself when needed
    p.add_argument("--stages", nargs="*", default=[s for s in STAGES if s != "grow"],
                   choices=list(STAGES))
    p.add_argument("--runs", nargs="*", default=list(RUNS) + list(CONTINUE),
                   choices=list(RUNS) + list(CONTINUE))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    a.work = a.work.resolve()
    for s in a.stages:
        print(f"== {s}", flush=True)
        STAGES[s](a)


if __name__ == "__main__":
    main()
