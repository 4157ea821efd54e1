"""Token log-probabilities (SamplingParams.logprobs): equal to a log-softmax of the reference
model's raw logits at every step, the same alone or in a batch, and served by /v1/answer, OpenAI
chat completions (plain and streamed) and batch files. Tiny checkpoint, real encoded video."""
from __future__ import annotations

import http.client
import json
import math

import pytest
import torch

from stllm_engine import STLLM, SamplingParams
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.server import ServerThread
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_video

Q = "What happens in the video?"
N = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("logprobs")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=6)
    return ckpt, [str(write_video(d / f"v{i}.mp4", num_frames=12, size=(96, 72), seed=i)) for i in range(2)]


@pytest.fixture(scope="module")
def llm(files):
    return STLLM.from_pretrained(files[0], dtype="float32")


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_equal_the_reference_models_distribution(files, llm, k):
    ckpt, videos = files
    ref = ReferenceSTLLM.from_pretrained(ckpt)
    g = ref.generate_ids(videos[0], Q, max_new_tokens=N, output_scores=True)
    llm.answer(videos[0], Q, max_new_tokens=N, logprobs=k)
    out = llm.last_output
    assert out.token_ids == g.token_ids and len(out.logprobs) == len(out.token_ids)
    want = torch.log_softmax(g.logits, dim=-1)
    for step, (lp, tok) in enumerate(zip(out.logprobs, out.token_ids)):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(want[step, tok].item(), abs=2e-4)
        assert len(lp.top) == k
        if k:
            ids, vals = zip(*lp.top)
            top = torch.topk(want[step], k)
            assert list(vals) == sorted(vals, reverse=True)
            torch.testing.assert_close(torch.tensor(vals), top.values, atol=2e-4, rtol=0)
            assert want[step, list(ids)].sub(top.values).abs().max() < 2e-4  # the same tokens up to ties
            assert all(v <= 0 for v in vals) and sum(math.exp(v) for v in vals) <= 1 + 1e-5


def test_logprobs_alone_equal_in_a_batch(files, llm):
    _, videos = files
    p_lp = SamplingParams(max_new_tokens=N, logprobs=3, temperature=0.7, seed=2)
    alone = llm.generate([(videos[1], Q)], p_lp)[0]
    outs = llm.generate([{"video": videos[0], "question": Q, "params": SamplingParams(max_new_tokens=4)},
                         {"video": videos[1], "question": Q, "params": p_lp},
                         {"video": videos[0], "question": "Which shape?",
                          "params": SamplingParams(max_new_tokens=9, logprobs=0)}])
    assert outs[0].logprobs is None
    assert outs[1].token_ids == alone.token_ids
    for a, b in zip(outs[1].logprobs, alone.logprobs):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert len(outs[2].logprobs) == len(outs[2].token_ids) and all(not x.top for x in outs[2].logprobs)


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True])
def test_bad_logprobs_are_refused(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(logprobs=1, num_beams=2)


def post(server, path: str, body: dict):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body).encode())
    resp = conn.getresponse()
    status, payload = resp.status, resp.read()
    conn.close()
    return status, payload


def test_logprobs_over_http(files, llm):
    ckpt, videos = files
    llm.answer(videos[1], Q, max_new_tokens=N, logprobs=2)
    want = llm.last_output
    ids = [x.token_id for x in want.logprobs]
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[1]}},
                                         {"type": "text", "text": Q}]}]
    with ServerThread(STLLM.from_pretrained(ckpt, dtype="float32")) as server:
        status, payload = post(server, "/v1/answer", {"video": videos[1], "question": Q,
                                                      "params": {"max_new_tokens": N, "logprobs": 2}})
        assert status == 200
        got = json.loads(payload)["logprobs"]
        assert [x["token_id"] for x in got] == ids
        assert [x["logprob"] for x in got] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
        assert [[t["token_id"] for t in x["top_logprobs"]] for x in got] == [[t for t, _ in x.top] for x in want.logprobs]
        body = {"max_tokens": N, "logprobs": True, "top_logprobs": 2, "messages": msgs}
        status, payload = post(server, "/v1/chat/completions", body)
        assert status == 200
        content = json.loads(payload)["choices"][0]["logprobs"]["content"]
        assert [x["logprob"] for x in content] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
        assert all(len(x["top_logprobs"]) == 2 for x in content)
        # a token's bytes are its text's UTF-8 (a byte-fallback token: its one byte, text "" unless ASCII)
        assert all(bytes(x["bytes"]) == x["token"].encode() or (x["token"] == "" and len(x["bytes"]) == 1)
                   for x in content)
        assert [x["token"] for x in content] == [x["token"] for x in got]
        status, payload = post(server, "/v1/chat/completions", dict(body, stream=True))
        chunks = [json.loads(ln[6:]) for ln in payload.decode().split("\n")
                  if ln.startswith("data: {")]
        streamed = [x for c in chunks for x in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
        assert streamed == content  # every token's logprobs, once, in order
        status, payload = post(server, "/v1/chat/completions", dict(body, logprobs=False, top_logprobs=None))
        assert status == 200 and json.loads(payload)["choices"][0]["logprobs"] is None
