"""Training examples from an MVBench-format QA set, in the prompt layout MVBench inference uses.

Sequence (``ReferenceSTLLM.mvbench_inputs_embeds`` + the answer)::

    [BOS + text before the video] [video tokens] [text after the video, ending "Best option:("]
    [target: "B) slows down" + EOS]

BOS is the id the release actually prepends (``</s>``, see ``reference/chat.py``). The Q-Former
text is the formatted MVBench question. Labels cover the target only.

With ``chat=True`` every item also yields chat-format examples (``ReferenceSTLLM.chat_inputs_embeds``
+ the answer): ``[video tokens] [BOS + chat_prompt(q)] [target: "The red circle moves left." + EOS]``
with the raw question as Q-Former text (sentences from :mod:`stllm_engine.datasets.chat`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from stllm_engine.evaluation.mvbench_data import MVBenchItem, load_items, resolve_split
from stllm_engine.prompts import (CHAT_SYSTEM, MVBENCH_SYSTEM, chat_prompt, mvbench_prompt_segments,
                                   mvbench_question)


@dataclass
class PromptIds:
    before: list[int]  # BOS + text before the video tokens
    after: list[int]  # text after the video tokens (no BOS)
    target: list[int]  # answer ids + EOS (the only labelled tokens)


@dataclass
class Example:
    frames: torch.Tensor  # [T, 3, S, S] float32 normalised
    qformer_text: str  # formatted MVBench question
    ids: PromptIds
    task: str


def target_text(item: MVBenchItem) -> str:
    """What the model should write after the ``"Best option:("`` priming: ``"B) slows down"``."""
    return f"{item.answer_letter}) {item.answer}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_ids(tokenizer, bos_id: int, eos_id: int, question: str, target: str,
               system: str = MVBENCH_SYSTEM) -> PromptIds:
    """Token ids of the three text parts (tokenized separately, as inference does)."""
    before, after = mvbench_prompt_segments(question, system)
    return PromptIds([bos_id] + _encode(tokenizer, before), _encode(tokenizer, after),
                     _encode(tokenizer, target) + [eos_id])


def chat_prompt_ids(tokenizer, bos_id: int, eos_id: int, question: str, target: str,
                    system: str = CHAT_SYSTEM) -> PromptIds:
    """Chat layout: nothing before the video; after it BOS + ``chat_prompt``; target + EOS."""
    return PromptIds([], [bos_id] + _encode(tokenizer, chat_prompt(question, system)),
                     _encode(tokenizer, target) + [eos_id])


class QADataset:
    """Examples of one split; frames decoded once (MVBench sampling, as the evaluation reads them)
    and cached as float16. Indices ``0..len(items)-1`` are the MVBench-format examples; with
    ``chat=True`` the chat-format examples follow."""

    def __init__(self, data_dir: str | Path, tokenizer, bos_id: int, eos_id: int, num_frames: int,
                 image_size: int, tasks: list[str] | None = None, limit: int | None = None,
                 chat: bool = False) -> None:
        self.root = resolve_split(data_dir, "train")
        self.items = load_items(self.root, tasks=tasks, limit=limit)
        if not self.items:
            raise ValueError(f"no training items in {self.root}")
        self.tokenizer, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id
        self.num_frames, self.image_size = num_frames, image_size
        self._frames: dict[int, torch.Tensor] = {}
        self.chat: list[tuple[int, str, str]] = []  # (item index, question, answer sentence)
        if chat:
            from stllm_engine.datasets.chat import chat_pairs

            for i, it in enumerate(self.items):
                self.chat += [(i, q, a) for q, a in chat_pairs(it.task, it.question, it.answer)]

    def __len__(self) -> int:
        return len(self.items) + len(self.chat)

    def frames(self, i: int) -> torch.Tensor:
        if i not in self._frames:
            from stllm_engine.video import load_video

            v = load_video(str(self.items[i].video_path), num_frames=self.num_frames,
                           sampling="mvbench", size=self.image_size)
            self._frames[i] = v.frames.to(torch.float16)
        return self._frames[i].float()

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range 0..{len(self) - 1}")
        if i >= len(self.items):
            j, question, sentence = self.chat[i - len(self.items)]
            ids = chat_prompt_ids(self.tokenizer, self.bos_id, self.eos_id, question, sentence)
            return Example(self.frames(j), question, ids, self.items[j].task)
        item = self.items[i]
        q = mvbench_question(item.question, item.candidates)
        ids = prompt_ids(self.tokenizer, self.bos_id, self.eos_id, q, target_text(item))
        return Example(self.frames(i), q, ids, item.task)


class BatchSampler:
    """Endless shuffled batches of indices (reshuffled every epoch), resumable by state."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size <= 0 or n <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._order = self._shuffle()
