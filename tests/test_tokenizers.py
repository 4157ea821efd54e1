"""The trained tiny tokenizers and the loaders: special ids, prompt round trips, "###", [DEC]."""
from __future__ import annotations

import json

import pytest

from stllm_engine.testing.tokenizers import (BERT_SPECIALS, BYTE_TOKENS, write_llama_tokenizer,
                                             write_qformer_tokenizer)
from stllm_engine.tokenizers import TokenizerError, load_llama_tokenizer, load_qformer_tokenizer

CHAT_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the "
               "detail and movement of objects, and the action and pose of persons. Based on your "
               "observations, give your answer that best addresses the question.\n")
PROMPTS = [
    CHAT_SYSTEM + "###Human: What colour is the triangle? ###Assistant: ",
    "###Human: Question: In which direction is the red circle moving?\nOptions:\n(A) left\n(B) right\n"
    "(C) up\n(D) down\nOnly give the best option.\n###Assistant: Best option:(",
    "It flashes 3 times, then 12 more. ###",
    "Unseen words: zebra quizzically, café, naïve, 東京, emoji 🙂 and tabs\tand  double  spaces",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama_tokenizer(tmp_path_factory.mktemp("llama"), vocab_size=1024)


@pytest.fixture(scope="module")
def qformer_dir(tmp_path_factory):
    return write_qformer_tokenizer(tmp_path_factory.mktemp("qformer"))


def test_llama_special_ids(llama_dir):
    tok = load_llama_tokenizer(llama_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert tok.convert_tokens_to_ids(list(BYTE_TOKENS[:2])) == [3, 4]
    assert tok.convert_tokens_to_ids("<0xFF>") == 258
    ids = tok.encode("hello")
    assert ids[0] == 1 and 2 not in ids
    assert tok("hello", add_special_tokens=False)["input_ids"] == ids[1:]


@pytest.mark.parametrize("vocab_size", [384, 512, 1024, 2500])
def test_llama_vocab_size_is_exact(tmp_path, vocab_size):
    tok = load_llama_tokenizer(write_llama_tokenizer(tmp_path, vocab_size=vocab_size))
    assert len(tok) == vocab_size
    ids = tok.encode(PROMPTS[0])
    assert max(ids) < vocab_size


def test_llama_filler_ids_round_trip_through_text(tmp_path):
    """A benchmark-sized vocabulary is mostly ``<extra_i>`` fillers: a random model's answer of
    fillers and learned pieces decodes to text that encodes back to the same ids (a chat's next
    prompt then reuses its KV), while ordinary text never produces a filler."""
    tok = load_llama_tokenizer(write_llama_tokenizer(tmp_path, vocab_size=4000))
    fillers = [i for t, i in tok.get_vocab().items() if t.startswith("<extra_")]
    assert len(fillers) > 2000 and len(tok) == 4000
    ids = [fillers[7], 300, fillers[-1], fillers[1000], 450, 31, fillers[3]]
    text = tok.decode(ids, skip_special_tokens=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert not set(tok.encode(" ".join(PROMPTS))) & set(fillers)


def test_llama_vocab_too_small_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_llama_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.parametrize("text", PROMPTS)
def test_llama_round_trip(llama_dir, text):
    tok = load_llama_tokenizer(llama_dir)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids  # byte fallback covers everything


def test_llama_prompt_words_are_learned(llama_dir):
    tok = load_llama_tokenizer(llama_dir)
    pieces = tok.convert_ids_to_tokens(tok.encode(PROMPTS[0], add_special_tokens=False))
    assert pieces[:3] == ["▁Carefully", "▁watch", "▁the"]
    assert len(pieces) < len(PROMPTS[0]) / 3  # real merges, not characters
    assert not any(p.startswith("<0x") for p in pieces[:-1])


def test_llama_sep_is_a_single_token(llama_dir):
    tok = load_llama_tokenizer(llama_dir)
    sep, spaced = tok.convert_tokens_to_ids(["###", "▁###"])
    assert tok.unk_token_id not in (sep, spaced)
    ids = tok.encode("answer ###Human:", add_special_tokens=False)
    assert spaced in ids
    assert tok.decode([spaced]).strip() == "###" and tok.decode([sep]) == "###"
    assert tok.convert_ids_to_tokens(tok.encode("###", add_special_tokens=False)) == ["▁###"]


def test_llama_folder_layout_and_other_loaders(llama_dir):
    from transformers import AutoTokenizer
    files = {p.name for p in llama_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert json.loads((llama_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    auto = AutoTokenizer.from_pretrained(str(llama_dir))
    ours = load_llama_tokenizer(llama_dir)
    for text in PROMPTS:
        assert auto.encode(text) == ours.encode(text)


def test_llama_loader_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_llama_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="tokenizer.json or tokenizer.model"):
        load_llama_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    try:
        import sentencepiece  # noqa: F401
        have_sp = True
    except ImportError:
        have_sp = False
    with pytest.raises(TokenizerError, match="cannot load" if have_sp else "sentencepiece"):
        load_llama_tokenizer(tmp_path)


def test_qformer_specials_and_dec(qformer_dir):
    tok = load_qformer_tokenizer(qformer_dir)
    assert tok.convert_tokens_to_ids(list(BERT_SPECIALS)) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == len(tok) - 1
    enc = tok("What COLOUR is the Circle?")
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and "[DEC]" not in toks
    assert toks[1:-1] == ["what", "colour", "is", "the", "circle", "?"]  # uncased
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "what colour is the circle?"


@pytest.mark.parametrize("max_length", [3, 5, 8])
def test_qformer_truncates_from_the_left(qformer_dir, max_length):
    tok = load_qformer_tokenizer(qformer_dir)
    assert tok.truncation_side == "left"
    text = "the red circle moves left then the blue square moves right"
    full = tok(text)["input_ids"]
    cut = tok(text, truncation=True, max_length=max_length)["input_ids"]
    assert len(cut) == max_length
    assert cut[0] == tok.cls_token_id and cut[-1] == tok.sep_token_id
    assert cut[1:-1] == full[-(max_length - 1):-1]  # the end of the question survives


def test_qformer_dec_added_to_plain_bert_folder(tmp_path, qformer_dir):
    vocab = [t for t, _ in sorted(load_qformer_tokenizer(qformer_dir).get_vocab().items(),
                                  key=lambda kv: kv[1]) if t != "[DEC]"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")  # like bert-base-uncased
    for source in (tmp_path, tmp_path / "vocab.txt"):
        tok = load_qformer_tokenizer(source)
        assert tok.bos_token == "[DEC]" and tok.bos_token_id == len(vocab) == len(tok) - 1


def test_qformer_found_in_checkpoint_folder(tmp_path, qformer_dir):
    import shutil
    shutil.copytree(qformer_dir, tmp_path / "qformer_tokenizer")
    assert len(load_qformer_tokenizer(tmp_path)) == len(load_qformer_tokenizer(qformer_dir))


def test_qformer_loader_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_qformer_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="vocab.txt, a WordPiece tokenizer.json"):
        load_qformer_tokenizer(tmp_path)


def test_llama_instruction_specials_like_the_release(llama_dir):
    plain = load_llama_tokenizer(llama_dir)
    tok = load_llama_tokenizer(llama_dir, instruction_specials=True)
    assert len(tok) == len(plain) + 1 and tok.pad_token == "[PAD]" and tok.pad_token_id == len(plain)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (2, 2, 2)
    ids = tok.encode(PROMPTS[0])
    assert ids[0] == 2 and ids[1:] == plain.encode(PROMPTS[0])[1:]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPTS[0]


def test_training_is_deterministic_across_processes():
    import subprocess
    import sys
    code = ("import hashlib; from stllm_engine.testing.tokenizers import train_llama_tokenizer, "
            "train_qformer_vocab; print(hashlib.md5((train_llama_tokenizer(600).to_str() + "
            "'|'.join(train_qformer_vocab(300))).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=120).stdout for _ in range(2)}
    assert len(runs) == 1 and len(runs.pop().strip()) == 32


@pytest.mark.parametrize("vocab_size", [128, 300, 1024])
def test_qformer_vocab_sizes(vocab_size):
    from stllm_engine.testing.tokenizers import train_qformer_vocab
    vocab = train_qformer_vocab(vocab_size)
    assert len(vocab) == len(set(vocab)) <= vocab_size
    assert vocab[:5] == list(BERT_SPECIALS)
    assert "a" in vocab and "##a" in vocab  # every word can be split


def test_qformer_tokenizer_refuses_a_llama_only_folder(tmp_path):
    """A folder with only the LLaMA tokenizer must not be read as a BERT vocabulary."""
    from stllm_engine.testing.tokenizers import write_llama_tokenizer
    from stllm_engine.tokenizers import TokenizerError, load_qformer_tokenizer

    write_llama_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="LLaMA tokenizer"):
        load_qformer_tokenizer(tmp_path)
