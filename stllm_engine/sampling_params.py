"""Per-request generation parameters, checked in ``__post_init__``.

Defaults follow the release's chat on the instruction-aware path: greedy, repetition penalty 1.5,
stop on "###", 300 new tokens at most. ``penalize_prompt`` chooses which tokens the repetition
penalty sees: the release calls ``generate(inputs_embeds=...)`` without ``input_ids``, so
``transformers`` penalises only generated tokens (False, the default); True also penalises the
prompt's text tokens (video positions have no ids and are never penalised). Likewise the release's
``min_length=1`` becomes 0 once ``transformers`` subtracts the embeddings' length, hence
``min_new_tokens=0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_CHOICES = 1024


@dataclass
class SamplingParams:
    """How to generate one answer.

    temperature: 0 means greedy; top_p in (0, 1]; top_k 0 means off; repetition_penalty > 0 (1 is
    off); stop: strings that end the answer (checked on the detokenized text, excluded from it);
    stop_token_ids: token-id sequences that end the answer (the release's "###" criterion);
    num_beams > 1 runs beam search (greedy only) scored with ``length_penalty``; logprobs: None,
    or return each generated token's log-probability with that many most likely alternatives
    (0-20) - of the model's own distribution, before penalties and temperature (as vLLM returns
    them by default). Constraints (``engine/guided.py``): logit_bias: {token id: bias in
    [-100, 100]} added to the logits before the repetition penalty (OpenAI's; string keys from JSON
    accepted); allowed_token_ids: only these tokens may be generated (EOS too only if listed);
    choices: the answer is exactly one of these strings (vLLM's guided_choice), then EOS ends it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.5
    min_new_tokens: int = 0
    max_new_tokens: int = 300
    stop: list[str] = field(default_factory=lambda: ["###"])
    stop_token_ids: list[list[int]] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    penalize_prompt: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    choices: list[str] | None = None

    def __post_init__(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"SamplingParams.{name} must be a finite number, got {v!r}")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"SamplingParams.{name} must be an int, got {v!r}")
            return v

        if num("temperature") < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < num("top_p") <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if integer("top_k") < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if num("repetition_penalty") <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if integer("min_new_tokens") < 0:
            raise ValueError(f"SamplingParams.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if integer("max_new_tokens") < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"SamplingParams.min_new_tokens ({self.min_new_tokens}) > "
                             f"max_new_tokens ({self.max_new_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and s and all(isinstance(t, int) and t >= 0 for t in s) for s in ids):
            raise ValueError("SamplingParams.stop_token_ids must be a list of non-empty lists of "
                             f"non-negative token ids, got {ids!r}")
        self.stop_token_ids = [list(s) for s in ids]
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):
            raise ValueError(f"SamplingParams.seed must be an int in [-2**63, 2**64) (a 64-bit seed) or None, "
                             f"got {self.seed!r}")
        if integer("num_beams") < 1:
            raise ValueError(f"SamplingParams.num_beams must be >= 1, got {self.num_beams}")
        num("length_penalty")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("SamplingParams: beam search (num_beams > 1) with sampling (temperature > 0) "
                             "is not supported; set temperature=0")
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
                raise ValueError(f"SamplingParams.logprobs must be None or an int in 0..20, got {self.logprobs!r}")
            if self.num_beams > 1:
                raise ValueError("SamplingParams: logprobs are not returned for beam search (num_beams > 1)")
        self._check_constraints()
        for name in ("ignore_eos", "penalize_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")

    def _check_constraints(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"SamplingParams.logit_bias must be a dict {{token id: bias}}, got {self.logit_bias!r}")
            bias = {}
            for k, v in self.logit_bias.items():
                t = int(k) if isinstance(k, str) and k.isdigit() else k
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"SamplingParams.logit_bias keys must be token ids (ints >= 0), got {k!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise ValueError(f"SamplingParams.logit_bias[{k!r}] must be a number in [-100, 100], got {v!r}")
                bias[t] = float(v)
            self.logit_bias = bias or None
        ids = self.allowed_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError("SamplingParams.allowed_token_ids must be a non-empty list of token ids "
                                 f"(ints >= 0), got {ids!r}")
            self.allowed_token_ids = sorted(set(ids))
        if self.choices is not None:
            c = self.choices
            if isinstance(c, str) or not isinstance(c, (list, tuple)) or not c or not all(
                    isinstance(x, str) and x.strip() for x in c):
                raise ValueError(f"SamplingParams.choices must be a non-empty list of non-blank strings, got {c!r}")
            if len(c) > MAX_CHOICES:
                raise ValueError(f"SamplingParams.choices: at most {MAX_CHOICES} choices, got {len(c)}")
            self.choices = list(c)
            for name, bad in (("allowed_token_ids", ids is not None), ("ignore_eos", self.ignore_eos is True),
                              ("min_new_tokens > 1", self.min_new_tokens > 1)):
                if bad:
                    raise ValueError(f"SamplingParams: choices cannot be combined with {name} (a complete "
                                     "choice ends the answer with EOS)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def stop_at(text: str, prev: int, stops) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop-string occurrence in ``text`` that ends after
    its first ``prev`` characters (the text checked before), None if none: an occurrence seen
    before ``min_new_tokens`` was reached, or one a longer stop string's look-back reaches, does
    not end the answer later (it did when a 10-character stop was also given)."""
    prev = min(prev, len(text))
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, prev - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def newest_stop(decode, ids: list[int], stops) -> tuple[int, str] | None:
    """:func:`stop_at` of ``decode(ids)`` counting only an occurrence the last id completes
    (``decode``: ids -> text; the text of ``ids[:-1]`` is the text checked before)."""
    return stop_at(decode(ids), len(decode(ids[:-1])) if len(ids) > 1 else 0, stops)
