"""Sampler, SamplingParams and StopChecker (no model): processing math against transformers'
logits processors, seeded reproducibility batch vs alone, stop strings across token boundaries."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from stllm_engine.engine.sampler import (Sampler, StopChecker, apply_repetition_penalty, apply_top_k,
                                         apply_top_p, process_batch, process_logits)
from stllm_engine.engine.sequence import Sequence
from stllm_engine.sampling_params import SamplingParams

EOS = 2


def seq(prompt=(5, 6, 7), out=(), **params):
    s = Sequence(list(prompt), SamplingParams(**params))
    for t in out:
        s.append_token(t)
    return s


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE trained on a small corpus ("###" is not one token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "a dog runs # fast", "hello world", "Assistant: yes ## no",
              "héllo wörld ünïcode"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


# --- SamplingParams --------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, temperature=0.7), "beam search"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[[]]), "stop_token_ids"), (dict(seed=1.5), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=2.0), "top_k"),
    (dict(seed=2 ** 64), "seed"), (dict(seed=-2 ** 63 - 1), "seed"),
])
def test_params_reject_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_params_defaults_are_release_chat():
    p = SamplingParams()
    assert p.greedy and p.repetition_penalty == 1.5 and p.stop == ["###"] and p.max_new_tokens == 300
    assert SamplingParams(stop="x").stop == ["x"]


# --- processing math -------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.5, 3.0])
def test_repetition_penalty_matches_transformers(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    ids = [3, 7, 7, 11, 49, 0]
    ours = apply_repetition_penalty(logits, ids, penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[None].clone())[0]
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


def test_repetition_penalty_crafted_values():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # input untouched


def test_penalty_sees_prompt_only_when_asked():
    logits = torch.zeros(10)
    logits[5] = 4.0
    logits[8] = 3.0
    s = seq(prompt=(5,), out=(1,), repetition_penalty=2.0)
    assert int(torch.argmax(process_logits(logits, s, EOS))) == 5  # release: outputs only
    s = seq(prompt=(5,), out=(1,), repetition_penalty=2.0, penalize_prompt=True)
    assert int(torch.argmax(process_logits(logits, s, EOS))) == 8


def test_batched_processing_equals_per_row():
    g = torch.Generator().manual_seed(3)
    seqs = [seq(out=(1, 2, 2, 9)), seq(out=(), min_new_tokens=2), seq(out=(EOS, 4), repetition_penalty=1.0),
            seq(prompt=(3, 4), out=(7,), repetition_penalty=0.7, penalize_prompt=True, min_new_tokens=3),
            seq(out=tuple(range(30)), repetition_penalty=2.5)]
    logits = torch.randn(len(seqs), 40, generator=g) * 4
    batched = process_batch(logits, seqs, EOS)
    for i, s_ in enumerate(seqs):
        torch.testing.assert_close(batched[i], process_logits(logits[i], s_, EOS), rtol=0, atol=0)
    assert batched[1, EOS] == -float("inf") and batched[3, EOS] == -float("inf")


@pytest.mark.parametrize("k", [1, 2, 5, 49, 50, 80])
def test_top_k_matches_transformers(k):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_transformers(p):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(int(p * 100)))
    torch.testing.assert_close(apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_top_p_crafted_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    keep = lambda p: torch.isfinite(apply_top_p(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert keep(0.5) == [0]
    assert keep(0.8) == [0, 1]
    assert keep(0.85) == [0, 1, 2]
    assert keep(1.0) == [0, 1, 2, 3]


def test_greedy_batch():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [9.0, 1.0, 5.0, 2.0]])
    s = Sampler(EOS)
    assert s(logits, [seq(repetition_penalty=1.0), seq(repetition_penalty=1.0)]) == [2, 0]


def test_sampling_respects_top_k():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0, 2.8]])
    s = Sampler(EOS)
    sq = seq(temperature=1.0, top_k=2, seed=0, repetition_penalty=1.0)
    draws = {s(logits, [sq])[0] for _ in range(60)}
    assert draws == {0, 1}


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
def test_tiny_temperature_samples_among_the_top_logits(temperature):
    """logits / T overflowing float32 (NaN probabilities before) gives T's limit: an even draw
    among the tied top logits, never another token."""
    logits = torch.tensor([[3.0, 2.9, 0.0, 3.0, -1.0], [1.0, 5.0, 0.0, -2.0, 4.99]])
    s = Sampler(EOS)
    seqs = [seq(temperature=temperature, seed=1, repetition_penalty=1.0),
            seq(temperature=temperature, seed=2, repetition_penalty=1.0)]
    draws = [s(logits, seqs) for _ in range(40)]
    assert {d[0] for d in draws} == {0, 3} and {d[1] for d in draws} == {1}


@pytest.mark.parametrize("temperature", [1e-39, 1e-45])
def test_tiny_temperature_with_only_negative_logits_samples_the_top_one(temperature):
    """Every logit negative: logits / T overflows to -inf everywhere (NaN probabilities, a
    failed request) - the same limit applies."""
    s = Sampler(EOS)
    sq = seq(temperature=temperature, seed=3, repetition_penalty=1.0)
    assert {s(torch.tensor([[-1.0, -2.0, -3.0, -0.5]]), [sq])[0] for _ in range(10)} == {3}


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_an_allowed_set_that_min_new_tokens_empties_stays_the_allowed_set(temperature):
    """allowed_token_ids=[eos] before min_new_tokens: every logit is -inf after the EOS ban;
    greedy took id 0 (outside the set) and sampling failed. As transformers' prefix constraint,
    the allowed ids get 0: the token is EOS."""
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(4))
    s = Sampler(EOS)
    only_eos = seq(temperature=temperature, seed=5, repetition_penalty=1.0, allowed_token_ids=[EOS], min_new_tokens=1)
    more = seq(temperature=temperature, seed=6, repetition_penalty=1.0, allowed_token_ids=[EOS, 9], min_new_tokens=1)
    assert s(logits, [only_eos, more]) == [EOS, 9]
    assert int(process_logits(logits[0], only_eos, EOS).argmax()) == EOS  # beam search's path


@pytest.mark.parametrize("seed", [-2 ** 63, -1, 2 ** 64 - 1])
def test_any_64_bit_seed_samples_reproducibly(seed):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0))
    def run() -> list[int]:
        s, sq = Sampler(EOS), seq(temperature=1.0, seed=seed, repetition_penalty=1.0)
        return [s(logits, [sq])[0] for _ in range(12)]
    first = run()
    assert first == run() and len(set(first)) > 1


def test_min_new_tokens_bans_eos_only():
    logits = torch.zeros(12)
    logits[EOS] = 10.0
    logits[9] = 8.0
    s = seq(min_new_tokens=2, stop_token_ids=[[7, 9], [11]], repetition_penalty=1.0)
    out = process_logits(logits, s, EOS)
    assert out[EOS] == -float("inf") and int(torch.argmax(out)) == 9
    assert torch.isfinite(out[torch.arange(12) != EOS]).all()  # like transformers: only EOS
    s.append_token(7)
    assert int(torch.argmax(process_logits(logits, s, EOS))) == 9
    s.append_token(3)  # two outputs: minimum reached
    assert int(torch.argmax(process_logits(logits, s, EOS))) == EOS
    ig = seq(min_new_tokens=2, ignore_eos=True, repetition_penalty=1.0)
    assert int(torch.argmax(process_logits(logits, ig, EOS))) == EOS  # ignore_eos: EOS is just a token


def test_min_new_tokens_matches_transformers_processor():
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(1))
    for n_out in range(4):
        s = seq(min_new_tokens=2, repetition_penalty=1.0, out=[5] * n_out)
        hf = MinNewTokensLengthLogitsProcessor(0, 2, EOS)(torch.tensor([[5] * n_out]), logits.clone())[0]
        torch.testing.assert_close(process_logits(logits[0], s, EOS), hf)


def test_stop_token_ids_do_not_end_before_min_new_tokens(tokenizer):
    s = seq(stop=[], stop_token_ids=[[11]], min_new_tokens=2)
    chk = StopChecker(tokenizer, s, EOS)
    s.append_token(11)
    assert chk.update() is None
    s.append_token(11)
    assert chk.update() == "stop"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.5)])
def test_seeded_batch_equals_alone(temperature, top_k, top_p):
    V, steps = 64, 8
    seeds = [3, 3, 11, 42]
    gen = torch.Generator().manual_seed(0)
    step_logits = [torch.randn(len(seeds), V, generator=gen) * 2 for _ in range(steps)]
    for lg in step_logits:
        lg[1] = lg[0]

    def run(rows):
        sampler = Sampler(EOS)
        seqs = [seq(temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds[r], repetition_penalty=1.2)
                for r in rows]
        for t in range(steps):
            toks = sampler(step_logits[t][rows], seqs)
            for s_, tok in zip(seqs, toks):
                s_.append_token(tok)
        return [s_.output_token_ids for s_ in seqs]

    batched = run([0, 1, 2, 3])
    alone = [run([r])[0] for r in range(4)]
    assert batched == alone
    assert batched[0] == batched[1]  # same seed, same logits
    assert len({tuple(x) for x in batched}) > 1


# --- stop detection --------------------------------------------------------------------------
def feed(tokenizer, text, **params):
    ids = tokenizer.encode(text).ids
    s = seq(**params)
    chk = StopChecker(tokenizer, s, eos_token_id=tokenizer.token_to_id("</s>"))
    reason, pieces = step_through(s, chk, ids)
    return s, chk, reason, pieces, ids


def step_through(s, chk, ids) -> tuple[str | None, list[str]]:
    """Append ``ids`` one by one, checking and streaming after each: (finish reason, deltas)."""
    pieces, reason = [], None
    for t in ids:
        s.append_token(t)
        reason = chk.update()
        pieces.append(chk.delta(reason is not None))
        if reason:
            break
    return reason, pieces


@pytest.mark.parametrize("text,answer", [
    ("the cat sat###on the mat", "the cat sat"),
    ("hello # world ## cat ### dog", "hello # world ## cat "),
    ("###", ""),
    ("héllo wörld#### x", "héllo wörld"),
])
def test_stop_string_across_token_boundaries(tokenizer, text, answer):
    s, chk, reason, pieces, ids = feed(tokenizer, text)
    assert reason == "stop"
    assert chk.text == answer
    assert "".join(pieces) == answer  # streamed pieces never leak part of the stop string
    assert tokenizer.decode(s.output_token_ids) .find("###") >= 0


def test_stop_string_spanning_several_tokens_is_split(tokenizer):
    ids = tokenizer.encode("cat ###").ids
    hashes = [tokenizer.decode([i]) for i in ids]
    assert "###" not in hashes  # the stop string really is spread over tokens


def test_no_stop_runs_to_max_new_tokens(tokenizer):
    s, chk, reason, pieces, ids = feed(tokenizer, "the cat sat on the mat", max_new_tokens=4)
    assert reason == "length" and s.num_output_tokens == 4
    assert "".join(pieces) == chk.text == tokenizer.decode(ids[:4])


def test_stop_ignored_before_min_new_tokens(tokenizer):
    text = "### the cat"
    n = len(tokenizer.encode(text).ids)
    s, chk, reason, pieces, ids = feed(tokenizer, text, min_new_tokens=n, max_new_tokens=n)
    assert reason == "length" and chk.text == text


@pytest.mark.parametrize("stops", [["a"], ["###", "a"], ["###", "a", "qqqqqqqqqq"]])
def test_a_stop_seen_before_min_new_tokens_does_not_end_the_answer_later(tokenizer, stops):
    """An "a" in "the cat sat" below min_new_tokens stood; adding a 10-character stop string (whose
    look-back reached back over it) ended the answer at the next token without any new "a"."""
    text = "the cat sat on the mat"
    ids = tokenizer.encode(text).ids
    n = len(tokenizer.encode("the cat sat").ids)
    s, chk, reason, pieces, _ = feed(tokenizer, text, stop=stops, min_new_tokens=n, max_new_tokens=len(ids))
    first_new_a = tokenizer.decode(s.output_token_ids).find("a", len(tokenizer.decode(ids[:n - 1])))
    assert reason == "stop" and chk.stop_string == "a"
    assert chk.text == text[:first_new_a] == "".join(pieces)


def test_eos_and_stop_token_ids(tokenizer):
    eos = tokenizer.token_to_id("</s>")
    s = seq(stop=[], stop_token_ids=[[5, 6]])
    chk = StopChecker(tokenizer, s, eos)
    for t, want in [(7, None), (5, None), (6, "stop")]:
        s.append_token(t)
        assert chk.update() == want
    s = seq()
    chk = StopChecker(tokenizer, s, eos)
    s.append_token(eos)
    assert chk.update() == "stop"
    s = seq(ignore_eos=True, max_new_tokens=2)
    chk = StopChecker(tokenizer, s, eos)
    s.append_token(eos)
    assert chk.update() is None
    s.append_token(eos)
    assert chk.update() == "length"


@pytest.mark.parametrize("stop", [[], ["zz"]])
def test_deltas_join_to_the_text_when_a_byte_run_turns_invalid(tmp_path_factory, stop):
    """The LLaMA tokenizer's byte-fallback tokens decode together: "j", "&", "&" stream as text
    until a stray continuation byte (0xA6) makes the run invalid UTF-8 and every byte of it
    becomes U+FFFD. The run's text is held back until it is followed by a normal token (or the
    end), so the streamed deltas join to exactly the final text."""
    from stllm_engine.testing.tokenizers import write_llama_tokenizer
    from stllm_engine.tokenizers import load_llama_tokenizer

    tok = load_llama_tokenizer(write_llama_tokenizer(tmp_path_factory.mktemp("tok")))
    bytes_ = tok.convert_tokens_to_ids(["<0x6A>", "<0x26>", "<0x26>", "<0xA6>"])
    word = tok("hello", add_special_tokens=False).input_ids
    for outs in (bytes_ + [tok.eos_token_id], bytes_ + word + bytes_[:2] + word):
        s = seq(stop=stop, stop_token_ids=[], max_new_tokens=len(outs), repetition_penalty=1.0)
        chk = StopChecker(tok, s, tok.eos_token_id)
        _, pieces = step_through(s, chk, outs)
        assert "".join(pieces) == chk.text and "\ufffd" in chk.text
