"""The ``POST /v1/answer`` request body: its fields, their checks, and the error a bad one gets."""
from __future__ import annotations

import base64
import binascii

from stllm_engine.api import STLLM
from stllm_engine.outputs import MODEL_FAILURE, RequestOutput

REQUEST_OPTIONS = ("system", "history", "num_frames", "keep_ratio", "keep_mode", "keep_seed", "sampling",
                   "priority")
ANSWER_KEYS = {"video", "video_b64", "question", "params", "stream", "progress", *REQUEST_OPTIONS}


class BadRequest(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_status(out: RequestOutput) -> int:
    """HTTP status of a failed request: 500 when a model step failed under it (or it failed after
    generating), else 400 (its input was bad)."""
    return 500 if out.error.startswith(MODEL_FAILURE) or out.token_ids else 400


def sampling_params(llm: STLLM, raw: dict, what: str = "params"):
    """``llm.params(**raw)``, or a 400 naming the bad field."""
    try:
        return llm.params(**raw)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad {what}: {e}") from None


def flag(body: dict, name: str) -> bool:
    """The boolean field ``name`` (False when absent), or a 400."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false")
    return value


def parse_answer_request(llm: STLLM, body: dict) -> tuple:
    """Validate a /v1/answer body -> (video, question, SamplingParams, options, stream, progress)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - ANSWER_KEYS)
    if unknown:
        raise BadRequest(f"unknown request fields {unknown}; expected some of {sorted(ANSWER_KEYS)}")
    if ("video" in body) == ("video_b64" in body):
        raise BadRequest("give exactly one of 'video' (a path) or 'video_b64' (base64 bytes)")
    if "video" in body:
        video = body["video"]
        if not isinstance(video, str) or not video:
            raise BadRequest("'video' must be a non-empty path string")
        from stllm_engine.video.sources import path_problem

        problem = path_problem(video)
        if problem:
            raise BadRequest(problem)
    else:
        if not isinstance(body["video_b64"], str):
            raise BadRequest("'video_b64' must be a base64 string")
        try:
            video = base64.b64decode(body["video_b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"'video_b64' is not valid base64: {e}") from None
        if not video:
            raise BadRequest("'video_b64' decodes to no bytes")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("'question' must be a non-empty string")
    raw = body.get("params", {})
    if not isinstance(raw, dict):
        raise BadRequest("'params' must be a JSON object of generation parameters")
    params = sampling_params(llm, raw)
    stream = flag(body, "stream")
    if stream and params.num_beams > 1:
        raise BadRequest("'stream' does not support beam search (params.num_beams > 1)")
    progress = flag(body, "progress")
    if progress and not stream:
        raise BadRequest("'progress' events need 'stream': true")
    options = {k: body[k] for k in REQUEST_OPTIONS if k in body}
    for i, turn in enumerate(options.get("history") or ()):  # (the shape is checked with the request)
        if isinstance(turn, list) and turn and isinstance(turn[0], str) and not turn[0].strip():
            raise BadRequest(f"history[{i}]'s question must be a non-empty string, as 'question' must")
    return video, question, params, options, stream, progress
