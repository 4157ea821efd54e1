"""Answer text of generated ids: the release's post-processing, as stable streamed pieces, and the
JSON body of a finished request (shared by the HTTP server and ``stllm answer --json``)."""
from __future__ import annotations

from stllm_engine.api import STLLM
from stllm_engine.outputs import RequestOutput
from stllm_engine.prompts import SEP, release_answer
from stllm_engine.tokenizers import ByteTokenIds, piece_text


class AnswerText:
    """The release answer text of a growing list of generated ids, as stable streamed pieces.

    ``text(ids)`` = ``STLLM.postprocess`` of those ids; ``piece(ids)`` returns what extends the text
    already sent, holding back what may still change: trailing byte-fallback tokens (the decoder
    joins a run of byte tokens, so a later byte can turn earlier ones into U+FFFD), "#" of a coming
    "###" and whitespace the final strip drops. If the text stops extending what was sent (the
    model wrote "Assistant:", whose prefix the release drops), no more pieces come; the final text
    (``text``) is always complete. With ``stop`` strings (the request's ``SamplingParams.stop``)
    pieces also hold back a tail that may still become one, and the final text is cut before
    the one that ended the answer (``RequestOutput.stop_reason``).
    """

    HOLD = " \t\r\n#\ufffd"

    def __init__(self, tokenizer, stop=()) -> None:
        self.tokenizer = tokenizer
        self.hold = max((len(s) - 1 for s in stop if s != SEP), default=0)  # "###" is in HOLD
        self.sent = ""
        self._bytes = ByteTokenIds(tokenizer)

    def text(self, ids: list[int], stop_reason: str | None = None) -> str:
        return release_answer(self.tokenizer, ids, stop_reason)

    def piece(self, ids: list[int], final: bool = False, stop_reason: str | None = None) -> str:
        ids = list(ids)
        if not final:
            ids = ids[:self._bytes.stable_prefix(ids)]
        cur = self.text(ids, stop_reason if final else None)
        if not final:
            cur = cur.rstrip(self.HOLD)
            if self.hold:  # the held tail may have exposed whitespace the final strip would drop
                cur = cur[:max(0, len(cur) - self.hold)].rstrip(self.HOLD)
        if len(cur) <= len(self.sent) or not cur.startswith(self.sent):
            return ""
        out, self.sent = cur[len(self.sent):], cur
        return out


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token as it reads inside a text: SentencePiece's "▁" is a
    space, a byte-fallback token "<0xNN>" is that byte (its text "" unless ASCII)."""
    return piece_text(tokenizer.convert_ids_to_tokens(int(token_id)))


def logprobs_json(tokenizer, logprobs) -> list[dict]:
    """``RequestOutput.logprobs`` as JSON: token id, text, log-probability and the top ones."""
    def one(tid: int, lp: float) -> dict:
        return {"token_id": int(tid), "token": token_text(tokenizer, tid)[0], "logprob": lp}
    return [dict(one(x.token_id, x.logprob), top_logprobs=[one(t, v) for t, v in x.top]) for x in logprobs]


def result_json(llm: STLLM, out: RequestOutput) -> dict:
    """The JSON body of a finished request (``logprobs`` when the request asked for them)."""
    body = {"text": release_answer(llm.tokenizer, out.token_ids, out.stop_reason), "finish_reason": out.finish_reason,
            "timings": out.timings.as_dict(),
            "usage": {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": len(out.token_ids),
                      "cached_prompt_tokens": out.num_cached_tokens,
                      "truncated_prompt_tokens": out.num_truncated_prompt_tokens}}
    if out.logprobs is not None:
        body["logprobs"] = logprobs_json(llm.tokenizer, out.logprobs)
    return body


class AnswerFormat:
    """The bodies and stream events of ``POST /v1/answer`` (the server's answer loop calls these;
    :class:`stllm_engine.openai_api.ChatFormat` is the chat-completions twin)."""

    def __init__(self, llm: STLLM) -> None:
        self.llm = llm

    def result(self, out: RequestOutput) -> dict:
        return result_json(self.llm, out)

    def start(self, n: int = 1) -> list[dict]:
        return []

    def piece(self, text: str, out: RequestOutput, index: int = 0) -> dict:
        return {"text": text}

    def finish(self, out: RequestOutput, index: int = 0) -> dict:
        return dict(result_json(self.llm, out), done=True)

    def close(self, outs: list[RequestOutput]) -> list[dict]:
        return []

    def error(self, message: str) -> dict:
        return {"done": True, "error": message, "finish_reason": "error"}

