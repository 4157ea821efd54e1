"""Next-token selection with per-sequence parameters, and stop detection.

Logit processing follows ``transformers`` (so greedy results match ``generate``): logit_bias
(added, as its ``sequence_bias`` of single tokens), repetition penalty (a seen token's logit is
divided by p if positive, else multiplied by p), the allowed-token masks (``guided.py``; its
``prefix_allowed_tokens_fn``), min_new_tokens (EOS is masked until the minimum is reached; stop
ids/strings are not checked before it), then
for sampling: temperature, top-k, top-p (smallest set whose probability exceeds top_p; at least one
token kept). Each sequence draws from its own ``torch.Generator`` seeded from ``params.seed``, so a
request samples the same tokens alone or in any batch.
"""
from __future__ import annotations

import torch

from stllm_engine.engine.guided import bias_rows, mask_rows
from stllm_engine.engine.sequence import Sequence
from stllm_engine.sampling_params import newest_stop, stop_at
from stllm_engine.tokenizers import ByteTokenIds


def seen_token_ids(seq: Sequence) -> list[int]:
    """Tokens the repetition penalty applies to (outputs; plus prompt text if penalize_prompt)."""
    if seq.params.penalize_prompt:
        return seq.prompt_token_ids + seq.output_token_ids
    return seq.output_token_ids


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """logits [V] (modified copy): HF semantics over the set of ``token_ids``."""
    if penalty == 1.0 or not token_ids:
        return logits
    idx = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    s = logits.gather(0, idx)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return logits.scatter(0, idx, s)


def banned_by_min_tokens(seq: Sequence, eos_token_id: int | None) -> list[int]:
    """Token ids masked while fewer than ``min_new_tokens`` were generated: EOS (transformers'
    MinNewTokensLengthLogitsProcessor). Stop ids/strings cannot end the sequence before the minimum
    either; :class:`StopChecker` ignores them until then."""
    p = seq.params
    if seq.num_output_tokens >= p.min_new_tokens or eos_token_id is None or p.ignore_eos:
        return []
    return [eos_token_id]


def allowed_token_ids(seq: Sequence) -> list[int] | None:
    """The tokens ``seq`` may generate next (its choices' guide or ``allowed_token_ids``; None: all)."""
    if seq.guide is not None:
        return seq.guide.allowed(seq.output_token_ids)
    return seq.params.allowed_token_ids


def process_logits(logits: torch.Tensor, seq: Sequence, eos_token_id: int | None) -> torch.Tensor:
    """Penalties, bias and masks shared by greedy, sampling and beam search (logits [V] float32)."""
    logits = bias_rows(logits[None], [seq.params.logit_bias])[0]
    logits = apply_repetition_penalty(logits, seen_token_ids(seq), seq.params.repetition_penalty)
    allowed = allowed_token_ids(seq)
    logits = mask_rows(logits[None], [allowed])[0]
    banned = banned_by_min_tokens(seq, eos_token_id)
    if banned:
        logits = logits.clone()
        logits[torch.tensor(banned, dtype=torch.long, device=logits.device)] = -float("inf")
    return revive_allowed(logits[None], [allowed])[0]


def process_batch(logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int | None) -> torch.Tensor:
    """:func:`process_logits` for a whole batch at once (same values; logits [B, V] float32)."""
    dev = logits.device
    logits = bias_rows(logits, [s.params.logit_bias for s in seqs])
    seen = [seen_token_ids(s) if s.params.repetition_penalty != 1.0 else [] for s in seqs]
    width = max((len(x) for x in seen), default=0)
    if width:  # only the seen logits: [B, width] gathered, penalised, scattered back (a row's
        # padding repeats its first id; rows without seen ids get penalty 1, which changes nothing)
        idx = torch.tensor([x + [x[0] if x else 0] * (width - len(x)) for x in seen], dtype=torch.long, device=dev)
        pen = torch.tensor([[s.params.repetition_penalty if x else 1.0] for s, x in zip(seqs, seen)],
                           dtype=logits.dtype, device=dev)
        g = logits.gather(1, idx)
        logits = logits.scatter(1, idx, torch.where(g < 0, g * pen, g / pen))
    allowed = [allowed_token_ids(s) for s in seqs]
    logits = mask_rows(logits, allowed)
    rows = [i for i, s in enumerate(seqs) if banned_by_min_tokens(s, eos_token_id)]
    if rows:
        logits = logits.clone()
        logits[torch.tensor(rows, device=dev), eos_token_id] = -float("inf")
    return revive_allowed(logits, allowed)


