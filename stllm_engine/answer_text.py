"""Answer text of generated ids: the release's post-processing, as stable streamed pieces, and the
JSON body of a finished request (shared by the HTTP server and ``stllm answer --json``)."""
from __future__ import annotations

from stllm_engine.api import STLLM
from stllm_engine.outputs import RequestOutput
from stllm_engine.prompts import decode_output, postprocess_answer


class AnswerText:
    """The release answer text of a growing list of generated ids, as stable streamed pieces.

    ``text(ids)`` = ``STLLM.postprocess`` of those ids; ``piece(ids)`` returns what extends the text
    already sent, holding back what may still change: trailing byte-fallback tokens (the decoder
    joins a run of byte tokens, so a later byte can turn earlier ones into U+FFFD), "#" of a coming
    "###" and whitespace the final strip drops. If the text stops extending what was sent (the
    model wrote "Assistant:", whose prefix the release drops), no more pieces come; the final text
    (``text``) is always complete.
    """

    HOLD = " \t\r\n#\ufffd"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent = ""
        self._byte_token: dict[int, bool] = {}

    def text(self, ids: list[int]) -> str:
        return postprocess_answer(decode_output(self.tokenizer, ids, self.tokenizer.eos_token_id))

    def _is_byte(self, i: int) -> bool:
        if i not in self._byte_token:
            tok = self.tokenizer.convert_ids_to_tokens(i)
            self._byte_token[i] = isinstance(tok, str) and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")
        return self._byte_token[i]

    def piece(self, ids: list[int], final: bool = False) -> str:
        ids = list(ids)
        if not final:
            while ids and self._is_byte(ids[-1]):
                ids.pop()
        cur = self.text(ids)
        if not final:
            cur = cur.rstrip(self.HOLD)
        if len(cur) <= len(self.sent) or not cur.startswith(self.sent):
            return ""
        out, self.sent = cur[len(self.sent):], cur
        return out


def result_json(llm: STLLM, out: RequestOutput) -> dict:
    """The JSON body of a finished request."""
    return {"text": AnswerText(llm.tokenizer).text(out.token_ids), "finish_reason": out.finish_reason,
            "timings": out.timings.as_dict(),
            "usage": {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": len(out.token_ids),
                      "cached_prompt_tokens": out.num_cached_tokens,
                      "truncated_prompt_tokens": out.num_truncated_prompt_tokens}}
