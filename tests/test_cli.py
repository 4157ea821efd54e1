"""The command line on a tiny checkpoint and a real mp4: answers, JSON, streaming, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from stllm_engine.api import STLLM
from stllm_engine.cli import main
from stllm_engine.reference import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_corrupt_video, write_video

QUESTION = "What is moving?"
MAX_NEW = 8
TIMING_KEYS = {"frame_decode", "vision", "qformer", "prefill", "ttft", "decode", "total",
               "decode_tokens_per_s", "num_decode_tokens", "vision_cache_hit"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=2)
    video = write_video(d / "clip.mp4", num_frames=12, size=(96, 72), seed=3)
    return ckpt, video


@pytest.fixture(scope="module")
def engine_answer(files):
    llm = STLLM.from_pretrained(files[0])
    return llm.answer(str(files[1]), QUESTION, max_new_tokens=MAX_NEW)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def base(files, *extra):
    return ["answer", "--model", str(files[0]), "--video", str(files[1]), "--question", QUESTION,
            "--max-new-tokens", str(MAX_NEW), *extra]


def test_answer_prints_the_engine_answer(files, engine_answer, capsys):
    code, out, err = run(capsys, *base(files))
    assert code == 0, err
    assert out == engine_answer + "\n"
    assert "timings:" in err and "ttft" in err and "loading" in err


def test_json_has_answer_and_timings(files, engine_answer, capsys):
    code, out, err = run(capsys, *base(files, "--json"))
    assert code == 0, err
    res = json.loads(out)
    assert res["text"] == engine_answer and res["backend"] == "engine"
    assert TIMING_KEYS <= set(res["timings"])
    assert res["timings"]["ttft"] > 0 and res["finish_reason"] in ("stop", "length")
    assert 1 <= res["usage"]["completion_tokens"] <= MAX_NEW
    assert "timings:" not in err


def test_choice_flags_constrain_the_answer(files, capsys):
    choices = ["a square", "a circle", "nothing moves"]
    llm = STLLM.from_pretrained(files[0])
    want = llm.answer(str(files[1]), QUESTION, max_new_tokens=32, choices=choices)
    assert llm.last_output.finish_reason == "stop" and want in choices
    code, out, err = run(capsys, *base(files, "--max-new-tokens", "32", *[a for c in choices for a in ("--choice", c)]))
    assert code == 0, err
    assert out == want + "\n"
    code, out, err = run(capsys, *base(files, "--max-new-tokens", "2", "--choice", choices[2]))
    cut = out.strip()  # too few tokens for the choice: cut (finish "length"), as vLLM does
    assert cut and choices[2].startswith(cut) and cut != choices[2] and "finish: length" in err
    code, out, err = run(capsys, *base(files, "--choice", "  "))
    assert code == 2 and "bad sampling flag --choice: SamplingParams.choices must be" in err
    code, out, err = run(capsys, *base(files, "--choice", "x", "--backend", "reference"))
    assert code == 2 and "--choice is not supported by --backend reference" in err


def test_json_logprobs(files, engine_answer, capsys):
    code, out, err = run(capsys, *base(files, "--json", "--logprobs", "2"))
    assert code == 0, err
    res = json.loads(out)
    assert res["text"] == engine_answer and "logprobs" in res
    assert len(res["logprobs"]) == res["usage"]["completion_tokens"]
    assert all(x["logprob"] <= 0 and len(x["top_logprobs"]) == 2 for x in res["logprobs"])
    for extra, message in ((["--logprobs", "2"], "--logprobs needs --json"),
                           (["--json", "--logprobs", "21"], "bad sampling flag --logprobs"),
                           (["--json", "--logprobs", "1", "--backend", "reference"], "not supported by --backend")):
        code, _, err = run(capsys, *base(files, *extra))
        assert code == 2 and message in err, err
    code, out, _ = run(capsys, *base(files, "--json"))
    assert code == 0 and "logprobs" not in json.loads(out)


def test_stream_prints_the_same_answer(files, engine_answer, capsys):
    code, out, err = run(capsys, *base(files, "--stream"))
    assert code == 0, err
    assert out == engine_answer + "\n"


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--no-progress"]])
def test_progress_lines_on_stderr(files, engine_answer, capsys, monkeypatch, extra):
    """With no delay, every step reports its phase on stderr; the answer on stdout is unchanged.
    Streaming leaves the generation to the streamed text; --no-progress prints none."""
    from stllm_engine import cli_progress

    monkeypatch.setattr(cli_progress, "DELAY", 0.0)
    monkeypatch.setattr(cli_progress, "EVERY", 0.0)
    code, out, err = run(capsys, *base(files, *extra))
    assert code == 0, err
    assert out == engine_answer + "\n"
    lines = [ln for ln in err.splitlines() if ln.startswith("stllm: ") and " ... " in ln]
    if extra == ["--no-progress"]:
        assert lines == []
        return
    generating = [ln for ln in lines if ln.startswith("stllm: generating: ")]
    if extra == ["--stream"]:
        assert generating == []
    else:  # a report after every step but the last: the prompt prefills in one, then a token a step
        n = json.loads(run(capsys, *base(files, "--json"))[1])["usage"]["completion_tokens"]
        counts = [int(ln.split(": ")[2].split("/")[0]) for ln in generating]
        assert counts == sorted(counts) and set(range(1, n)) <= set(counts) <= set(range(1, n + 1))
        assert all(ln.split(" ... ")[0].endswith(f"/{MAX_NEW} tokens") for ln in generating)


def test_progress_during_a_long_step(files, engine_answer, capsys, monkeypatch):
    """A step that runs long (here the first, made slow) is reported from the watcher thread."""
    from stllm_engine import cli_progress
    from stllm_engine.engine.llm_engine import LLMEngine

    monkeypatch.setattr(cli_progress, "DELAY", 0.0)
    monkeypatch.setattr(cli_progress, "EVERY", 0.0)
    real, calls = LLMEngine.step, []

    def slow_first_step(self):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.45)
        return real(self)

    monkeypatch.setattr(LLMEngine, "step", slow_first_step)
    code, out, err = run(capsys, *base(files, "--stream"))  # streamed: only the steps before the answer
    assert code == 0, err
    assert out == engine_answer + "\n"
    during = [ln for ln in err.splitlines() if ln.startswith("stllm: ") and " ... " in ln]
    assert len(during) >= 2 and all("prefill: 0/" in ln or "decoding and encoding" in ln for ln in during)


def test_a_failing_model_step_exits_1_not_2(files, capsys, monkeypatch):
    """A model step that raises is the engine's failure, not bad input: exit 1 with the
    MODEL_FAILURE message (its error had the exception's type name in front of it, so it was
    taken for bad input, exit 2 / HTTP 400)."""
    from stllm_engine.engine.model_runner import ModelRunner

    def broken(self, *a, **kw):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(ModelRunner, "run", broken)
    code, out, err = run(capsys, *base(files))
    assert code == 1 and out == ""
    assert "model step failed: RuntimeError: kernel exploded" in err


def test_max_length_cuts_and_says_so(files, capsys, monkeypatch):
    """--max-length reaches the engine; a prompt cut from the left is reported on stderr and in
    the JSON usage; --kv-cache-mib sizes the pool."""
    import stllm_engine.cli as cli

    built = []
    real = cli.load_engine
    monkeypatch.setattr(cli, "load_engine", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    code, out, err = run(capsys, *base(files, "--max-length", "40", "--kv-cache-mib", "3", "--json"))
    assert code == 0, err
    cfg = built[0].engine.config
    assert cfg.max_length == 40 and cfg.kv_cache_memory == 3 << 20
    usage = json.loads(out)["usage"]
    cut = usage["truncated_prompt_tokens"]
    assert cut > 0 and usage["prompt_tokens"] + MAX_NEW == 40
    assert f"cut from the left by {cut} of {cut + 40 - MAX_NEW} positions" in err and "--max-length" in err
    code, out, err = run(capsys, *base(files, "--json"))
    assert json.loads(out)["usage"]["truncated_prompt_tokens"] == 0 and "cut from the left" not in err
    assert json.loads(out)["usage"]["prompt_tokens"] == cut + 40 - MAX_NEW


def test_enforce_eager_reaches_the_engine_config(files, engine_answer, capsys, monkeypatch):
    import stllm_engine.cli as cli

    built = []
    real = cli.load_engine
    monkeypatch.setattr(cli, "load_engine", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    code, out, err = run(capsys, *base(files, "--enforce-eager"))
    assert code == 0, err
    assert out == engine_answer + "\n"  # on the CPU decode steps never use CUDA graphs anyway
    assert built[0].engine.config.enforce_eager is True


@pytest.mark.parametrize("extra", [["--num-frames", "4"], ["--keep-ratio", "0.5"], ["--num-beams", "2"]])
def test_request_options_reach_the_engine(files, capsys, extra):
    llm = STLLM.from_pretrained(files[0])
    kw = {"--num-frames": ("num_frames", int), "--keep-ratio": ("keep_ratio", float),
          "--num-beams": ("num_beams", int)}[extra[0]]
    want = llm.answer(str(files[1]), QUESTION, max_new_tokens=MAX_NEW, **{kw[0]: kw[1](extra[1])})
    code, out, err = run(capsys, *base(files, *extra, "--json"))
    assert code == 0, err
    assert json.loads(out)["text"] == want


def test_reference_backend_matches_reference_model(files, capsys):
    ref = ReferenceSTLLM.from_pretrained(files[0])
    want = ref.answer(str(files[1]), QUESTION, max_new_tokens=MAX_NEW)
    code, out, err = run(capsys, *base(files, "--backend", "reference", "--json"))
    assert code == 0, err
    res = json.loads(out)
    assert res["text"] == want and res["backend"] == "reference"
    assert {"frame_decode", "vision", "qformer", "generate", "total"} <= set(res["timings"])


@pytest.mark.parametrize("argv, needle", [
    (["--video", "{d}/missing_clip.mp4"], "missing_clip.mp4 does not exist"),
    (["--video", "https://example.com/clip.mp4"], "is a URL; videos are read from local files"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-frames", "0"], "--num-frames"),
    (["--keep-ratio", "0"], "--keep-ratio"),
    (["--model", "{d}/no_model"], "no_model"),
    (["--model", "{d}"], "config.json"),
    (["--backend", "reference", "--top-k", "5"], "--top-k"),
    (["--backend", "reference", "--max-length", "4000"], "--max-length"),
    (["--max-length", "0"], "--max-length"),
    (["--kv-cache-mib", "-3"], "--kv-cache-mib"),
    (["--max-length", "20"], "context too long"),  # the prompt alone is longer: an error, no cut
    (["--stream", "--num-beams", "3"], "beam"),
    (["--dtype", "float64"], "float64"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "nodev"], "device"),
    (["--video", "{corrupt}"], "corrupt.mp4"),
    (["--question", "  "], "--question is empty"),
    (["--video", "/tmp/" + "a" * 300 + ".mp4"], "video path cannot be looked up"),
    (["--bogus-flag"], "--bogus-flag"),
])
def test_bad_input_exits_2_with_one_line(files, capsys, tmp_path, argv, needle):
    corrupt = write_corrupt_video(tmp_path / "corrupt.mp4") if "{corrupt}" in argv else None
    argv = [a.format(d=tmp_path, corrupt=corrupt) for a in argv]
    full = ["answer", "--model", str(files[0]), "--video", str(files[1]), "--question", QUESTION, *argv]
    code, out, err = run(capsys, *full)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("stllm: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and out == ""


def test_module_entry_point_missing_video_exit_code(files, tmp_path):
    missing = tmp_path / "gone.mp4"
    proc = subprocess.run([sys.executable, "-m", "stllm_engine", "answer", "--model", str(files[0]),
                           "--video", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"stllm: error: video not found: {missing} does not exist"
    assert proc.stdout == ""


def test_default_model_is_flagged_untrained(tmp_path, capsys, monkeypatch, files):
    monkeypatch.setenv("STLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("stllm_engine.default_model.ASSETS", tmp_path / "no-assets")  # hide the shipped model
    code, out, err = run(capsys, "answer", "--video", str(files[1]), "--max-new-tokens", "3")
    assert code == 0, err
    assert "UNTRAINED" in err and str(tmp_path / "cache") in err
    assert os.path.isfile(tmp_path / "cache" / "untrained-tiny" / "config.json")


def test_answer_with_a_separate_qformer_tokenizer(tmp_path, capsys):
    """A release-style folder without qformer_tokenizer/ answers once --qformer-tokenizer is given."""
    import shutil

    from stllm_engine.cli import main
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint
    from stllm_engine.testing.videos import write_video

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    bert = tmp_path / "bert"
    shutil.move(str(ckpt / "qformer_tokenizer"), str(bert))
    video = write_video(tmp_path / "v.mp4", num_frames=12, size=(96, 72), fps=8)
    args = ["answer", "--model", str(ckpt), "--video", str(video), "--question", "What moves?",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(args) == 2                       # no Q-Former tokenizer: one clear error
    assert "tokenizer" in capsys.readouterr().err.lower()
    assert main(args + ["--qformer-tokenizer", str(bert)]) == 0


@pytest.mark.parametrize("no_warmup", [False, True])
def test_serve_command_warms_up_then_answers(files, engine_answer, no_warmup):
    """``stllm serve`` in a subprocess: it warms up at load (on the CPU too) unless
    ``--no-warmup``, says where it serves, answers /health with clean stats (the warm-up left no
    cache entries) and then a question, as the engine does."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "stllm_engine", "serve", "--model", str(files[0]), "--port", str(port)]
    name = "tiny-stllm" if no_warmup else str(files[0])  # --served-model-name, else the folder
    extra = ["--no-warmup", "--served-model-name", name] if no_warmup else []
    proc = subprocess.Popen(cmd + extra, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        log = "".join(lines)
        assert "serving" in log, log
        assert ("warm-up" in log) != no_warmup, log
        base_url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base_url + "/health", timeout=30) as r:
            health = json.loads(r.read())
        assert health["stats"]["vision_cache"]["entries"] == 0, health
        assert health["stats"]["kv"]["prefix_hit_tokens"] == 0, health
        body = json.dumps({"video": str(files[1]), "question": QUESTION,
                           "params": {"max_new_tokens": MAX_NEW}}).encode()
        req = urllib.request.Request(base_url + "/v1/answer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["text"] == engine_answer
        assert f"as model {name!r}" in log, log
        with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == [name]
        body = json.dumps({"model": name, "max_tokens": MAX_NEW, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "file://" + str(files[1])}},
            {"type": "text", "text": QUESTION}]}]}).encode()
        req = urllib.request.Request(base_url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == engine_answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _serve(files, port, *extra):
    import threading

    cmd = [sys.executable, "-m", "stllm_engine", "serve", "--model", str(files[0]), "--port", str(port),
           "--no-warmup", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _wait_for(lines, text: str, timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(text in ln for ln in list(lines)):
            return "".join(lines)
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {''.join(lines)!r}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("finish", [True, False])
def test_serve_stops_gracefully_on_sigterm(files, engine_answer, finish):
    """SIGTERM: no new connections, the request in flight (its body half sent when the signal
    came) still gets its answer and the server exits 0; with a client that never finishes, the
    shutdown timeout aborts it."""
    import signal
    import socket

    port = _free_port()
    proc, lines = _serve(files, port, "--shutdown-timeout", "60" if finish else "0.5")
    try:
        _wait_for(lines, "serving")
        body = json.dumps({"video": str(files[1]), "question": QUESTION,
                           "params": {"max_new_tokens": MAX_NEW}}).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.3)  # the server has accepted the connection and waits for the rest of the body
        proc.send_signal(signal.SIGTERM)
        log = _wait_for(lines, "SIGTERM: stopping")
        assert "1 connection(s) in flight" in log, log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        if finish:
            conn.sendall(body[10:])
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and json.loads(payload)["text"] == engine_answer
        assert proc.wait(timeout=60) == 0
        log = _wait_for(lines, "stopped")
        assert ("aborted at the timeout" in log) != finish, log
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
