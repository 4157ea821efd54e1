"""Small real tokenizers, trained with the ``tokenizers`` library, for tiny test checkpoints.

* :func:`write_llama_tokenizer`: a LLaMA-style BPE (metaspace "▁", byte fallback, ``<unk>`` 0,
  ``<s>`` 1 BOS, ``</s>`` 2 EOS, byte tokens ``<0x00>..<0xFF>`` at 3..258 like LLaMA) in the
  Hugging Face folder layout (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
* :func:`write_qformer_tokenizer`: a BERT-uncased WordPiece (``[PAD] [UNK] [CLS] [SEP] [MASK]``)
  with the release's added ``[DEC]`` bos token, saved as a BERT tokenizer folder.

Both are trained on :func:`corpus`, English text covering the ST-LLM prompts and answers.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
QFORMER_BOS = "[DEC]"
LLAMA_MIN_VOCAB = 384  # 3 specials + 256 bytes + the corpus alphabet + some merges

_SYSTEM_CHAT = ("Carefully watch the video and pay attention to the cause and sequence of events, the "
                "detail and movement of objects, and the action and pose of persons. Based on your "
                "observations, give your answer that best addresses the question.\n")
_SYSTEM_MVBENCH = ("Carefully watch the video and pay attention to the cause and sequence of events, the "
                   "detail and movement of objects, and the action and pose of persons. Based on your "
                   "observations, select the best option that accurately addresses the question.\n")
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_SHAPES = ("circle", "square", "triangle", "star", "ball", "box")
_MOTION = ("left", "right", "up", "down", "faster", "slower", "moving", "stops", "flashes",
           "appears", "disappears", "rotates", "jumps", "walks", "runs")
_QUESTIONS = (
    "In which direction is the {c} {s} moving?", "Which shape appeared first?",
    "How many times does the {c} {s} flash?", "How does the speed of the {c} {s} change?",
    "What colour is the {s}?", "What shape is the {c} object?", "What is happening in the video?",
    "Describe the video in detail.", "What does the person do after picking up the cup?",
)
_ANSWERS = (
    "The {c} {s} is moving to the {m}.", "The {c} {s} appeared first, then the other shapes.",
    "It flashes {n} times.", "It gets faster and then slower.", "The {s} is {c}.",
    "A person walks into the room, picks up a cup and drinks water.",
    "The video shows a {c} {s} on a dark background that {m} over time.",
)

_GENERAL = (
    "The quick brown fox jumps over the lazy dog. A man is playing a guitar on the street.",
    "Two children run across the park while a dog chases a red ball near the trees.",
    "A woman opens the door, takes off her coat and sits down at the kitchen table.",
    "The camera pans slowly from the mountains to the river, where a small boat drifts by.",
    "First the chef cuts the onions, then he fries them in a pan and adds some salt and pepper.",
    "Several people are dancing on a stage under bright lights while the audience claps.",
    "A cyclist rides along a narrow road, turns left at the corner and stops near a shop.",
    "The girl throws the frisbee, the boy catches it and they both laugh loudly.",
    "In the beginning of the clip a car drives away; at the end it comes back and parks.",
    "Why does the man pick up the phone? Because it was ringing and he wanted to answer it.",
    "Where is the cat sitting? The cat is sitting on the windowsill next to a green plant.",
    "Who enters the room after the teacher? A student carrying three books enters next.",
    "Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Is the person happy or sad? The person looks happy and is smiling at the camera.",
    "The weather changes from sunny to rainy, and everyone opens an umbrella quickly.",
    "He puts the box on the shelf, closes the cupboard and leaves the kitchen.",
    "Actions: sitting, standing, walking, running, jumping, swimming, climbing, cooking, reading.",
    "Objects: table, chair, window, door, bottle, phone, laptop, bag, cup, book, car, tree, house.",
    "Before, after, during, while, then, finally, suddenly, again, always, never, sometimes.",
    "Relations: above, below, behind, in front of, next to, inside, outside, between, around.",
)


def corpus() -> list[str]:
    """Built-in English training text covering the release's prompts, questions and answers."""
    lines = [_SYSTEM_CHAT, _SYSTEM_MVBENCH, "Only give the best option.", "Best option:(",
             "Question: What is it?\nOptions:\n(A) red\n(B) green\n(C) blue\n(D) yellow",
             "</Video>\n###Human: <Video>", "0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 100 2024"]
    for i, q in enumerate(_QUESTIONS):
        for j, a in enumerate(_ANSWERS):
            c, s = _COLOURS[(i + j) % len(_COLOURS)], _SHAPES[(i * 3 + j) % len(_SHAPES)]
            m, n = _MOTION[(i * 5 + j) % len(_MOTION)], (i + 2 * j) % 10
            qt, at = q.format(c=c, s=s), a.format(c=c, s=s, m=m, n=n)
            lines.append(f"{_SYSTEM_CHAT}###Human: {qt} ###Assistant: {at}###")
            opts = "\n".join(f"({chr(65 + k)}) {_COLOURS[(i + j + k) % len(_COLOURS)]} {_SHAPES[k]}"
                             for k in range(4))
            lines.append(f"###Human: Question: {qt}\nOptions:\n{opts}\nOnly give the best option.\n"
                         f"###Assistant: Best option:({chr(65 + j % 4)}) {at}")
    lines += [" ".join(_COLOURS), " ".join(_SHAPES), " ".join(_MOTION)] + list(_GENERAL)
    return lines