def revive_allowed(logits: torch.Tensor, allowed: list[list[int] | None]) -> torch.Tensor:
    """Rows with an allowed set that nothing is left of (``allowed_token_ids=[eos]`` before
    ``min_new_tokens``, or biases of -inf) get 0 on their allowed ids, as transformers' prefix
    constraint does: the next token stays among them (greedy picked id 0, outside the set, and
    sampling failed on NaN probabilities)."""
    rows = [i for i, a in enumerate(allowed) if a]
    if not rows:
        return logits
    dead = [i for i in rows if bool(torch.isneginf(logits[i]).all())]
    if not dead:
        return logits
    logits = logits.clone()
    for i in dead:
        logits[i, torch.tensor(allowed[i], dtype=torch.long, device=logits.device)] = 0.0
    return logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))


class Sampler:
    """Picks one token per sequence from float32 logits [B, V]."""

    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id
        self._generators: dict[int, torch.Generator] = {}

    def generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=device)
            if seq.params.seed is not None:
                g.manual_seed(seq.params.seed)
            else:
                g.seed()
            self._generators[seq.seq_id] = g
        return g

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"sampler: logits {tuple(logits.shape)} do not match {len(seqs)} sequences")
        logits = process_batch(logits.float(), seqs, self.eos_token_id)
        out = torch.argmax(logits, dim=-1).tolist()  # greedy rows; sampled rows overwritten below
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                continue
            row = logits[i] / p.temperature
            finite = torch.isfinite(logits[i])
            if bool(finite.any()) and not bool(torch.isfinite(row[finite]).all()):
                # a temperature so small that logits / T overflows (to +inf, or to -inf for every
                # negative logit): its limit, an even choice among the top logits (not NaN
                # probabilities)
                row = torch.where(logits[i] == logits[i].max(), 0.0, float("-inf"))
            row = apply_top_p(apply_top_k(row, p.top_k), p.top_p)
            probs = torch.softmax(row, dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=self.generator(seq, row.device)))
        return out


class StopChecker:
    """Detokenizes a sequence's outputs incrementally and decides when it ends.

    ``text`` is the answer so far without any stop string; ``delta()`` returns text not yet
    streamed, holding back a tail that could still become a stop string or change: the text of a
    trailing run of byte-fallback tokens ("<0xNN>"), which the decoder turns into U+FFFD all
    together once a byte makes the run invalid UTF-8 (so streamed deltas always join to the final
    text).
    """

    def __init__(self, tokenizer, seq: Sequence, eos_token_id: int | None,
                 max_total_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.seq = seq
        self.eos_token_id = eos_token_id
        self.max_total_tokens = max_total_tokens
        self.text = ""
        self.stop_string: str | None = None  # the stop string that ended the answer
        self._full = ""
        self._stable = 0  # length of the text before the trailing byte-token run (it cannot change)
        self._streamed = 0
        self._hold = max((len(s) for s in seq.params.stop), default=1) - 1
        self._bytes = ByteTokenIds(tokenizer) if tokenizer else None

    def _stable_length(self, out: list[int]) -> int:
        n = self._bytes.stable_prefix(out)
        if n == len(out):
            return len(self._full)
        return len(self.tokenizer.decode(out[:n], skip_special_tokens=True)) if n else 0

    def update(self) -> str | None:
        """Call after a token was appended; returns a finish reason or None."""
        seq, p = self.seq, self.seq.params
        out = seq.output_token_ids
        prev_stable = self._stable
        self._full = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer else ""
        self._stable = min(self._stable_length(out), len(self._full)) if self.tokenizer else 0
        self.text = self._full
        may_stop = len(out) >= p.min_new_tokens
        if may_stop and p.stop:
            hit = stop_at(self._full, prev_stable, p.stop)
            if hit and not self._in_text_with_specials(out, hit[1]):
                hit = None
            if hit:
                i, self.stop_string = hit
                self.text = self._full[:i]
                return "stop"
        if may_stop and not p.ignore_eos and self.eos_token_id is not None and out and out[-1] == self.eos_token_id:
            return "stop"
        if may_stop and any(out[len(out) - len(s):] == s for s in p.stop_token_ids if len(out) >= len(s)):
            return "stop"
        if len(out) >= p.max_new_tokens:
            return "length"
        if self.max_total_tokens is not None and seq.num_tokens >= self.max_total_tokens:
            return "length"
        return None

    def _in_text_with_specials(self, out: list[int], stop: str) -> bool:
        """Whether the newest token also completes ``stop`` in the text with special tokens kept,
        the text the release cuts its answer in: "##" <s> "#" reads "###" only without them, and
        the release (and the reference) go on there."""
        return newest_stop(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False), out, [stop]) is not None

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self._streamed, min(len(self.text) - self._hold, self._stable))
        if not finished:
            while end > self._streamed and self.text[end - 1] == "\ufffd":
                end -= 1
        piece = self.text[self._streamed:end]
        self._streamed = end
        return piece
