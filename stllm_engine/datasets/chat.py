"""Chat-format answers for the synthetic tasks: a short sentence instead of an option letter.

Used to train the release's plain chat path (``"###Human: q ###Assistant: "`` + answer), so the
CLI's ``answer`` gives the answer in words. Moving Direction items are also asked with the generic
demo question :data:`GENERIC_DIRECTION_QUESTION` (the Makefile's default question).
"""
from __future__ import annotations

import re

GENERIC_DIRECTION_QUESTION = "What is moving in this video, and in which direction?"

_OBJECT = re.compile(r"\bthe (\w+) (\w+)\b")


def _object(question: str) -> str:
    m = _OBJECT.search(question)
    if m is None:
        raise ValueError(f"no 'the <colour> <shape>' in question {question!r}")
    return f"{m.group(1)} {m.group(2)}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def chat_answer(task: str, question: str, answer: str) -> str:
    """The sentence answering ``question`` (whose option answer is ``answer``) for ``task``."""
    if task == "Moving Direction":
        return f"The {_object(question)} moves {answer}."
    if task == "Appearance Order":
        return f"{_capital(answer)} appeared first."
    if task == "Flash Count":
        return f"The {_object(question)} flashes {answer}."
    if task == "Speed Change":
        return f"{_capital(answer)}."
    if task == "Object Colour":
        shape = question.rstrip("?").split()[-1]
        return f"The {shape} is {answer}."
    if task == "Object Shape":
        return f"It is a {answer}."
    raise ValueError(f"no chat answer template for task {task!r}")


def chat_pairs(task: str, question: str, answer: str) -> list[tuple[str, str]]:
    """(question, sentence) pairs one item yields: its own question, plus the generic demo
    question for Moving Direction."""
    sentence = chat_answer(task, question, answer)
    pairs = [(question, sentence)]
    if task == "Moving Direction":
        pairs.append((GENERIC_DIRECTION_QUESTION, sentence))
    return pairs
