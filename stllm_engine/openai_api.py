"""OpenAI-compatible chat completions: the ``POST /v1/chat/completions`` body and its answers.

An application written against OpenAI's (or vLLM's) chat API talks to the engine unchanged: the
video is a ``video_url`` content part of the first user message (``file:///abs/clip.mp4``, a plain
local path, or ``data:video/mp4;base64,...``; nothing is downloaded, so http(s) URLs are refused),
earlier user / assistant messages are the conversation's history (see
:meth:`LLMEngine.add_request`: the video tokens come from the first question, and a follow-up
reuses the previous turn's KV blocks from the prefix cache), and a ``system`` message replaces the
release's chat system text (``""`` is the release's ``system=False``). An ``image_url`` part
(a still image: path, ``file://`` or ``data:image/png;base64,...``) takes the video's place, as
:meth:`STLLM.answer` takes an image.

Generation fields: ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop`` (added to the release's "###", which ends an assistant turn), ``logit_bias``, ``n`` (up to
16 choices, streamed chunks carry their ``index``; choice i samples with seed + i, and choices
after the first take the prompt's KV from the prefix cache),
``logprobs`` / ``top_logprobs`` (0-20; every generated token, of the model's own distribution
before penalties, see ``SamplingParams.logprobs``), ``stream`` and ``stream_options.include_usage``; vLLM's extensions ``top_k``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos``, ``allowed_token_ids``, ``guided_choice`` (the answer is
exactly one of these strings); vLLM's ``priority`` (lower first); and this engine's ``num_frames``, ``keep_ratio``,
``keep_mode``, ``keep_seed``, ``sampling``. Fields left out keep the release chat's settings
(greedy, repetition penalty 1.5, 300 new tokens), not OpenAI's (temperature 1): the model was
tuned and evaluated that way. ``presence_penalty`` / ``frequency_penalty`` other than 0,
tools and other unsupported fields get a 400 that names them.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, replace

from stllm_engine.answer_request import BadRequest, flag, sampling_params
from stllm_engine.answer_text import token_text
from stllm_engine.api import STLLM
from stllm_engine.outputs import RequestOutput
from stllm_engine.prompts import SEP, release_answer
from stllm_engine.sampling_params import SamplingParams

OPTION_FIELDS = ("num_frames", "keep_ratio", "keep_mode", "keep_seed", "sampling", "priority")
PARAM_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                "min_tokens": "min_new_tokens", "repetition_penalty": "repetition_penalty",
                "ignore_eos": "ignore_eos", "logit_bias": "logit_bias", "allowed_token_ids": "allowed_token_ids",
                "guided_choice": "choices"}
ZERO_FIELDS = ("presence_penalty", "frequency_penalty")  # accepted when 0 (what clients send)
OTHER_FIELDS = {"model", "messages", "stop", "n", "stream", "stream_options", "user", "logprobs", "top_logprobs"}
# fields clients send that change nothing here, accepted with these values (vLLM ignores them):
# a request not stored, its labels, any service tier, and no tool use
NO_OP_FIELDS = {"store": (False,), "metadata": None, "service_tier": None, "parallel_tool_calls": None,
                "tool_choice": ("none",)}
CHAT_KEYS = set(PARAM_FIELDS) | set(ZERO_FIELDS) | OTHER_FIELDS | set(OPTION_FIELDS) | set(NO_OP_FIELDS)
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
MAX_CHOICES = 16  # n
NATIVE_PATHS = ("/v1/answer",)  # the server's own endpoints under /v1 (their own error shape)


def error_body(message: str, status: int) -> dict:
    """OpenAI's error object."""
    kind = ("not_found_error" if status == 404 else "server_error" if status >= 500
            else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_json(path: str, message: str, status: int) -> dict:
    """The error body of an endpoint: OpenAI's error object on the OpenAI paths, else the
    server's own ``{"error": message}``."""
    openai = path.startswith("/v1/") and not path.startswith(NATIVE_PATHS)  # (unknown /v1 paths too)
    return error_body(message, status) if openai else {"error": message}


def models_json(model: str) -> dict:
    """``GET /v1/models``: the one model this server runs."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "stllm-engine"}]}


def _video(url) -> str | bytes:
    if not isinstance(url, str) or not url:
        raise BadRequest("video_url.url must be a non-empty string")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest("a data: URL must be base64 ('data:video/mp4;base64,...')")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"the data: URL is not valid base64: {e}") from None
        if not raw:
            raise BadRequest("the data: URL decodes to no bytes")
        return raw
    path = url
    if url.startswith("file:"):  # file:///abs/p%20q.mp4 (Path.as_uri()) or file://localhost/...
        from urllib.parse import unquote, urlparse

        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise BadRequest(f"a file: URL must name a local file (file:///abs/path), got host {parsed.netloc!r}")
        path = unquote(parsed.path)
    from stllm_engine.video.sources import path_problem

    problem = path_problem(path)
    if problem:
        raise BadRequest(problem)
    return path


def _content(i: int, msg: dict, videos: list) -> str:
    """The text of message ``i``; its video parts (user messages only) go to ``videos``."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise BadRequest(f"messages[{i}].content must be a string or a non-empty list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("video_url", "image_url") and msg["role"] == "user":
            ref = part.get(kind)
            videos.append((i, _video(ref.get("url") if isinstance(ref, dict) else ref)))
        else:
            raise BadRequest(f"messages[{i}].content[{j}] must be a text part or (in a user message) a "
                             f"video_url / image_url part, got {str(part)[:80]}")
    return "\n".join(texts)


def parse_messages(messages) -> tuple:
    """``messages`` -> (video, question, history, system): an optional system message first, then
    user and assistant messages alternating, ending with a user message; one video, in the first
    user message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} messages")
    system, turns, videos = None, [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with role 'system' (or 'developer'), 'user' "
                             "or 'assistant'")
        text = _content(i, msg, videos)
        role = "system" if msg["role"] == "developer" else msg["role"]  # (OpenAI's newer name for it)
        if role == "system":
            if i:
                raise BadRequest(f"messages[{i}]: a system message may only come first")
            system = text
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise BadRequest(f"messages[{i}] has role {role!r} where {want!r} was expected: user and "
                             "assistant messages alternate, starting and ending with user")
        if role == "user" and not text.strip():
            raise BadRequest(f"messages[{i}] (user) has no text: the question is missing")
        turns.append(text)
    if len(turns) % 2 == 0:
        raise BadRequest("the last message must be the user's question")
    first_user = 1 if system is not None else 0
    if len(videos) != 1:
        raise BadRequest("the conversation must carry exactly one video (a video_url part, or an image_url "
                         f"part for a still image), got {len(videos)}")
    if videos[0][0] != first_user:
        raise BadRequest("the video must be in the first user message: ST-LLM puts it before the "
                         "first question")
    history = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    return videos[0][1], turns[-1], history, system


@dataclass
class ChatRequest:
    """A validated chat-completions body; ``options`` go to ``add_request`` (history, system,
    video options)."""

    video: str | bytes
    question: str
    params: SamplingParams
    options: dict
    stream: bool = False
    include_usage: bool = False
    n: int = 1

    def choice_params(self) -> list[SamplingParams]:
        """SamplingParams of each of the ``n`` choices: choice i samples with seed + i (each its
        own fresh seed when none is set); greedy choices are all the same answer."""
        seed = self.params.seed
        return [self.params] + [replace(self.params, seed=None if seed is None else seed + i)
                                for i in range(1, self.n)]


def parse_chat_request(llm: STLLM, body, model: str) -> ChatRequest:
    """Validate a chat-completions body (400 / 404 :class:`BadRequest` naming the problem)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI's nullable fields: null = absent
    unknown = sorted(set(body) - CHAT_KEYS)
    if unknown:
        raise BadRequest(f"unsupported request fields {unknown}; this server accepts {sorted(CHAT_KEYS)}")
    for k, allowed in NO_OP_FIELDS.items():
        if k in body and allowed is not None and body[k] not in allowed:
            raise BadRequest(f"'{k}' may only be {' or '.join(json.dumps(a) for a in allowed)} here "
                             f"(got {json.dumps(body[k])}): this server stores no request and calls no tools")
    if "model" in body and body["model"] != model:
        raise BadRequest(f"model {body['model']!r} is not served here; this server serves {model!r}", 404)
    for k in ZERO_FIELDS:
        if body.get(k, 0) != 0:
            raise BadRequest(f"'{k}' is not supported (use 'repetition_penalty')")
    logprobs = flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be an int in 1..{MAX_CHOICES}, got {n!r}")
    video, question, history, system = parse_messages(body.get("messages"))
    raw = {PARAM_FIELDS[k]: v for k, v in body.items() if k in PARAM_FIELDS and v is not None}
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise BadRequest("give one of 'max_tokens' and 'max_completion_tokens'")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a non-empty string or a list of them")
        raw["stop"] = [SEP] + [s for s in stop if s != SEP]
    if logprobs:
        raw["logprobs"] = 0 if top is None else top
    params = sampling_params(llm, raw, "generation parameters")
    stream = flag(body, "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False), bool):
        raise BadRequest("'stream_options' may only hold 'include_usage': true or false")
    options = {k: body[k] for k in OPTION_FIELDS if k in body}
    options["history"] = history
    if system is not None:
        options["system"] = system
    return ChatRequest(video, question, params, options, stream, bool(so.get("include_usage", False)), n)


class ChatFormat:
    """The bodies and stream events of one chat completion (the server's answer loop calls these)."""

    def __init__(self, llm: STLLM, model: str, include_usage: bool = False) -> None:
        self.llm, self.model, self.include_usage = llm, model, include_usage
        self.sent_logprobs: dict[int, int] = {}  # per choice: tokens whose logprobs went out in chunks
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, out: RequestOutput) -> dict:
        n, m = out.num_prompt_tokens, len(out.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
                "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
                # (not OpenAI's: positions the release's left cut dropped, video tokens first)
                "truncated_prompt_tokens": out.num_truncated_prompt_tokens}

    def _logprobs(self, logprobs) -> dict | None:
        """OpenAI's ``choices[].logprobs`` of these ``Logprob``s."""
        if logprobs is None:
            return None

        def one(tid: int, lp: float) -> dict:
            text, raw = token_text(self.llm.tokenizer, tid)
            return {"token": text, "logprob": lp, "bytes": raw}
        return {"content": [dict(one(x.token_id, x.logprob), top_logprobs=[one(t, v) for t, v in x.top])
                            for x in logprobs]}

    def _chunk(self, delta: dict, finish_reason=None, out: RequestOutput | None = None, index: int = 0) -> dict:
        lp = None
        if out is not None and out.logprobs is not None:  # the tokens generated since the last chunk
            lp = self._logprobs(out.logprobs[self.sent_logprobs.get(index, 0):])
            self.sent_logprobs[index] = len(out.logprobs)
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}

    def _usage_of(self, outs: list[RequestOutput]) -> dict:
        """The prompt counted once (choice 0's, as OpenAI bills it), every choice's completion."""
        usage = self._usage(outs[0])
        usage["completion_tokens"] = sum(len(o.token_ids) for o in outs)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    def result(self, out: RequestOutput) -> dict:
        """The non-streamed answer; ``timings`` is this engine's extension."""
        return self.results([out])

    def results(self, outs: list[RequestOutput]) -> dict:
        """The non-streamed answer of ``n`` choices (usage: :meth:`_usage_of`; timings of choice 0)."""
        choices = [{"index": i, "message": {"role": "assistant",
                                            "content": release_answer(self.llm.tokenizer, o.token_ids, o.stop_reason)},
                    "logprobs": self._logprobs(o.logprobs),
                    "finish_reason": FINISH_REASONS.get(o.finish_reason, o.finish_reason)} for i, o in enumerate(outs)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage_of(outs), "timings": outs[0].timings.as_dict()}

    def start(self, n: int = 1) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, index=i) for i in range(n)]

    def piece(self, text: str, out: RequestOutput, index: int = 0) -> dict:
        return self._chunk({"content": text}, out=out, index=index)

    def finish(self, out: RequestOutput, index: int = 0) -> dict:
        """The chunk that ends choice ``index`` (its finish reason, its last logprobs)."""
        return self._chunk({}, FINISH_REASONS.get(out.finish_reason, out.finish_reason), out, index)

    def close(self, outs: list[RequestOutput]) -> list[dict]:
        """After every choice finished: the usage chunk, when ``stream_options.include_usage``."""
        if not self.include_usage:
            return []
        return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [], "usage": self._usage_of(outs), "timings": outs[0].timings.as_dict()}]

    def error(self, message: str) -> dict:
        return error_body(message, 500)
