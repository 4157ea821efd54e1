"""Batch files in OpenAI's batch format (``stllm run-batch``): every line gets its result in input
order, answers equal the Python API's whatever the window, bad lines and failing requests fail
alone with a message naming the problem. Tiny checkpoint, real encoded videos."""
from __future__ import annotations

import io
import json

import pytest

from stllm_engine.api import STLLM
from stllm_engine.batch import run_batch
from stllm_engine.cli import main
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_corrupt_video, write_video

Q1, Q2 = "What happens in the video?", "Which shape moves?"
N = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=5)
    videos = [str(write_video(d / f"v{i}.mp4", num_frames=12, size=(96, 72), seed=i)) for i in range(3)]
    return ckpt, videos, str(write_corrupt_video(d / "corrupt.mp4"))


@pytest.fixture(scope="module")
def llm(files):
    return STLLM.from_pretrained(files[0])


def chat_line(cid: str, video: str, question: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": dict(
        {"model": "gpt-4o-mini", "max_tokens": N, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": question}]}]}, **body)})


def lines(files) -> list[str]:
    _, videos, corrupt = files
    return [
        chat_line("a", videos[0], Q1),
        chat_line("b", videos[1], Q2, temperature=0.8, seed=3),
        "",  # blank lines are skipped
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/answer",
                    "body": {"video": videos[2], "question": Q1, "params": {"max_new_tokens": N}}}),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/answer", "body": {}}),
        json.dumps({"custom_id": "e", "method": "GET", "url": "/v1/models"}),
        chat_line("f", videos[0], Q1, stream=True),
        chat_line("g", corrupt, Q1),
        chat_line("h", "/no/such/clip.mp4", Q1),
        chat_line("i", videos[1], Q1, max_tokens=2),
    ]


@pytest.mark.parametrize("window", [1, 3, 64])
def test_results_in_input_order_equal_the_python_api(files, llm, window):
    _, videos, _ = files
    out = list(run_batch(llm, lines(files), model="tiny", window=window))
    assert [r["custom_id"] for r in out] == ["a", "b", "c", None, None, "e", "f", "g", "h", "i"]
    res = {r["custom_id"]: r for r in out if r["custom_id"]}
    ok = {cid: res[cid]["response"]["body"] for cid in "abci"}
    assert all(res[cid]["response"]["status_code"] == 200 and res[cid]["error"] is None for cid in "abci")
    want = {"a": llm.answer(videos[0], Q1, max_new_tokens=N),
            "b": llm.answer(videos[1], Q2, max_new_tokens=N, temperature=0.8, seed=3),
            "c": llm.answer(videos[2], Q1, max_new_tokens=N),
            "i": llm.answer(videos[1], Q1, max_new_tokens=2)}
    assert ok["a"]["choices"][0]["message"]["content"] == want["a"] and ok["a"]["model"] == "tiny"
    assert ok["b"]["choices"][0]["message"]["content"] == want["b"]
    assert ok["c"]["text"] == want["c"]  # the /v1/answer body
    assert ok["i"]["choices"][0]["finish_reason"] == "length" and ok["i"]["usage"]["completion_tokens"] == 2
    refused = [r for r in out if r["response"] is None]
    assert [r["error"]["code"] for r in refused] == ["invalid_json", "invalid_request", "invalid_request"]
    assert "not valid JSON" in refused[0]["error"]["message"] and "custom_id" in refused[1]["error"]["message"]
    assert "url" in refused[2]["error"]["message"]
    for cid, status, text in (("f", 400, "'stream'"), ("g", 400, "corrupt"), ("h", 400, "not found")):
        r = res[cid]["response"]
        assert r["status_code"] == status and text in r["body"]["error"]["message"].lower(), r


