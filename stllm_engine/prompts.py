"""Prompt text and answer post-processing of the ST-LLM release (shared by reference and engine).

Two prompt paths exist in the release, both for the instruction-aware (``qformer_text_input``)
checkpoints:

* **Chat / QA** (``Chat.get_context_emb_sim`` in ``stllm/conversation/conversation.py``): the LLM
  input is ``[video tokens] + embed(ids(BOS + system + "###Human: " + q + " ###Assistant: "))``.
  The QA benchmarks pass ``system=False`` (empty system); the demo uses the chat system below.
* **MVBench** (``stllm/test/mvbench``): ``[seg0 tokens (with BOS)] + [video tokens] + [seg1 tokens
  (no BOS)]`` with the multi-message ``get_prompt2`` layout, see :func:`mvbench_prompt_segments`;
  with ``--ask_simple``, as the published ``test_mvbench.sh`` runs it, ``[video tokens] +
  embed(ids(BOS + text after "</Video>\n"))``, see :func:`mvbench_simple_prompt`.

Generated text is cleaned with :func:`postprocess_answer` (cut at "###", keep the text after
"Assistant:", strip); MVBench keeps only the first line and re-adds the "(" of the priming.
"""
from __future__ import annotations

from collections.abc import Sequence

from stllm_engine.sampling_params import stop_at

SEP = "###"
CHAT_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, give your "
    "answer that best addresses the question.\n"
)
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the "
    "best option that accurately addresses the question.\n"
)
MVBENCH_QUESTION_PROMPT = "\nOnly give the best option."
MVBENCH_ANSWER_PROMPT = "Best option:("
MVBENCH_RETURN_PROMPT = "("


def chat_prompt(question: str, system: str | None = None) -> str:
    """Text after the video tokens on the chat path (BOS is added by the caller as a token).

    ``system=None`` uses :data:`CHAT_SYSTEM`; ``system=""`` is the release's ``system=False``.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a str or None, got {type(system).__name__}")
    sys_text = CHAT_SYSTEM if system is None else system
    return sys_text + SEP + "Human: " + question + " " + SEP + "Assistant: "


def chat_turns_prompt(question: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
    """Text after the video tokens for ``question`` asked after the turns ``history`` ((question,
    answer) pairs, oldest first): the release's conversation, ``chat_prompt(first question)`` then
    ``answer + "###Human: " + q + " ###Assistant: "`` per later turn. Without history it is
    :func:`chat_prompt`; each turn's prompt extends the previous turn's prompt + answer, so a
    follow-up's prefix is in the KV prefix cache."""
    check_history(history)
    turns = list(history) + [(question, None)]
    text = chat_prompt(turns[0][0], system)
    for (_, answer), (q, _) in zip(turns, turns[1:]):
        text += answer + SEP + "Human: " + q + " " + SEP + "Assistant: "
    return text


