"""OpenAI-compatible chat completions on a tiny checkpoint and real mp4 files: answers equal the
Python API's, streams equal the whole answer, multi-turn messages equal a chat session and hit the
prefix cache, stop strings and limits, and every malformed request gets an OpenAI error naming
its problem. Also the stateless ``history`` request option behind it."""
from __future__ import annotations

import base64
import http.client
import json

import pytest

from stllm_engine.answer_request import BadRequest
from stllm_engine.api import STLLM
from stllm_engine.outputs import RequestFailedError
from stllm_engine.openai_api import parse_chat_request, parse_messages
from stllm_engine.server import ServerThread
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.testing.videos import write_video

Q1, Q2, Q3 = "What happens in the video?", "Which shape moves?", "And then?"
MAX_NEW = 8
MODEL = "stllm-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("openai")
    ckpt = write_tiny_checkpoint(d / "ckpt", vit="eva", video_input="all", seed=3)
    videos = [write_video(d / f"v{i}.mp4", num_frames=12, size=(96, 72), seed=i) for i in range(2)]
    return ckpt, videos


@pytest.fixture(scope="module")
def llm(files):
    """A separate engine on the same checkpoint: what the server's answers must equal."""
    return STLLM.from_pretrained(files[0])


@pytest.fixture(scope="module")
def server(files):
    with ServerThread(STLLM.from_pretrained(files[0]), model_name=MODEL) as s:
        yield s


def post(server, path: str, body, method: str = "POST"):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, ctype, payload = resp.status, resp.getheader("Content-Type"), resp.read()
    conn.close()
    return status, ctype, payload


def chat(server, body):
    status, _, payload = post(server, "/v1/chat/completions", body)
    return status, json.loads(payload)


def events(payload: bytes) -> list:
    lines = [ln[len("data: "):] for ln in payload.decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def completion(server, body: dict, stream: bool) -> tuple[str, str]:
    """(content, finish_reason) of a one-choice completion, streamed (the deltas joined) or not."""
    status, _, payload = post(server, "/v1/chat/completions", dict(body, stream=stream))
    assert status == 200, payload
    if stream:
        chunks = events(payload)
        return ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                chunks[-1]["choices"][0]["finish_reason"])
    body = json.loads(payload)
    return body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]


def user(video, text: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                        {"type": "text", "text": text}]}


def test_models_lists_the_served_model(server):
    status, ctype, payload = post(server, "/v1/models", None, "GET")
    body = json.loads(payload)
    assert status == 200 and ctype == "application/json"
    assert [m["id"] for m in body["data"]] == [MODEL] and body["object"] == "list"


