"""The benchmark scripts run and write results in the shared format (../shared/BENCHMARKS.md), and
every committed result file follows it: ``ratio`` is "the engine is better by", so baseline /
engine for times and engine / baseline for rates. Smoke runs on the tiny preset or quick settings
(numbers not checked: speed targets live in the benchmarks themselves)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TIMES = {"s", "ms"}
RATES = {"tokens/s", "requests/s", "TFLOP/s", "GB/s"}
TOP_KEYS = {"benchmark", "device", "commit", "date", "rows"}
ROW_KEYS = {"config", "metric", "engine", "baseline", "baseline_value", "ratio", "unit"}


def check_result(d: dict, where: str) -> None:
    assert TOP_KEYS <= set(d), f"{where}: missing {TOP_KEYS - set(d)}"
    assert d["rows"], f"{where}: no rows"
    for i, r in enumerate(d["rows"]):
        at = f"{where} row {i} ({r.get('metric')})"
        assert ROW_KEYS <= set(r), f"{at}: missing {ROW_KEYS - set(r)}"
        assert isinstance(r["config"], dict) and isinstance(r["baseline"], str), at
        assert r["unit"] in TIMES | RATES, f"{at}: unit {r['unit']!r} is neither a time nor a rate"
        e, b, ratio = r["engine"], r["baseline_value"], r["ratio"]
        assert all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (e, b, ratio)), at
        want = b / e if r["unit"] in TIMES else e / b
        assert ratio == pytest.approx(want, rel=0.02, abs=2e-3), f"{at}: ratio {ratio}, values say {want:.3f}"


# eval-* / train-*: the default model's training and evaluation records
# (scripts/train_default_model.py), not engine-vs-baseline comparisons
COMPARISONS = sorted(p for p in RESULTS.glob("*.json") if not p.name.startswith(("eval-", "train-")))


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.name)
def test_committed_results_follow_the_shared_format(path):
    check_result(json.loads(path.read_text()), path.name)


def run_script(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STLLM_CACHE": str(tmp_path / "cache")}  # its own checkpoints and clips
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("argv,metrics", [
    (["e2e.py", "--preset", "tiny", "--quick"],
     {"ttft", "decode_tokens_per_s", "requests_per_s", "cached_video_second_question_ttft", "chat_follow_up_ttft"}),
    (["e2e.py", "--preset", "tiny", "--quick", "--vit", "btadapter", "--video-input", "residual"],
     {"ttft", "decode_tokens_per_s", "requests_per_s", "cached_video_second_question_ttft", "chat_follow_up_ttft"}),
    (["frames.py", "--repeats", "1"], {"decode_ms", "preprocess_ms"}),
    (["attention_cpu.py", "--quick", "--repeats", "1"], None),
    (["kernels.py", "--quick", "--no-gpu"], None),
], ids=lambda a: a[0] if isinstance(a, list) else "")
def test_benchmark_writes_rows_in_the_shared_format(tmp_path, argv, metrics):
    out = tmp_path / "result.json"
    proc = run_script(tmp_path, *argv, "--out", str(out))
    d = json.loads(out.read_text())
    check_result(d, argv[0])
    assert d["benchmark"] and d["device"].startswith("cpu-")
    if metrics is not None:
        assert {r["metric"] for r in d["rows"]} == metrics
    if argv[0] == "e2e.py":  # CPU: each row's host-speed probe, engine side and baseline side
        for r in d["rows"]:
            ms = r["config"]["host_probe_ms"]
            assert len(ms) == 2 and all(x > 0 for x in ms), r["metric"]
            k, reps = map(int, r["config"]["same_greedy_ids"].split("/"))  # the output check is stored
            assert 0 <= k <= reps == 1
    if "--video-input" in argv:  # the variant's checkpoint and workload: 64 frames -> 4 local frames' tokens
        cfg = d["rows"][0]["config"]
        assert (cfg["vit"], cfg["video_input"], cfg["frames"], cfg["clip_frames"]) == ("btadapter", "residual", 64, 128)
        assert cfg["video_tokens"] == 4 * 6  # tiny: residual_size 4, 6 queries
    assert "ratio" in proc.stdout  # the table's header


def test_e2e_host_probe_notes_only_a_speed_change(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    assert e2e.probe_note("ttft", None) == "" and e2e.probe_note("ttft", [10.0, 12.4]) == ""
    note = e2e.probe_note("ttft", [4.0, 10.0])
    assert "ttft" in note and "4.0 vs 10.0 ms" in note and "not side by side" in note
    probe = e2e.HostProbe("cpu", torch.float32)
    probe("a"), probe("a"), probe("b")
    assert [len(v) for v in probe.ms.values()] == [2, 1]
    assert all(x > 0 for x in probe.medians("a", "b"))
    assert e2e.HostProbe("cuda", torch.float32).medians("a", "b") is None


@pytest.mark.parametrize("variant", [[], ["--vit", "btadapter", "--video-input", "residual"]],
                         ids=["eva-all", "btadapter-residual"])
def test_profile_prints_every_phase_for_both_sides(tmp_path, variant):
    proc = run_script(tmp_path, "profile_e2e.py", "--preset", "tiny", "--dtype", "float32", "--repeats", "1",
                      "--new-tokens", "4", *variant)
    frames = 64 if variant else 16
    assert f"{frames} frames" in proc.stdout
    for phase in ("frame decode", "ViT", "Q-Former+proj", "LLM prefill"):
        for side in ("engine", "reference"):
            assert f"{phase} ({side})" in proc.stdout, phase
    assert "LLMEngine.step" in proc.stdout


def test_plot_draws_a_result_curve_as_a_png(tmp_path):
    """benchmarks/plot.py: the rows of one metric against a config key, a PNG beside the JSON;
    a missing key or several metrics are refused by name."""
    from PIL import Image

    rows = [{"config": {"frames": f, "op": "x"}, "metric": "ttft", "engine": e, "baseline": "ref",
             "baseline_value": b, "ratio": b / e, "unit": "s"} for f, e, b in ((16, 0.2, 0.3), (64, 0.7, 1.3), (256, 3.4, 5.4))]
    rows.append({"config": {"op": "y"}, "metric": "decode", "engine": 1, "baseline": "ref", "baseline_value": 1,
                 "ratio": 1, "unit": "tok/s"})
    res = tmp_path / "long-video-test.json"
    res.write_text(json.dumps({"benchmark": "long-video", "device": "cpu-2core", "commit": "abc", "date": "d",
                               "rows": rows}))
    run_script(tmp_path, "plot.py", str(res), "--x", "frames", "--metric", "ttft")
    with Image.open(tmp_path / "long-video-test.png") as img:
        assert img.size == (900, 560) and len(img.getcolors(1 << 16)) > 3  # drawn, not blank
    run_script(tmp_path, "plot.py", str(res), "--x", "frames", "--where", "op=x", "--out", str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").is_file()
    for argv, message in ((["--x", "frames"], "several metrics"), (["--x", "nope", "--metric", "ttft"], "config['nope']"),
                          (["--x", "frames", "--metric", "none"], "no rows")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(res), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_keep_ratio_scores_the_default_model_on_its_held_out_items(tmp_path):
    """benchmarks/keep_ratio.py: the shipped model's exact-match accuracy with a share of its video
    tokens against all of them, per mode, with the kept token count, and a PNG per mode."""
    out = tmp_path / "eval-keep-ratio.json"
    run_script(tmp_path, "keep_ratio.py", "--ratios", "0.5", "--modes", "even", "random", "--out", str(out))
    d = json.loads(out.read_text())
    assert [(r["config"]["keep_mode"], r["metric"]) for r in d["rows"]] == [("even", "accuracy"), ("random", "accuracy")]
    for r in d["rows"]:
        c = r["config"]
        assert c["items"] == 24 and 0 < c["video_tokens"] < c["full_video_tokens"]
        assert 0 <= r["engine"] <= 1 and r["baseline_value"] > 0.5  # the shipped model, every token
        assert set(c["per_task_accuracy"]) == {"Flash Count", "Appearance Order"}
    assert (tmp_path / "eval-keep-ratio-even.png").is_file() and (tmp_path / "eval-keep-ratio-random.png").is_file()