def _check_vocab_size(vocab_size: int, minimum: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum}, got {vocab_size!r}")


def train_llama_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A LLaMA-style byte-fallback BPE with exactly ``vocab_size`` entries (training cached per size).

    The small corpus yields about 1k learned pieces; larger sizes are filled with ``<extra_i>``
    pieces that ordinary text never produces (so big-vocab benchmark models can still decode any
    id). They are also added tokens, so the text of any id sequence encodes back to the same ids:
    a random-weight model's answers, mostly fillers, then come back unchanged in a chat's next
    prompt (and its prefix-cache hit covers them), as a trained model's text does. As plain pieces
    each filler re-encoded to ~11 byte-level tokens (64 generated ids -> ~720).
    """
    return Tokenizer.from_str(_train_llama_json(vocab_size))


@lru_cache(maxsize=8)
def _train_llama_json(vocab_size: int) -> str:
    _check_vocab_size(vocab_size, LLAMA_MIN_VOCAB)
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # SentencePiece-like pieces: "▁" only at a piece start, letters / punctuation runs / single
    # digits never merged together (so "###" and "▁###" become pieces, "###Human" does not)
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"▁?#+|▁?[^\p{L}\p{N}▁\s#]+|▁?\p{L}+|▁?\p{N}|\p{N}|▁"), behavior="isolated"),
    ])
    n_fixed = len(LLAMA_SPECIALS) + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, min_frequency=1,
                                  special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(corpus() * 2, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(LLAMA_SPECIALS + BYTE_TOKENS)}
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    for i in range(vocab_size - len(vocab)):  # exact size: unreachable filler pieces decode as text
        vocab[f"<extra_{i}>"] = len(vocab)
    if len(vocab) != vocab_size:  # the corpus alphabet alone did not fit
        raise ValueError(f"cannot build a {vocab_size}-entry tokenizer: the corpus needs {len(vocab)}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(list(LLAMA_SPECIALS))
    fillers = [t for t in vocab if t.startswith("<extra_")]
    if fillers:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fillers])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str()


def write_llama_tokenizer(folder: str | Path, vocab_size: int = 1024, model_max_length: int = 2048) -> Path:
    """Train and save a LLaMA-style tokenizer in the Hugging Face layout; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_llama_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "clean_up_tokenization_spaces": False, "padding_side": "right",
              "model_max_length": model_max_length, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def train_qformer_vocab(vocab_size: int = 1024) -> list[str]:
    """WordPiece vocabulary (BERT-uncased), specials first: ``[PAD]`` 0 ... ``[MASK]`` 4; at most
    ``vocab_size`` entries (the corpus gives about 760). Training is cached per size."""
    return list(_train_qformer_vocab(vocab_size))


@lru_cache(maxsize=8)
def _train_qformer_vocab(vocab_size: int) -> tuple[str, ...]:
    # tokenizers' WordPieceTrainer orders ties differently from run to run; a plain BPE over
    # "▁"-marked words is deterministic, and its pieces map to WordPiece: "▁ab" -> "ab", "ab" -> "##ab"
    _check_vocab_size(vocab_size, len(BERT_SPECIALS) + 64)
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [w for line in corpus() for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator([" ".join(words)],
                            trainer=trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    chars = sorted({c for w in words for c in w})
    vocab = dict.fromkeys(BERT_SPECIALS)
    vocab.update(dict.fromkeys(chars))
    vocab.update(dict.fromkeys("##" + c for c in chars))
    for piece, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        wp = piece[1:] if piece.startswith("▁") else "##" + piece
        if wp and wp != "##":
            vocab.setdefault(wp)
    return tuple(vocab)[:vocab_size]


def write_qformer_tokenizer(folder: str | Path, vocab_size: int = 1024, max_length: int = 512) -> Path:
    """Train and save a BERT-uncased WordPiece folder that already holds ``[DEC]`` as bos."""
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = train_qformer_vocab(vocab_size)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                        model_max_length=max_length)
    tok.add_special_tokens({"bos_token": QFORMER_BOS})
    tok.save_pretrained(str(folder))
    return folder