@pytest.mark.parametrize("url", ["file", "path"])
def test_completion_equals_the_python_api(server, llm, files, url):
    video = str(files[1][0])
    status, body = chat(server, {"model": MODEL, "max_tokens": MAX_NEW,
                                 "messages": [user("file://" + video if url == "file" else video, Q1)]})
    assert status == 200, body
    want = llm.answer(video, Q1, max_new_tokens=MAX_NEW)
    out = llm.last_output
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": want}
    assert choice["finish_reason"] == out.finish_reason
    usage = body["usage"]
    assert usage["prompt_tokens"] == out.num_prompt_tokens and usage["completion_tokens"] == len(out.token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["timings"]["ttft"] > 0


def test_data_url_video_equals_the_file(server, files):
    video = files[1][1]
    b64 = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    answers = [chat(server, {"max_tokens": MAX_NEW, "messages": [user(v, Q2)]})
               for v in (b64, str(video))]
    assert [s for s, _ in answers] == [200, 200]
    assert answers[0][1]["choices"][0]["message"] == answers[1][1]["choices"][0]["message"]


def test_image_url_is_a_still_image(server, llm, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(64, 80, 3) * 255).astype("uint8"))
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    want = llm.answer(str(tmp_path / "a.png"), Q1, max_new_tokens=MAX_NEW)
    for url in (str(tmp_path / "a.png"), "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()):
        status, body = chat(server, {"max_tokens": MAX_NEW, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q1}]}]})
        assert status == 200 and body["choices"][0]["message"]["content"] == want


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_pieces_join_to_the_answer(server, files, include_usage):
    body = {"max_tokens": MAX_NEW, "messages": [user(str(files[1][0]), Q2)]}
    status, whole = chat(server, body)
    assert status == 200
    so = {"stream_options": {"include_usage": True}} if include_usage else {}
    status, ctype, payload = post(server, "/v1/chat/completions", dict(body, stream=True, **so))
    assert status == 200 and ctype == "text/event-stream"
    chunks = events(payload)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        chunks = chunks[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_multi_turn_messages_equal_a_chat_session_and_hit_the_prefix_cache(server, llm, files):
    video = str(files[1][0])
    session = llm.chat(video)
    a1, a2 = session.ask(Q1, max_new_tokens=MAX_NEW), session.ask(Q2, max_new_tokens=MAX_NEW)
    a3 = session.ask(Q3, max_new_tokens=MAX_NEW)
    msgs = [user(video, Q1)]
    status, b1 = chat(server, {"max_tokens": MAX_NEW, "messages": msgs})
    assert status == 200 and b1["choices"][0]["message"]["content"] == a1
    msgs += [b1["choices"][0]["message"], {"role": "user", "content": Q2}]
    status, b2 = chat(server, {"max_tokens": MAX_NEW, "messages": msgs})
    assert status == 200 and b2["choices"][0]["message"]["content"] == a2
    # the first turn's prompt (video tokens + text) came from the KV prefix cache
    assert b2["usage"]["prompt_tokens_details"]["cached_tokens"] >= b1["usage"]["prompt_tokens"] - 16
    assert b2["usage"]["prompt_tokens"] == session.outputs[1].num_prompt_tokens
    msgs += [b2["choices"][0]["message"], {"role": "user", "content": [{"type": "text", "text": Q3}]}]
    status, b3 = chat(server, {"max_tokens": MAX_NEW, "messages": msgs})
    assert status == 200 and b3["choices"][0]["message"]["content"] == a3
    # the same conversation through /v1/answer's "history"
    status, _, payload = post(server, "/v1/answer", {"video": video, "question": Q3, "history": [[Q1, a1], [Q2, a2]],
                                                      "params": {"max_new_tokens": MAX_NEW}})
    assert status == 200 and json.loads(payload)["text"] == a3
    assert json.loads(payload)["usage"]["cached_prompt_tokens"] >= b2["usage"]["prompt_tokens"] - 16
    status, _, payload = post(server, "/v1/answer", {"video": video, "question": Q3, "history": [[" ", a1]]})
    assert status == 400 and "history[0]'s question must be a non-empty string" in json.loads(payload)["error"]


def test_null_fields_count_as_absent(server, llm, files):
    """OpenAI-client audit: the official client sends null for a parameter passed as None;
    'stream', 'logprobs', 'n', 'presence_penalty' and 'frequency_penalty' set to null got 400."""
    video = str(files[1][0])
    want = llm.answer(video, Q1, max_new_tokens=MAX_NEW)
    nulls = {k: None for k in ("stream", "logprobs", "n", "presence_penalty", "frequency_penalty", "top_logprobs",
                               "stream_options", "user")}
    status, body = chat(server, {"max_tokens": MAX_NEW, "messages": [user(video, Q1)], **nulls})
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert body["usage"]["truncated_prompt_tokens"] == 0  # (the release's left cut, reported)


def test_no_op_fields_and_the_developer_role(server, llm, files):
    """OpenAI-client audit: fields clients send that change nothing here (store false, metadata,
    service_tier, parallel_tool_calls, tool_choice "none") got 400, and so did OpenAI's newer
    'developer' role, which is the system message."""
    video = str(files[1][1])
    want = llm.answer(video, Q1, system="You answer about videos.\n", max_new_tokens=MAX_NEW)
    status, body = chat(server, {"max_tokens": MAX_NEW, "store": False, "metadata": {"run": "7"},
                                 "service_tier": "auto", "parallel_tool_calls": True, "tool_choice": "none",
                                 "messages": [{"role": "developer", "content": "You answer about videos.\n"},
                                              user(video, Q1)]})
    assert status == 200 and body["choices"][0]["message"]["content"] == want


def test_system_message_replaces_the_chat_system(server, llm, files):
    video = str(files[1][1])
    want = llm.answer(video, Q1, system="You answer about videos.\n", max_new_tokens=MAX_NEW)
    status, body = chat(server, {"max_tokens": MAX_NEW, "messages": [
        {"role": "system", "content": "You answer about videos.\n"}, user(video, Q1)]})
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == llm.last_output.num_prompt_tokens


def test_history_option_equals_the_chat_session(llm, files):
    video = str(files[1][1])
    session = llm.chat(video)
    a1, a2 = session.ask(Q2, max_new_tokens=MAX_NEW), session.ask(Q1, max_new_tokens=MAX_NEW)
    assert llm.answer(video, Q1, history=[(Q2, a1)], max_new_tokens=MAX_NEW) == a2
    assert llm.last_output.token_ids == session.outputs[1].token_ids
    for bad, message in (("not a list", "history must be a list"), ([(Q2,)], r"history\[0\] must be")):
        with pytest.raises(RequestFailedError, match=message):
            llm.answer(video, Q1, history=bad)


def test_a_chat_whose_first_question_is_blank_goes_on(llm, files):
    """Edge audit: answer(video, " ") and chat.ask(" ") work (as the release and the reference),
    but the next ask failed with "history[0]'s question is empty". The Python API takes blank
    questions everywhere now; the HTTP endpoints refuse them, in history too."""
    video = str(files[1][1])
    session = llm.chat(video)
    session.ask(" ", max_new_tokens=MAX_NEW)
    second = session.ask(Q1, max_new_tokens=MAX_NEW)
    assert llm.answer(video, Q1, history=session.history[:1], max_new_tokens=MAX_NEW) == second


def test_max_tokens_and_stop(server, llm, files):
    video = str(files[1][0])
    status, body = chat(server, {"max_tokens": 2, "messages": [user(video, Q1)]})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    full = llm.answer(video, Q1, max_new_tokens=MAX_NEW, repetition_penalty=1.0)
    stop = next(ch for ch in full[2:] if ch.isalpha())  # a letter the answer really contains
    want = llm.answer(video, Q1, max_new_tokens=MAX_NEW, repetition_penalty=1.0, stop=["###", stop])
    assert llm.last_output.stop_reason == stop and want == full[:full.index(stop)].strip()
    for stream in (False, True):
        assert completion(server, {"max_tokens": MAX_NEW, "repetition_penalty": 1.0, "stop": stop,
                                   "messages": [user(video, Q1)]}, stream) == (want, "stop")


BAD = [
    ({"messages": []}, 400, "non-empty list"),
    ({"model": "gpt-4o"}, 404, "'gpt-4o' is not served here"),
    ({"n": 17}, 400, "'n' must be an int in 1..16"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"tools": []}, 400, "unsupported request fields ['tools']"),
    ({"store": True}, 400, "'store' may only be false here"),
    ({"tool_choice": "auto"}, 400, "'tool_choice' may only be \"none\" here"),
    ({"temperature": -1}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_new_tokens"),
    ({"stop": [""]}, 400, "'stop'"),
    ({"stream_options": {"x": 1}}, 400, "stream_options"),
    ({"top_logprobs": 2}, 400, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 30}, 400, "SamplingParams.logprobs must be"),
    ({"logprobs": 1}, 400, "'logprobs' must be true or false"),
    ({"keep_ratio": 0}, 400, "keep_ratio"),
    ({"guided_choice": []}, 400, "choices must be a non-empty list"),
    ({"guided_choice": ["a"], "ignore_eos": True}, 400, "cannot be combined with ignore_eos"),
    ({"logit_bias": {"a": 1}}, 400, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 1000}}, 400, "[-100, 100]"),
    ({"allowed_token_ids": [10 ** 6]}, 400, "token id 1000000 is outside the vocabulary"),
    ({"priority": "high"}, 400, "priority must be an int"),
]