def test_run_batch_cli(files, llm, tmp_path, capsys):
    ckpt, videos, _ = files
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(chat_line(f"q{i}", videos[i % 3], Q1 if i % 2 else Q2) for i in range(7)) + "\n")
    assert main(["run-batch", "--model", str(ckpt), "-i", str(src), "-o", str(dst), "--window", "4"]) == 0
    err = capsys.readouterr().err
    assert "run-batch: 7 requests, 7 answered, 0 failed" in err
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["custom_id"] for r in got] == [f"q{i}" for i in range(7)]
    for i, r in enumerate(got):
        want = llm.answer(videos[i % 3], Q1 if i % 2 else Q2, max_new_tokens=N)
        assert r["response"]["body"]["choices"][0]["message"]["content"] == want
        assert r["response"]["body"]["model"] == str(ckpt)
    assert main(["run-batch", "--model", str(ckpt), "-i", str(tmp_path / "missing.jsonl"), "-o", str(dst)]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_lines_that_break_parsing_fail_alone_numbered_as_in_the_file(files, llm, tmp_path, capsys):
    """Undecodable bytes, JSON nested past Python's recursion limit, a video path too long for
    the OS and a repeated custom_id each fail their own line (they stopped the whole batch, or
    were answered twice); messages count blank lines as the file does."""
    ckpt, videos, _ = files
    good = chat_line("ok", videos[0], Q1).encode()
    data = b"\n".join([
        good, b"", b'{"custom_id": "bad\xff\xfe", "method": "POST"}',
        b"[" * 100_000 + b"]" * 100_000,
        chat_line("long", "/tmp/" + "a" * 300 + ".mp4", Q1).encode(),
        chat_line("ok", videos[1], Q2).encode(),
        b"{not json", chat_line("last", videos[1], Q1).encode()]) + b"\n"
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    assert main(["run-batch", "--model", str(ckpt), "-i", str(src), "-o", str(dst)]) == 0
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(got) == 7 and [r["custom_id"] for r in got] == ["ok", None, None, "long", "ok", None, "last"]
    errors = [(r["error"] or {}).get("message") or r["response"]["body"]["error"]["message"] for r in got[1:6]]
    assert errors[0] == "line 3 is not valid UTF-8"
    assert errors[1].startswith("line 4 is not valid JSON: RecursionError")
    assert "video path cannot be looked up" in errors[2] and "File name too long" in errors[2]
    assert got[4]["error"] == {"code": "duplicate_custom_id",
                               "message": "line 6: custom_id 'ok' is already used by line 1"}
    assert errors[4].startswith("line 7 is not valid JSON")
    assert got[0]["response"]["status_code"] == 200 and got[6]["response"]["status_code"] == 200
    assert "7 requests, 2 answered, 5 failed" in capsys.readouterr().err


def test_run_batch_keeps_its_files_safe(files, tmp_path, capsys):
    """-o naming the input is refused (it emptied the input), and an output file is not
    truncated before the model loads (a bad --model wiped it)."""
    ckpt, videos, _ = files
    src = tmp_path / "in.jsonl"
    src.write_text(chat_line("a", videos[0], Q1) + "\n")
    assert main(["run-batch", "--model", str(ckpt), "-i", str(src), "-o", str(src)]) == 2
    assert "is the input file" in capsys.readouterr().err and src.read_text().startswith('{"custom_id": "a"')
    keep = tmp_path / "keep.jsonl"
    keep.write_text("earlier results\n")
    assert main(["run-batch", "--model", str(tmp_path / "nope"), "-i", str(src), "-o", str(keep)]) == 2
    assert keep.read_text() == "earlier results\n"
    assert main(["run-batch", "--model", str(ckpt), "-i", str(src), "-o", str(tmp_path / "no" / "o.jsonl")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_run_batch_passes_no_warmup(files, tmp_path, monkeypatch):
    import stllm_engine.cli as cli

    seen = {}
    real = cli.load_engine

    def recording(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(cli, "load_engine", recording)
    ckpt, videos, _ = files
    src = tmp_path / "in.jsonl"
    src.write_text(chat_line("a", videos[0], Q1) + "\n")
    assert main(["run-batch", "--model", str(ckpt), "-i", str(src), "-o", str(tmp_path / "o.jsonl"),
                 "--no-warmup"]) == 0
    assert seen["warmup"] is False


def test_run_batch_refuses_a_bad_window(llm):
    with pytest.raises(ValueError, match="window"):
        list(run_batch(llm, io.StringIO(""), window=0))


def test_a_line_with_n_choices(files, llm):
    _, videos, _ = files
    out = list(run_batch(llm, [chat_line("n3", videos[1], Q1, n=3, temperature=0.8, seed=11)], model="tiny"))
    body = out[0]["response"]["body"]
    want = [llm.answer(videos[1], Q1, max_new_tokens=N, temperature=0.8, seed=11 + i) for i in range(3)]
    assert [c["message"]["content"] for c in body["choices"]] == want and out[0]["error"] is None
