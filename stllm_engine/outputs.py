"""What the engine returns per request: text, ids, why it ended, timings, errors."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Prefix of the error a request gets when a model step failed under it (not the request's fault:
# the server answers 500, not 400).
MODEL_FAILURE = "model step failed"


class ModelStepError(RuntimeError):
    """A model step failed under a request: its message (the request's ``error``) starts with
    ``MODEL_FAILURE`` and names the underlying exception, its ``__cause__``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{MODEL_FAILURE}: {type(cause).__name__}: {cause}")
        self.__cause__ = cause


def error_text(e: BaseException) -> str:
    """A failed request's ``error``: the message of a bad input (ValueError / TypeError) or of a
    :class:`ModelStepError` as is, else prefixed with the exception's type."""
    return str(e) if isinstance(e, (ValueError, TypeError, ModelStepError)) else f"{type(e).__name__}: {e}"


@dataclass
class RequestTimings:
    """Seconds spent per stage of one request (0 when a stage did not run, e.g. a cache hit).

    frame_decode: reading + preprocessing frames; vision: ViT (+BT-Adapter) + ln_vision;
    qformer: Q-Former + projection (``encode_video``); prefill: engine steps that computed this
    request's prompt; ttft: arrival to first token; decode: first token to finish;
    vision_cache_hit: the ViT was skipped (features cached); video_tokens_cache_hit: the Q-Former
    too (this question's video tokens cached).
    """

    frame_decode: float = 0.0
    vision: float = 0.0
    qformer: float = 0.0
    prefill: float = 0.0
    ttft: float = 0.0
    decode: float = 0.0
    total: float = 0.0
    vision_cache_hit: bool = False
    video_tokens_cache_hit: bool = False
    num_decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decode_tokens / self.decode if self.decode > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class Logprob:
    """A generated token's log-probability and the ``SamplingParams.logprobs`` most likely tokens
    at its step, as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """State of one request after an engine step (``finished`` once it ended).

    text: the answer so far (stop strings excluded); delta: text new since the previous output of
    this request; token_ids: generated ids (a matched stop sequence / EOS included, as
    ``generate`` returns them); finish_reason: "stop" | "length" | "abort" | "error"; stop_reason:
    the stop string that ended it (None when EOS, a stop id sequence or a limit ended it);
    num_truncated_prompt_tokens: prompt positions (video tokens first) cut from the left to keep
    prompt + max_new_tokens within max_length, as the release cuts (0: none);
    logprobs: one :class:`Logprob` per generated token when ``SamplingParams.logprobs`` is set;
    error: message when the request failed (then text is empty); exception: the exception behind
    it, where the request failed in this process (not compared, not printed).
    """

    request_id: str
    text: str = ""
    delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | None = None
    logprobs: list[Logprob] | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    num_truncated_prompt_tokens: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


class RequestFailedError(RuntimeError):
    """What the synchronous API (``STLLM.answer`` / ``stream`` / ``chat``) raises for a failed
    request: the message names the request and the problem, ``output`` is its
    :class:`RequestOutput`, and ``__cause__`` is the original exception where there is one (e.g. a
    :class:`~stllm_engine.video.errors.VideoNotFoundError`, or a ``ValueError`` for a prompt longer
    than the context), so callers can tell bad input from a model failure."""

    def __init__(self, output: RequestOutput) -> None:
        super().__init__(f"request {output.request_id} failed: {output.error}")
        self.output = output
        self.__cause__ = output.exception