@pytest.mark.parametrize("change,status,message", BAD)
def test_bad_requests_get_openai_errors(server, files, change, status, message):
    body = dict({"max_tokens": 4, "messages": [user(str(files[1][0]), Q1)]}, **change)
    got, resp = chat(server, body)
    assert got == status, resp
    err = resp["error"]
    assert message in err["message"] and err["code"] == status
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_wrong_method_and_bad_json_get_openai_errors(server):
    status, _, payload = post(server, "/v1/chat/completions", None, "GET")
    assert status == 405 and "accepts POST" in json.loads(payload)["error"]["message"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{not json")
    resp = conn.getresponse()
    assert resp.status == 400 and "not valid JSON" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_server_still_answers_after_bad_requests(server, files):
    bad, _ = chat(server, {"messages": [user("/no/such/clip.mp4", Q1)]})
    good, body = chat(server, {"max_tokens": 3, "messages": [user(str(files[1][0]), Q1)]})
    assert bad == 400 and good == 200 and body["usage"]["completion_tokens"] >= 1


V = "/tmp/x.mp4"
MESSAGE_ERRORS = [
    ([{"role": "user", "content": Q1}], "exactly one video"),
    ([user(V, Q1), user(V, Q2)], "alternate"),
    ([user(V, Q1), {"role": "assistant", "content": "a"}], "last message must be the user's question"),
    ([{"role": "user", "content": Q1}, {"role": "assistant", "content": "a"}, user(V, Q2)],
     "first user message"),
    ([user(V, Q1), {"role": "system", "content": "s"}, {"role": "user", "content": Q2}], "may only come first"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([user(V, "  ")], "no text"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "content[0] must be a text part"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://x.org/a.mp4"}},
                                   {"type": "text", "text": Q1}]}], "URL"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4,abc"}},
                                   {"type": "text", "text": Q1}]}], "base64"),
    ([user(V, Q1) | {"content": [{"type": "video_url", "video_url": {"url": V}}] * 2 + [
        {"type": "text", "text": Q1}]}], "for a still image), got 2"),
]


