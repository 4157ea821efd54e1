"""Constrained generation: ``SamplingParams.logit_bias``, ``allowed_token_ids`` and ``choices``.

``choices`` (vLLM's ``guided_choice``) makes the answer exactly one of a few strings ("yes" /
"no", a label set, option letters). It is decided token by token on bytes: every vocabulary
entry's bytes as it appears inside a text (:class:`TokenBytes`: SentencePiece's "▁" is a space,
``<0xNN>`` byte-fallback pieces are that byte, special tokens have none), so a choice may be
spelt by any tokenization the model prefers, including byte pieces for characters the vocabulary
lacks. At each step the allowed tokens are those whose bytes keep the answer (leading
whitespace dropped, as the release strips its answer) a prefix of some choice (and, as the
first token only, a blank one); once the answer
equals a choice, EOS is allowed (and is the only token unless a longer choice continues it), and
EOS ends the request. So the penalties, sampling and beam search all pick among choices.

Order of the logits processors (``sampler.process_logits``, transformers' and vLLM's order):
``logit_bias`` (added), repetition penalty, then the masks (allowed ids or choices, EOS before
``min_new_tokens``).
"""
from __future__ import annotations

import torch

from stllm_engine.tokenizers import piece_text

_WS = b" \t\n\r"


class TokenBytes:
    """Each token id's bytes in running text (None: special or empty), indexed by first byte."""

    def __init__(self, tokenizer) -> None:
        n = len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        self.bytes: list[bytes | None] = [None if i in special else bytes(piece_text(piece)[1]) or None
                                          for i, piece in enumerate(pieces)]
        self.by_first: dict[int, list[int]] = {}  # first byte -> token ids
        self.by_first_stripped: dict[int, list[int]] = {}  # the same after leading whitespace
        self.blank: list[int] = []  # whitespace only ("▁": SentencePiece spells "D" as "▁", "D")
        for i, b in enumerate(self.bytes):
            if b is None:
                continue
            self.by_first.setdefault(b[0], []).append(i)
            s = b.lstrip(_WS)
            if s:
                self.by_first_stripped.setdefault(s[0], []).append(i)
            else:
                self.blank.append(i)

    def __len__(self) -> int:
        return len(self.bytes)

    def text(self, token_ids: list[int]) -> bytes:
        """The bytes of generated tokens, leading whitespace dropped."""
        return b"".join(self.bytes[t] or b"" for t in token_ids if 0 <= t < len(self.bytes)).lstrip(_WS)


class ChoiceGuide:
    """Which tokens may come next so that the answer ends as one of ``choices``."""

    def __init__(self, choices: list[str], table: TokenBytes, eos_token_id: int) -> None:
        self.choices = [c.strip().encode("utf-8") for c in choices]
        self.table = table
        self.eos_token_id = eos_token_id

    def allowed(self, output_token_ids: list[int]) -> list[int]:
        """Token ids allowed after ``output_token_ids`` (sorted; EOS once a choice is complete).
        Raises ValueError when no token continues any choice (a vocabulary without the bytes)."""
        out = output_token_ids
        if out and out[-1] == self.eos_token_id:
            out = out[:-1]
        done = self.table.text(out)
        ok: set[int] = set(self.table.blank if not out else ())  # the first token may be blank
        for c in self.choices:
            if not c.startswith(done):
                continue
            rest = c[len(done):]
            if not rest:
                ok.add(self.eos_token_id)
                continue
            if done:
                ok.update(t for t in self.table.by_first.get(rest[0], ()) if rest.startswith(self.table.bytes[t]))
            else:  # the answer's start: a token may bring leading whitespace with it
                ok.update(t for t in self.table.by_first_stripped.get(rest[0], ())
                          if rest.startswith(self.table.bytes[t].lstrip(_WS)))
        if not ok or ok == set(self.table.blank):
            raise ValueError(f"no token continues any of the choices after {done.decode('utf-8', 'replace')!r}")
        return sorted(ok)


def mask_rows(logits: torch.Tensor, allowed: list[list[int] | None]) -> torch.Tensor:
    """logits [B, V]: -inf outside each row's allowed ids (None: row unchanged)."""
    if all(a is None for a in allowed):
        return logits
    B, V = logits.shape
    keep = torch.zeros(B, V, dtype=torch.bool)
    for i in range(B):
        if allowed[i] is None:
            keep[i] = True
        else:
            keep[i, torch.tensor(allowed[i], dtype=torch.long)] = True
    return logits.masked_fill(~keep.to(logits.device), -float("inf"))


def bias_rows(logits: torch.Tensor, biases: list[dict[int, float] | None]) -> torch.Tensor:
    """logits [B, V] plus each row's ``logit_bias`` (None: no bias)."""
    if not any(biases):
        return logits
    out = logits.clone()
    for i, b in enumerate(biases):
        if b:
            out[i, list(b)] += torch.tensor(list(b.values()), dtype=logits.dtype, device=logits.device)
    return out
