"""Constrained generation (``SamplingParams.logit_bias`` / ``allowed_token_ids`` / ``choices``):
the vocabulary's byte table, the choice guide's walk, the parameter checks, and the engine against
transformers' own constrained generation (``sequence_bias``, ``prefix_allowed_tokens_fn``) on the
reference model, greedy and beam search."""
import random

import pytest
import torch

from stllm_engine.engine.guided import ChoiceGuide, TokenBytes, bias_rows, mask_rows
from stllm_engine.engine.sampler import process_batch, process_logits
from stllm_engine.engine.sequence import Sequence
from stllm_engine.reference.model import ReferenceSTLLM
from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.videos import write_video
from stllm_engine.tokenizers import load_llama_tokenizer
from stllm_engine.video import load_video

from test_engine import Q, assert_clean, make_engine, release_params, run

TEXTS = ["yes", " two of them", "The red square moves left, then stops.", "café über naïve", "日本 ok",
         "x", "A) 3\nB) 4", "  leading spaces"]
CHOICE_SETS = [["yes", "no"], ["red", "red square", "blue"], ["A", "B", "C", "D"],
               ["naïve café", "日本"], ["it moves to the left", "it moves to the right", "it stays"]]


@pytest.fixture(scope="module")
def folder(folders):
    return folders("eva", "all")


@pytest.fixture(scope="module")
def tok(folder):
    return load_llama_tokenizer(folder)


