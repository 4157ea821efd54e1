"""Stop sequences from a trained tokenizer, the "###" stopping criterion and output-id cleanup."""
import pytest
import torch

from stllm_engine.reference.generation import (StopOnSequences, clean_output_ids, ends_with_any,
                                                stop_sequences)
from stllm_engine.testing.tokenizers import write_llama_tokenizer
from stllm_engine.tokenizers import load_llama_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_llama_tokenizer(write_llama_tokenizer(tmp_path_factory.mktemp("llama_tok"), vocab_size=1024))


def test_stop_sequences_decode_to_separator(tok):
    stops = stop_sequences(tok)
    assert 1 <= len(stops) <= 2 and all(stops)
    assert stops[0] == tok.encode("###", add_special_tokens=False)  # word-start form first
    for s in stops:
        assert tok.decode(s).strip() == "###"
    # the in-word form is what the tokenizer produces after a word without a space
    in_word = tok.encode("ball###", add_special_tokens=False)
    assert any(in_word[-len(s):] == s for s in stops)


def test_stop_sequences_of_other_text(tok):
    stops = stop_sequences(tok, "Human")
    assert all(tok.decode(s).strip() == "Human" for s in stops)


STOPS = [[835], [2277, 29937]]  # the release's Vicuna ids, used here as plain data


@pytest.mark.parametrize("seq,hit", [
    ([5, 6, 835], True), ([835], True), ([5, 2277, 29937], True), ([2277, 29937], True),
    ([29937], False), ([2277], False), ([835, 5], False), ([], False), ([29937, 2277], False),
])
def test_ends_with_any(seq, hit):
    assert ends_with_any(seq, STOPS) is hit
    assert ends_with_any(torch.tensor(seq, dtype=torch.long), STOPS) is hit


def test_criterion_first_row_only_like_release():
    ids = torch.tensor([[1, 2, 835], [1, 2, 3]])
    crit = StopOnSequences(STOPS, first_row_only=True)
    assert crit(ids, None).tolist() == [True, True]
    assert crit(ids.flip(0), None).tolist() == [False, False]  # only row 0 is looked at


def test_criterion_per_row():
    ids = torch.tensor([[1, 2277, 29937], [1, 2, 3], [9, 9, 835]])
    assert StopOnSequences(STOPS, first_row_only=False)(ids, None).tolist() == [True, False, True]


def test_criterion_rejects_empty_stops():
    with pytest.raises(ValueError, match="non-empty"):
        StopOnSequences([[]])


@pytest.mark.parametrize("ids,want", [
    ([0, 1, 5, 6], [5, 6]),      # leading <unk> then <s>
    ([1, 5, 6], [5, 6]),
    ([1, 0, 5], [0, 5]),         # release order: 0 is checked first, then 1
    ([0, 0, 5], [0, 5]),
    ([5, 6, 2, 7], [5, 6]),      # cut at EOS
    ([2], []),
    ([], []),
    ([5, 6], [5, 6]),
])
def test_clean_output_ids(ids, want):
    assert clean_output_ids(ids, eos_token_id=2) == want


def test_clean_output_ids_without_eos():
    assert clean_output_ids([5, 2, 6], eos_token_id=None) == [5, 2, 6]
