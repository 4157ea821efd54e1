"""Generation helpers of the release's chat: "###" stop sequences, stopping criterion, output cleanup.

The release hard-codes the Vicuna ids of "###" (``[835]`` = "▁###" and ``[2277, 29937]`` = "##" "#");
here they are computed from the loaded tokenizer: the word-start encoding of "###" and the BPE
model's encoding of "###" inside a word (no "▁" prefix).
"""
from __future__ import annotations

import torch
from transformers import StoppingCriteria

from ..prompts import SEP, clean_output_ids  # noqa: F401 (re-exported)

# ``Chat.answer`` strips a leading id 0 (<unk>) and then a leading id 1 (<s>) from the output.


def stop_sequences(tokenizer, text: str = SEP) -> list[list[int]]:
    """Token id sequences of ``text`` that end generation (deduplicated, word-start form first)."""
    seqs = [list(tokenizer.encode(text, add_special_tokens=False))]
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "tokenize"):
        seqs.append([t.id for t in model.tokenize(text)])
    out: list[list[int]] = []
    for s in seqs:
        if s and s not in out:
            out.append(s)
    if not out:
        raise ValueError(f"tokenizer produced no tokens for stop text {text!r}")
    return out


def ends_with_any(ids: torch.Tensor | list[int], stops: list[list[int]]) -> bool:
    """True when the 1-D id sequence ends with one of ``stops``."""
    seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return any(len(seq) >= len(s) and seq[len(seq) - len(s):] == s for s in stops)


class StopOnSequences(StoppingCriteria):
    """Stop when the generated ids end with a stop sequence.

    ``first_row_only=True`` is the release's ``StoppingCriteriaSub``: it looks at row 0 only and
    stops every row (for beam search, row 0 is the best running continuation). With
    ``first_row_only=False`` each row is judged on its own.
    """

    def __init__(self, stops: list[list[int]], first_row_only: bool = True):
        if not stops or any(len(s) == 0 for s in stops):
            raise ValueError("stop sequences must be non-empty")
        self.stops = [list(map(int, s)) for s in stops]
        self.first_row_only = first_row_only

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.first_row_only:
            hit = ends_with_any(input_ids[0], self.stops)
            return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)
        return torch.tensor([ends_with_any(row, self.stops) for row in input_ids],
                            dtype=torch.bool, device=input_ids.device)