@pytest.fixture(scope="module")
def table(tok):
    return TokenBytes(tok)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=20, size=(96, 72))


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_what_the_tokenizer_decodes(tok, table, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert table.text(ids) == tok.decode(ids).encode("utf-8").lstrip()
    assert table.text(ids + [tok.eos_token_id]) == table.text(ids)  # special tokens have no bytes
    assert len(table) == len(tok)


@pytest.mark.parametrize("choices", CHOICE_SETS)
@pytest.mark.parametrize("seed", range(3))
def test_any_walk_through_the_guide_ends_as_a_choice(tok, table, choices, seed):
    """Random allowed tokens, step after step, always spell one of the choices then allow EOS."""
    rng = random.Random(seed)
    guide = ChoiceGuide(choices, table, tok.eos_token_id)
    out = []
    for _ in range(200):
        allowed = guide.allowed(out)
        assert allowed == sorted(set(allowed)) and allowed
        t = rng.choice(allowed)
        if t == tok.eos_token_id:
            break
        out.append(t)
    else:
        pytest.fail("the walk never ended")
    answer = tok.decode(out).strip()
    assert answer in [c.strip() for c in choices]
    # the tokenizer's own spelling of every choice is allowed step by step
    for c in choices:
        ids = tok.encode(c, add_special_tokens=False)
        for i in range(len(ids)):
            assert ids[i] in guide.allowed(ids[:i])
        assert tok.eos_token_id in guide.allowed(ids)


def test_a_complete_choice_that_starts_a_longer_one_allows_both(tok, table):
    guide = ChoiceGuide(["red", "red square"], table, tok.eos_token_id)
    red = tok.encode("red", add_special_tokens=False)
    allowed = guide.allowed(red)
    assert tok.eos_token_id in allowed and len(allowed) > 1
    assert guide.allowed(tok.encode("red square", add_special_tokens=False)) == [tok.eos_token_id]
    with pytest.raises(ValueError, match="no token continues any of the choices"):
        guide.allowed(tok.encode("blue", add_special_tokens=False))


@pytest.mark.parametrize("kw, needle", [
    (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
    (dict(logit_bias={"x": 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={3: 101}), r"logit_bias\[3\] must be a number in \[-100, 100\]"),
    (dict(logit_bias={3: float("nan")}), "must be a number"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids must be a non-empty list"),
    (dict(choices="yes"), "choices must be a non-empty list"),
    (dict(choices=["yes", "  "]), "non-blank"),
    (dict(choices=[]), "non-empty"),
    (dict(choices=["a"] * 1025), "at most 1024 choices"),
    (dict(choices=["a", "b"], allowed_token_ids=[1]), "cannot be combined with allowed_token_ids"),
    (dict(choices=["a", "b"], ignore_eos=True), "cannot be combined with ignore_eos"),
    (dict(choices=["a", "b"], min_new_tokens=2), "cannot be combined with min_new_tokens"),
])
def test_bad_constraints_are_named(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_json_keys_and_duplicates_are_normalised():
    p = SamplingParams(logit_bias={"12": 5, 7: -1.5}, allowed_token_ids=[9, 3, 9])
    assert p.logit_bias == {12: 5.0, 7: -1.5} and p.allowed_token_ids == [3, 9]
    assert SamplingParams(logit_bias={}).logit_bias is None


@pytest.mark.parametrize("V", [1, 7, 300])
def test_batch_processing_equals_row_by_row(table, tok, V):
    """process_batch (the engine's path) == process_logits (beam search's) on every constraint."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(5, V, generator=g) * 3
    params = [SamplingParams(logit_bias={0: 2.5, V - 1: -3.0}, repetition_penalty=1.3),
              SamplingParams(allowed_token_ids=[0, V // 2]),
              SamplingParams(),
              SamplingParams(logit_bias={V // 3: 100}, allowed_token_ids=[V // 3, V - 1], min_new_tokens=2),
              SamplingParams(repetition_penalty=0.7, logit_bias={V // 2: -100})]
    seqs = []
    for i, p in enumerate(params):
        s = Sequence([1, 2], p)
        s.output_token_ids = [i % V, (3 * i) % V]
        seqs.append(s)
    eos = V - 1
    batch = process_batch(logits.clone(), seqs, eos)
    for i, s in enumerate(seqs):
        assert torch.equal(batch[i], process_logits(logits[i].clone(), s, eos)), i
    assert torch.isinf(batch[1]).sum() == V - len({0, V // 2})


def test_bias_and_mask_helpers():
    x = torch.zeros(2, 4)
    assert torch.equal(bias_rows(x, [None, {1: 2.0, 3: -1.0}]), torch.tensor([[0, 0, 0, 0], [0, 2.0, 0, -1.0]]))
    m = mask_rows(x, [[2], None])
    assert m[0].tolist() == [-float("inf")] * 2 + [0.0, -float("inf")] and m[1].tolist() == [0.0] * 4
    assert bias_rows(x, [None, None]) is x and mask_rows(x, [None, None]) is x


@pytest.fixture(scope="module")
def ref(folder):
    return ReferenceSTLLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def frames(ref, video):
    return load_video(video, num_frames=ref.config.num_frames, size=ref.config.vision.image_size).frames


def first_step(eng, frames, k=8):
    """The unconstrained first token's top-k (token id, raw log-prob)."""
    (o,) = run(eng, [(frames, Q, SamplingParams(max_new_tokens=1, logprobs=k, repetition_penalty=1.0), {})])
    return o.logprobs[0].top


def test_logit_bias_flips_the_first_token_exactly_at_the_logit_gap(folder, frames):
    eng = make_engine(folder)
    (t1, l1), (t2, l2) = first_step(eng, frames)[:2]
    gap = l1 - l2  # log-prob gap == logit gap
    for bias, want in ((gap + 1e-3, t2), (gap - 1e-3, t1), (-100, t2)):
        target = t1 if bias == -100 else t2
        p = SamplingParams(max_new_tokens=1, repetition_penalty=1.0, logit_bias={target: bias})
        (o,) = run(eng, [(frames, Q, p, {})])
        assert o.token_ids == [want], (bias, gap)
    assert_clean(eng)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_logit_bias_and_allowed_ids_equal_transformers(folder, ref, frames, num_beams):
    eng = make_engine(folder)
    top = [t for t, _ in first_step(eng, frames, k=10)]
    bias = {top[0]: -4.0, top[3]: 2.0, top[5]: 1.5}
    allowed = sorted({top[2], top[4], top[6], ref.config.llm.eos_token_id})
    for kw, oracle in ((dict(logit_bias=bias), dict(sequence_bias=bias)),
                       (dict(allowed_token_ids=allowed), dict(prefix_allowed_tokens_fn=lambda b, ids: allowed))):
        want = ref.generate_ids(frames, Q, num_beams=num_beams, max_new_tokens=10, **oracle).token_ids
        (o,) = run(eng, [(frames, Q, release_params(ref, max_new_tokens=10, num_beams=num_beams, **kw), {})])
        assert o.token_ids == want and o.error is None, kw
        if "allowed_token_ids" in kw:
            assert set(o.token_ids) <= set(allowed)
    assert_clean(eng)


@pytest.mark.parametrize("choices", CHOICE_SETS[:3] + [["it moves to the left", "it stays"]])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_choices_equal_transformers_constrained_generation(folder, ref, frames, tok, choices, num_beams):
    eng = make_engine(folder)
    guide = ChoiceGuide(choices, TokenBytes(tok), tok.eos_token_id)
    want = ref.generate_ids(frames, Q, num_beams=num_beams, max_new_tokens=16,
                            prefix_allowed_tokens_fn=lambda b, ids: guide.allowed(ids.tolist())).token_ids
    (o,) = run(eng, [(frames, Q, release_params(ref, max_new_tokens=16, num_beams=num_beams, choices=choices), {})])
    assert o.token_ids == want and o.error is None
    assert o.finish_reason == "stop" and o.token_ids[-1] == tok.eos_token_id
    assert o.text.strip() in choices
    assert_clean(eng)


def test_guided_requests_in_a_batch_equal_each_alone(folder, video):
    reqs = [(video, Q, SamplingParams(max_new_tokens=8, choices=["yes", "no", "maybe not"]), {}),
            (video, "which color?", SamplingParams(max_new_tokens=8, choices=["red", "green"], temperature=1.0,
                                                   seed=4), {}),
            (video, Q, SamplingParams(max_new_tokens=6), {}),
            (video, "how many?", SamplingParams(max_new_tokens=6, allowed_token_ids=[5, 9, 40, 41]), {}),
            (video, "how many?", SamplingParams(max_new_tokens=6, logit_bias={40: 3.0}, temperature=0.8, seed=2), {}),
            (video, Q, SamplingParams(max_new_tokens=8, num_beams=2, choices=["left", "right"]), {})]
    batched = run(make_engine(folder, max_num_batched_tokens=32), reqs)
    alone = [run(make_engine(folder), [r])[0] for r in reqs]
    for b, a in zip(batched, alone):
        assert (b.token_ids, b.finish_reason, b.error) == (a.token_ids, a.finish_reason, a.error)
    assert batched[0].text.strip() in ("yes", "no", "maybe not") and batched[1].text.strip() in ("red", "green")
    assert set(batched[3].token_ids) <= {5, 9, 40, 41} and len(batched[3].token_ids) == 6


def test_token_ids_outside_the_vocabulary_fail_the_request_alone(folder, video):
    eng = make_engine(folder)
    V = eng.model.config.llm.vocab_size
    reqs = [(video, Q, SamplingParams(max_new_tokens=3, logit_bias={V: 1.0}), {}),
            (video, Q, SamplingParams(max_new_tokens=3, allowed_token_ids=[3, V + 5]), {}),
            (video, Q, SamplingParams(max_new_tokens=3), {})]
    a, b, c = run(eng, reqs)
    assert a.finish_reason == "error" and f"logit_bias: token id {V} is outside the vocabulary ({V} tokens)" in a.error
    assert b.finish_reason == "error" and f"allowed_token_ids: token id {V + 5}" in b.error
    assert c.error is None and len(c.token_ids) == 3
    assert_clean(eng)


def test_public_api_and_stream_take_choices(folder, video):
    from stllm_engine import STLLM

    llm = STLLM.from_pretrained(folder, warmup=False)
    choices = ["a circle", "a square", "a triangle"]
    answer = llm.answer(video, "what shape moves?", choices=choices, max_new_tokens=12)
    assert answer in choices and llm.last_output.finish_reason == "stop"
    assert "".join(llm.stream(video, "what shape moves?", choices=choices, max_new_tokens=12)).strip() == answer
    beams = llm.answer(video, "what shape moves?", choices=choices, max_new_tokens=12, num_beams=3)
    assert beams in choices