@pytest.mark.parametrize("messages,message", MESSAGE_ERRORS)
def test_parse_messages_names_the_problem(tmp_path, messages, message):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\0")  # the parser checks that the file exists, not that it decodes
    messages = json.loads(json.dumps(messages).replace(V, str(path)))
    with pytest.raises(BadRequest) as e:
        parse_messages(messages)
    assert message in str(e.value)


@pytest.mark.parametrize("as_url", [lambda p: p.as_uri(), lambda p: "file://localhost" + p.as_uri()[7:]])
def test_file_urls_are_percent_decoded(tmp_path, as_url):
    path = tmp_path / "a clip ü.mp4"
    path.write_bytes(b"\0")
    video, _, _, _ = parse_messages([user(as_url(path), Q1)])
    assert video == str(path)
    with pytest.raises(BadRequest, match="must name a local file"):
        parse_messages([user("file://otherhost" + path.as_uri()[7:], Q1)])


def test_parse_maps_openai_fields_to_sampling_params(llm, tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\0")
    body = {"messages": [{"role": "system", "content": "S"}, user(f"file://{path}", Q1),
                         {"role": "assistant", "content": "A1"}, {"role": "user", "content": Q2}],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 11,
            "min_tokens": 2, "stop": ["END"], "num_frames": 4, "presence_penalty": 0, "user": "u1", "priority": -3}
    chat = parse_chat_request(llm, body, MODEL)
    video, question, params, options = chat.video, chat.question, chat.params, chat.options
    assert video == str(path) and question == Q2 and not chat.stream and not chat.include_usage and chat.n == 1
    assert options == {"num_frames": 4, "priority": -3, "history": [(Q1, "A1")], "system": "S"}
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.seed,
            params.min_new_tokens, params.stop) == (7, 0.5, 0.9, 4, 11, 2, ["###", "END"])
    defaults = parse_chat_request(llm, {"messages": [user(str(path), Q1)]}, MODEL).params
    assert defaults == llm.params()  # fields left out keep the release chat's settings