def check_history(history) -> None:
    """``history`` must be a sequence of (question, answer) string pairs. A blank question is one,
    as ``answer`` takes it (and the release); the HTTP endpoints refuse blank questions themselves."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if (isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2
                or not all(isinstance(t, str) for t in turn)):
            raise TypeError(f"history[{i}] must be a (question, answer) pair of strings, got {turn!r}")


def mvbench_question(question: str, candidates: Sequence[str]) -> str:
    """MVBench ``qa_template`` question: ``"Question: q\\nOptions:\\n(A) c0\\n(B) c1"``."""
    if len(candidates) == 0:
        raise ValueError("MVBench question needs at least one candidate option")
    if len(candidates) > 26:
        raise ValueError(f"at most 26 options (A-Z) are supported, got {len(candidates)}")
    text = f"Question: {question}\nOptions:\n"
    for i, c in enumerate(candidates):
        text += f"({chr(ord('A') + i)}) {c}\n"
    return text.rstrip()


def mvbench_gt(candidates: Sequence[str], answer: str) -> str:
    """Ground-truth string ``"(X) answer"`` as ``qa_template`` builds it.

    Like the release, an answer not among the candidates gets index -1 (letter ``"@"``).
    """
    idx = -1
    for i, c in enumerate(candidates):
        if c == answer:
            idx = i
    return f"({chr(ord('A') + idx)}) {answer}"


def mvbench_prompt_segments(question: str, system: str = MVBENCH_SYSTEM,
                            question_prompt: str = MVBENCH_QUESTION_PROMPT,
                            answer_prompt: str = MVBENCH_ANSWER_PROMPT) -> tuple[str, str]:
    """(text before the video tokens, text after them) for MVBench.

    Release layout (``get_prompt2`` with ``system_llm=True``): messages ``Human: <Video><VideoHere>
    </Video>\\n``, ``Human: system + question + question_prompt + "\\n"`` and ``Assistant: answer_prompt``,
    joined by "###", the whole prefixed by ``system + "###"``; split at ``<VideoHere>``.
    The first segment is tokenized with BOS, the second without.
    """
    if not isinstance(system, str):
        raise TypeError(f"system must be a str, got {type(system).__name__}")
    before = system + SEP + "Human: <Video>"
    after = ("</Video>\n" + SEP + "Human: " + system + question + question_prompt + "\n" + SEP
             + "Assistant: " + answer_prompt)
    return before, after


def mvbench_simple_prompt(question: str, system: str = MVBENCH_SYSTEM,
                          question_prompt: str = MVBENCH_QUESTION_PROMPT,
                          answer_prompt: str = MVBENCH_ANSWER_PROMPT) -> str:
    """The text after the video tokens in the release's ``ask_simple`` MVBench layout
    (``get_context_emb_sim``, what the published ``test_mvbench.sh`` runs): the same prompt as
    :func:`mvbench_prompt_segments` split after ``"</Video>\n"``, tokenized with BOS; the video
    tokens come first and the text before them (the leading system and ``<Video>``) is dropped."""
    return mvbench_prompt_segments(question, system, question_prompt, answer_prompt)[1][len("</Video>\n"):]


def postprocess_answer(text: str) -> str:
    """Release post-processing of decoded output: cut at "###", keep after "Assistant:", strip."""
    return text.split(SEP)[0].split("Assistant:")[-1].strip()


def release_answer(tokenizer, ids: list[int], stop_reason: str | None = None) -> str:
    """The release's answer text of generated ids; where a stop string ended the answer
    (``RequestOutput.stop_reason``), the text is cut before it, as the engine's ``text`` is (the
    release's own "###" is cut by :func:`postprocess_answer` anyway)."""
    text = decode_output(tokenizer, ids, tokenizer.eos_token_id)
    if stop_reason and stop_reason in text:
        # the occurrence that ended it: the first one the last token completes ("##" + "##" ends
        # at "###" from 0, not 1), after any earlier one that stood because min_new_tokens had not
        # been reached
        prev = len(decode_output(tokenizer, ids[:-1], tokenizer.eos_token_id)) if len(ids) > 1 else 0
        hit = stop_at(text, prev, [stop_reason])  # (the engine's rule)
        text = text[:hit[0] if hit else text.rfind(stop_reason)]
    return postprocess_answer(text)


def mvbench_postprocess(text: str, return_prompt: str = MVBENCH_RETURN_PROMPT) -> str:
    """MVBench answer: ``return_prompt`` + first line of the post-processed answer."""
    return return_prompt + postprocess_answer(text).strip().split("\n")[0]


def check_answer(pred: str, gt: str) -> bool:
    """MVBench ``check_ans``: the predicted option token matches the ground-truth option.

    ``pred`` like ``"(A) the cat"``, ``gt`` like ``"(A) The cat."``; compares lower-cased first words:
    ``pred_option.replace('.', '') in gt_option or gt_option in pred_option``.
    """
    if not gt.strip():
        raise ValueError("ground truth answer is empty")
    pred_option = pred.lower().split(" ")[0]
    gt_option = gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


LEADING_DROP_IDS = (0, 1)  # the release's Chat.answer drops a leading <unk>, then a leading <s>


def clean_output_ids(ids: list[int], eos_token_id: int | None) -> list[int]:
    """Release cleanup of generated ids: drop a leading 0, then a leading 1; cut at the first EOS.

    Cutting at EOS is ours: with transformers 4.28 the release decoded the EOS as the text
    ``"</s>"``; the engine and the reference both end the text at EOS instead.
    """
    ids = list(ids)
    for lead in LEADING_DROP_IDS:
        if ids and ids[0] == lead:
            ids = ids[1:]
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[:ids.index(eos_token_id)]
    return ids


def decode_output(tokenizer, ids: list[int], eos_token_id: int | None) -> str:
    """Generated ids -> the decoded text the release post-processes (:func:`clean_output_ids`,
    then decode keeping special-token text)."""
    return tokenizer.decode(clean_output_ids(ids, eos_token_id), skip_special_tokens=False)
