"""Per-request bookkeeping of LLMEngine, and the release's left truncation of long prompts."""
from __future__ import annotations

import json

from stllm_engine.engine.beam_search import BeamGroup
from stllm_engine.engine.sampler import StopChecker
from stllm_engine.engine.sequence import Sequence
from stllm_engine.outputs import RequestTimings
from stllm_engine.sampling_params import SamplingParams


def truncate_left(tokens, key: str, ids: list[int], video_start: int, over: int):
    """Cut ``over`` positions from the left of [ids[:video_start] | tokens | ids[video_start:]] as
    the release cuts its input embeddings; -> (tokens | None, key, ids, video_start)."""
    lv = 0 if tokens is None else int(tokens.shape[0])
    cut_t = min(over, video_start)
    cut_v = min(over - cut_t, lv)
    cut_a = over - cut_t - cut_v
    ids = ids[cut_t:video_start] + ids[video_start + cut_a:]
    if cut_v:
        tokens = tokens[cut_v:] if lv > cut_v else None
        key = json.dumps(["cut", key, cut_v], ensure_ascii=False)  # (not a string a question could spell)
    return tokens, key, ids, video_start - cut_t


class Request:
    def __init__(self, request_id: str, params: SamplingParams, arrival: float) -> None:
        self.request_id = request_id
        self.params = params
        self.arrival = arrival
        self.timings = RequestTimings()
        self.seq: Sequence | None = None
        self.beams: BeamGroup | None = None
        self.checker: StopChecker | None = None
        self.first_token_at: float | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None  # behind ``error``
        self.num_truncated = 0  # prompt positions cut from the left (max_length)
        self.finish_reason: str | None = None
        self.counted = False  # its final output went into the engine's metrics
        self.logprobs: list | None = None  # Logprob per generated token, when params.logprobs is set
        self.token_ids: list[int] = []
        self.final_text: str | None = None  # beam search: text of the best hypothesis
        self.guide = None  # guided.ChoiceGuide of params.choices, given to its sequences
        self.priority = 0  # scheduling priority (lower first), given to its sequences