def test_concurrent_mixed_requests_each_get_their_own_answer(server, llm, files):
    """Eight chat completions at once - two videos, greedy and seeded sampling, streamed or not,
    a corrupt-free bad one - are batched by the engine; each equals the answer it gets alone."""
    import threading

    v0, v1 = (str(v) for v in files[1])
    jobs = [(v0, Q1, {}, False), (v1, Q2, {"temperature": 0.9, "seed": 5}, True), (v1, Q1, {"max_tokens": 3}, False),
            (v0, Q2, {"top_k": 3, "temperature": 1.0, "seed": 1}, False), ("/no/such.mp4", Q1, {}, False),
            (v0, Q3, {"stop": ["e"]}, True), (v1, Q3, {}, True), (v0, Q1, {"repetition_penalty": 1.0}, False)]
    want = []
    for video, q, extra, _ in jobs:
        kw = {"max_new_tokens": extra.get("max_tokens", MAX_NEW), **{k: v for k, v in extra.items() if k != "max_tokens"}}
        if "stop" in kw:
            kw["stop"] = ["###"] + kw["stop"]
        try:
            want.append(llm.answer(video, q, **kw))
        except Exception as e:  # noqa: BLE001 - the bad one
            want.append(type(e).__name__)
    got = [None] * len(jobs)

    def run(i):
        video, q, extra, stream = jobs[i]
        body = dict({"max_tokens": MAX_NEW, "messages": [user(video, q)], "stream": stream}, **extra)
        status, _, payload = post(server, "/v1/chat/completions", body)
        if status != 200:
            got[i] = status
        elif stream:
            got[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in events(payload) if c["choices"])
        else:
            got[i] = json.loads(payload)["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got[4] == 400 and want[4] in ("VideoNotFoundError", "RequestFailedError")
    assert got[:4] + got[5:] == want[:4] + want[5:]


def test_n_choices_sample_with_consecutive_seeds_and_share_the_prompt(server, llm, files):
    video = str(files[1][1])
    q = "Describe the clip in a few words."
    want = [llm.answer(video, q, max_new_tokens=MAX_NEW, temperature=0.9, seed=7 + i) for i in range(3)]
    outs = []
    status, _, payload = post(server, "/health", None, "GET")
    hits = json.loads(payload)["stats"]["kv"]["prefix_hit_tokens"]
    status, body = chat(server, {"max_tokens": MAX_NEW, "temperature": 0.9, "seed": 7, "n": 3,
                                 "logprobs": True, "messages": [user(video, q)]})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == want
    assert all(len(c["logprobs"]["content"]) >= 1 for c in body["choices"])
    outs = [len(c["logprobs"]["content"]) for c in body["choices"]]
    assert body["usage"]["completion_tokens"] == sum(outs)
    _, _, payload = post(server, "/health", None, "GET")
    # choices 1 and 2 started after choice 0's prefill: its prompt blocks came from the prefix cache
    assert json.loads(payload)["stats"]["kv"]["prefix_hit_tokens"] - hits >= body["usage"]["prompt_tokens"]
    status, _, payload = post(server, "/v1/chat/completions", {
        "max_tokens": MAX_NEW, "temperature": 0.9, "seed": 7, "n": 3, "logprobs": True, "stream": True,
        "stream_options": {"include_usage": True}, "messages": [user(video, q)]})
    assert status == 200
    chunks = events(payload)
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == sum(outs)
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == want[i]
        assert [c["finish_reason"] for c in mine].count(None) == len(mine) - 1 and mine[-1]["finish_reason"]
        assert sum(len((c["logprobs"] or {}).get("content") or []) for c in mine) == outs[i]
    status, body = chat(server, {"max_tokens": MAX_NEW, "n": 2, "messages": [user(video, q)]})
    assert status == 200 and body["choices"][0]["message"] == body["choices"][1]["message"]  # greedy
    status, body = chat(server, {"max_tokens": MAX_NEW, "n": 2, "messages": [user(str(files[0]) + "/x.mp4", q)]})
    assert status == 400 and "not found" in body["error"]["message"]


def test_guided_choice_logit_bias_and_allowed_ids_equal_the_python_api(server, llm, files):
    video = str(files[1][0])
    choices = ["a red square", "a blue circle", "nothing"]
    want = llm.answer(video, Q2, choices=choices, max_new_tokens=MAX_NEW)
    assert want in choices
    for stream in (False, True):
        assert completion(server, {"guided_choice": choices, "max_tokens": MAX_NEW, "messages": [user(video, Q2)]},
                          stream) == (want, "stop")
    free = llm.answer(video, Q1, max_new_tokens=4)
    first = llm.last_output.token_ids[0]
    biased = llm.answer(video, Q1, max_new_tokens=4, logit_bias={first: -100})
    assert llm.last_output.token_ids[0] != first and biased != free
    status, body = chat(server, {"logit_bias": {str(first): -100}, "max_tokens": 4, "messages": [user(video, Q1)]})
    assert status == 200 and body["choices"][0]["message"]["content"] == biased
    allowed = sorted({first, *llm.last_output.token_ids})
    only = llm.answer(video, Q1, max_new_tokens=4, allowed_token_ids=allowed)
    status, body = chat(server, {"allowed_token_ids": allowed, "max_tokens": 4, "messages": [user(video, Q1)]})
    assert status == 200 and body["choices"][0]["message"]["content"] == only
