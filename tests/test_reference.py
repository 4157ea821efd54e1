"""End-to-end reference ST-LLM on tiny real checkpoints of every variant (eva/btadapter x projector)."""
import pytest
import torch

from stllm_engine.prompts import CHAT_SYSTEM, chat_prompt, mvbench_prompt_segments, mvbench_question
from stllm_engine.reference import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint

VARIANTS = [(vit, vi) for vit in ("eva", "btadapter") for vi in ("all", "mean", "residual")]
Q1, Q2 = "What colour is the ball?", "How many times does the red star flash?"
S = 56  # tiny preset image size


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("ref_ckpts"), {}

    def get(vit="eva", video_input="all", **overrides):
        key = (vit, video_input, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "_".join([vit, video_input] + [f"{k}{v}" for k, v in sorted(overrides.items())])
            cache[key] = write_tiny_checkpoint(root / name, vit=vit, video_input=video_input, seed=len(cache),
                                               **overrides)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def models(folders):
    cache = {}

    def get(vit="eva", video_input="all", **overrides):
        key = (vit, video_input, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = ReferenceSTLLM.from_pretrained(folders(vit, video_input, **overrides))
        return cache[key]
    return get


def frames(T=4, seed=0):
    return torch.randn(T, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vit,video_input", VARIANTS)
def test_answer_every_variant(models, vit, video_input):
    m = models(vit, video_input)
    assert m.variant == f"{vit}/{video_input}"
    a1 = m.answer(frames(), Q1, max_new_tokens=6)
    a2 = m.answer(frames(), Q1, max_new_tokens=6)
    assert isinstance(a1, str) and a1 == a2  # greedy is deterministic
    beams = m.answer(frames(), Q1, max_new_tokens=4, num_beams=2)
    assert isinstance(beams, str)


@pytest.mark.parametrize("vit,video_input", VARIANTS)
@pytest.mark.parametrize("T", [4, 5])
def test_encode_video_shapes(models, vit, video_input, T):
    m = models(vit, video_input)
    q, h = m.config.qformer.num_query_tokens, m.config.llm.hidden_size
    n = {"all": T * q, "mean": q, "residual": m.config.residual_size * q}[video_input]
    tokens = m.encode_video(frames(T), Q1)
    assert tokens.shape == (n, h) and torch.isfinite(tokens).all()


def test_question_changes_video_tokens(models):
    """Instruction-aware Q-Former: the question text changes the visual tokens."""
    m = models("eva", "all")
    f = frames()
    a, b = m.encode_video(f, Q1), m.encode_video(f, Q2)
    assert torch.equal(a, m.encode_video(f, Q1))
    assert (a - b).abs().max() > 1e-4


def test_too_few_frames_for_global_local(models):
    m = models("eva", "residual")
    with pytest.raises(ValueError, match="at least 4 frames"):
        m.encode_video(frames(2), Q1)


def test_chat_inputs_embeds_layout(models):
    m = models("eva", "mean")
    video = m.encode_video(frames(), Q1)
    emb = m.chat_inputs_embeds(video, Q1)[0]
    ids = m.llama_tokenizer(chat_prompt(Q1), add_special_tokens=False).input_ids
    assert emb.shape[0] == video.shape[0] + 1 + len(ids)
    torch.testing.assert_close(emb[: video.shape[0]], video)
    # the release's BOS is "</s>" (qformer_text_input special-token setup), then the prompt text
    assert m.prompt_bos_id == m.llama_tokenizer.convert_tokens_to_ids("</s>")
    torch.testing.assert_close(emb[video.shape[0]:], m.embed_tokens([m.prompt_bos_id] + ids))
    assert m.llama_tokenizer.decode(ids).startswith(CHAT_SYSTEM.strip()[:20])


def test_mvbench_inputs_layout_and_answer(models):
    m = models("btadapter", "mean")
    q = mvbench_question("What is it?", ["red ball", "blue box"])
    video = torch.randn(10, m.config.llm.hidden_size)
    emb = m.mvbench_inputs_embeds(video, q)[0]
    before, after = mvbench_prompt_segments(q)
    ids_b = [m.prompt_bos_id] + m.llama_tokenizer(before, add_special_tokens=False).input_ids
    ids_a = m.llama_tokenizer(after, add_special_tokens=False).input_ids
    torch.testing.assert_close(emb, torch.cat([m.embed_tokens(ids_b), video, m.embed_tokens(ids_a)]))
    pred = m.mvbench_answer(frames(), "What is it?", ["red ball", "blue box"])
    assert pred.startswith("(") and "\n" not in pred


def test_greedy_scores_and_logits(models):
    m = models("eva", "all")
    g = m.generate_ids(frames(), Q1, max_new_tokens=5, output_scores=True)
    steps = len(g.token_ids)
    assert g.scores.shape == g.logits.shape == (steps, m.config.llm.vocab_size)
    assert g.scores.argmax(-1).tolist() == g.token_ids
    assert not torch.equal(g.scores, g.logits)  # repetition penalty / min length act on scores


def _manual_greedy(m, embeds, max_new, penalty, stops, eos):
    """Plain no-cache greedy loop with the release's processors (penalty on generated ids only)."""
    out = []
    for step in range(max_new):
        x = torch.cat([embeds[0], m.embed_tokens(out)]) if out else embeds[0]
        logits = m.llm(inputs_embeds=x[None]).logits[0, -1].float()
        for t in set(out):
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        if step == 0:
            logits[eos] = -float("inf")  # min_length 1
        out.append(int(logits.argmax()))
        if out[-1] == eos or any(out[-len(s):] == s for s in stops):
            break
    return out


@pytest.mark.parametrize("vit,video_input", [("eva", "all"), ("btadapter", "residual")])
def test_generate_matches_manual_greedy_loop(models, vit, video_input):
    m = models(vit, video_input)
    with torch.no_grad():
        embeds = m.chat_inputs_embeds(m.encode_video(frames(), Q2), Q2)
        want = _manual_greedy(m, embeds, 8, 1.5, m.stop_sequences, m.config.llm.eos_token_id)
    assert m.generate_ids(frames(), Q2, max_new_tokens=8).token_ids == want


class ScriptedHead(torch.nn.Module):
    """lm_head that makes greedy decoding emit ``script`` (one id per forward call)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, h):
        logits = torch.full((*h.shape[:-1], self.vocab), -1e4, dtype=h.dtype)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("text,first,want", [
    ("Assistant: red ball ### more words", None, "red ball"),
    ("the ball###Human: next", None, "the ball"),  # in-word "###" encoding
    ("a cat", 1, "a cat"),  # leading <s> dropped; ends at the scripted EOS
])
def test_scripted_stop_and_postprocess(models, text, first, want, num_beams):
    m = models("eva", "mean")
    tok, eos = m.llama_tokenizer, m.config.llm.eos_token_id
    ids = tok(text, add_special_tokens=False).input_ids
    script = ([first] if first is not None else []) + ids + [eos]
    head, m.llm.lm_head = m.llm.lm_head, ScriptedHead(script, m.config.llm.vocab_size)
    try:
        kw = dict(max_new_tokens=len(script) + 3, repetition_penalty=1.0, num_beams=num_beams)
        g = m.generate_ids(frames(), Q1, **kw)
        m.llm.lm_head.calls = 0
        ans = m.answer(frames(), Q1, **kw)
    finally:
        m.llm.lm_head = head
    if "###" in text:  # generation stops right after the stop sequence
        assert any(g.token_ids[-len(s):] == s for s in m.stop_sequences)
        assert len(g.token_ids) < len(script)
    else:
        assert g.token_ids == script
    assert ans == want


def test_left_truncation(models):
    m = models("eva", "mean", llm_max_position_embeddings=64)
    embeds = torch.randn(1, 100, m.config.llm.hidden_size)
    g = m.generate_from_embeds(embeds, max_new_tokens=4, repetition_penalty=1.0)
    assert g.prompt_length == 60  # min(2000, 64) - 4
    assert m.generate_from_embeds(embeds[:, 40:], max_new_tokens=4, repetition_penalty=1.0).token_ids == g.token_ids
    short = m.generate_from_embeds(embeds[:, :30], max_new_tokens=4, repetition_penalty=1.0)
    assert short.prompt_length == 30
    with pytest.raises(ValueError, match="max_new_tokens must be in 1..63"):
        m.generate_from_embeds(embeds, max_new_tokens=64)


def test_video_inputs_validated(models):
    m = models("eva", "all")
    with pytest.raises(ValueError, match="num_frames=8"):
        m.answer(frames(4), Q1, num_frames=8, max_new_tokens=2)
    with pytest.raises(ValueError, match="frames must be a tensor"):
        m.encode_video(torch.randn(4, 3, S + 14, S + 14), Q1)

    class Frames:  # anything with a .frames tensor (VideoFrames) is accepted
        def __init__(self, f):
            self.frames = f
    assert m.answer(Frames(frames()), Q1, max_new_tokens=3) == m.answer(frames(), Q1, max_new_tokens=3)


def test_from_pretrained_explicit_qformer_tokenizer_and_dtype(folders):
    folder = folders("eva", "all")
    m = ReferenceSTLLM.from_pretrained(folder, dtype=torch.bfloat16, qformer_tokenizer=folder / "qformer_tokenizer")
    assert m.dtype == torch.bfloat16 and m.vision.vit.embeddings.class_embedding.dtype == torch.bfloat16
    tokens = m.encode_video(frames(), Q1)
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens.float()).all()


def test_sampling_is_seeded(models):
    m = models("eva", "all")
    kw = dict(max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.0)
    a = m.generate_ids(frames(), Q1, seed=3, **kw).token_ids
    assert a == m.generate_ids(frames(), Q1, seed=3, **kw).token_ids
    draws = {tuple(m.generate_ids(frames(), Q1, seed=s, **kw).token_ids) for s in range(4)}
    assert len(draws) > 1  # sampling really samples (random tiny weights give flat distributions)
