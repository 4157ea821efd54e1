"""ModelRunner against the reference's transformers LlamaForCausalLM (same tiny checkpoint, same
input embeddings).

Sequences carry video embeddings + prompt ids; the runner packs them, writes the paged KV cache
through permuted block tables (block sizes 4 and 16) and must reproduce the HF logits of the full
sequence at every step: one-shot prefill, chunked prefill mixed with decodes, decode steps, and
copy-on-write forks.
"""
from __future__ import annotations

import random

import pytest
import torch

from stllm_engine.engine.model_runner import ModelRunner
from stllm_engine.engine.sequence import Sequence
from stllm_engine.model import STLLMModel
from stllm_engine.reference import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

NUM_BLOCKS = 40
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # relative to max |logit|


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # GQA (4 query heads on 2 kv heads); the rest is the tiny preset
    return write_tiny_checkpoint(tmp_path_factory.mktemp("runner") / "ckpt", vit="eva",
                                 video_input="all", seed=1, llm_num_kv_heads=2, llm_vocab_size=512)


@pytest.fixture(scope="module")
def ckpt(folder):
    return load_checkpoint(folder, progress=False)


_REFS: dict = {}


def _reference(folder, dtype) -> ReferenceSTLLM:
    if dtype not in _REFS:
        _REFS[dtype] = ReferenceSTLLM.from_pretrained(folder, dtype=dtype)
    return _REFS[dtype]


@pytest.fixture(scope="module")
def hf(folder):
    return lambda dtype: _reference(folder, dtype).llm


def _runner(ckpt, dtype, block_size) -> ModelRunner:
    model = STLLMModel.from_checkpoint(ckpt, "cpu", dtype)
    model.allocate_kv_cache(NUM_BLOCKS, block_size)
    return ModelRunner(model)


class _Blocks:
    """Hands out block ids in a random order, so block tables are permuted."""

    def __init__(self, seed: int):
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: Sequence, upto: int, block_size: int) -> None:
        while len(seq.block_table) * block_size < upto:
            seq.block_table.append(self.free.pop())


def _seq(model: STLLMModel, lv: int, n_text: int, seed: int) -> Sequence:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(lv, model.config.llm.hidden_size, generator=g) if lv else None
    ids = torch.randint(3, model.config.llm.vocab_size, (n_text,), generator=g).tolist()
    return Sequence(ids, video_embeds=video, video_key=f"v{seed}" if lv else "")


def _hf_logits(hf, model: STLLMModel, seq: Sequence, dtype) -> torch.Tensor:
    """HF logits at the last position of the whole sequence (video embeds + token embeds)."""
    parts = []
    if seq.num_video_tokens:
        parts.append(seq.video_embeds.to(dtype))
    if seq.token_ids:
        parts.append(model.embed_tokens(torch.tensor(seq.token_ids)).to(dtype))
    with torch.no_grad():
        return hf(dtype)(inputs_embeds=torch.cat(parts)[None]).logits[0, -1].float()


def _step(runner: ModelRunner, blocks: _Blocks, items):
    for seq, n in items:
        blocks.grow(seq, seq.num_computed_tokens + n, runner.block_size)
    logits = runner.run(items)
    for seq, n in items:
        seq.num_computed_tokens += n
    return logits


def _close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    tol = TOL[dtype] * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol, f"max diff {(a - b).abs().max().item()} > {tol}"


@pytest.mark.parametrize("dtype,block_size", [(torch.float32, 4), (torch.float32, 16),
                                              (torch.bfloat16, 4), (torch.float16, 16)])
def test_prefill_then_decode_matches_hf(ckpt, hf, dtype, block_size):
    runner = _runner(ckpt, dtype, block_size)
    blocks = _Blocks(seed=block_size)
    seqs = [_seq(runner.model, 6, 5, 1), _seq(runner.model, 0, 7, 2), _seq(runner.model, 9, 1, 3)]
    logits = _step(runner, blocks, [(s, s.num_tokens) for s in seqs])
    assert logits.shape == (3, ckpt.config.llm.vocab_size) and logits.dtype == torch.float32
    for _ in range(3):
        for i, s in enumerate(seqs):
            _close(logits[i], _hf_logits(hf, runner.model, s, dtype), dtype)
            s.append_token(int(logits[i].argmax()))
        logits = _step(runner, blocks, [(s, 1) for s in seqs])


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_mixed_with_decode_equals_one_shot(ckpt, hf, block_size):
    runner = _runner(ckpt, torch.float32, block_size)
    blocks = _Blocks(seed=7)
    long, other = _seq(runner.model, 10, 9, 4), _seq(runner.model, 3, 2, 5)
    first = _step(runner, blocks, [(other, other.num_tokens)])  # other is decoding from here on
    other.append_token(int(first[0].argmax()))
    chunks = [5, 1, 8, long.num_tokens - 14]  # chunk edges inside the video and the text
    for c in chunks:
        logits = _step(runner, blocks, [(long, c), (other, 1)])
        assert logits.shape[0] == (2 if long.num_computed_tokens == long.num_tokens else 1)
        other.append_token(int(logits[-1].argmax()))
    _close(logits[0], _hf_logits(hf, runner.model, long, torch.float32), torch.float32)
    one_shot = _runner(ckpt, torch.float32, block_size)
    fresh = _seq(one_shot.model, 10, 9, 4)
    ref = _step(one_shot, _Blocks(seed=8), [(fresh, fresh.num_tokens)])
    torch.testing.assert_close(logits[0], ref[0], rtol=1e-5, atol=1e-5)


def test_only_sequences_reaching_their_end_sample(ckpt):
    runner = _runner(ckpt, torch.float32, 4)
    blocks = _Blocks(seed=1)
    a, b = _seq(runner.model, 4, 6, 6), _seq(runner.model, 0, 3, 7)
    assert _step(runner, blocks, [(a, 5), (b, 3)]).shape[0] == 1  # a stops mid-prompt
    assert _step(runner, blocks, [(a, 5)]).shape[0] == 1


def test_copy_blocks_fork_matches_parent(ckpt, hf):
    runner = _runner(ckpt, torch.float32, 4)
    blocks = _Blocks(seed=3)
    parent = _seq(runner.model, 5, 5, 8)  # 10 positions: blocks 0, 1 full, block 2 half
    logits = _step(runner, blocks, [(parent, parent.num_tokens)])
    child = Sequence(parent.prompt_token_ids, video_embeds=parent.video_embeds, video_key="v8")
    child.num_computed_tokens = parent.num_computed_tokens
    last = blocks.free.pop()
    child.block_table = parent.block_table[:-1] + [last]  # shares full blocks, copies the last
    runner.copy_blocks([(parent.block_table[-1], last)])
    tok = int(logits[0].argmax())
    parent.append_token(tok), child.append_token(tok)
    out = _step(runner, blocks, [(parent, 1), (child, 1)])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    _close(out[1], _hf_logits(hf, runner.model, child, torch.float32), torch.float32)


def test_bad_steps_raise(ckpt):
    runner = _runner(ckpt, torch.float32, 4)
    seq = _seq(runner.model, 0, 6, 9)
    with pytest.raises(ValueError, match="block table"):
        runner.run([(seq, 6)])
    seq.block_table = [0, 1]
    with pytest.raises(ValueError, match="cannot compute 7"):
        runner.run([(seq, 7)])
    with pytest.raises(ValueError, match="empty batch"):
        runner.run([])
    with pytest.raises(ValueError, match="outside"):
        runner.copy_blocks([(0, NUM_BLOCKS)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_prompt_end_to_end(folder, ckpt, dtype):
    """frames + question -> engine video tokens + prompt ids -> runner, against the reference's
    own video tokens and embeddings fed to its LlamaForCausalLM; then greedy decode steps."""
    ref = _reference(folder, dtype)
    runner = _runner(ckpt, dtype, 16)
    model, blocks = runner.model, _Blocks(seed=11)
    frames = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    question = "what moves across the frame?"
    video = model.encode_video(model.encode_vision(frames), question)
    ids = ref.llama_tokenizer("###Human: " + question + " ###Assistant: ")["input_ids"]
    seq = Sequence(ids, video_embeds=video, video_key="clip")
    embeds = torch.cat([ref.encode_video(frames, question), ref.embed_tokens(ids)])
    logits = _step(runner, blocks, [(seq, seq.num_tokens)])
    for _ in range(4):
        with torch.no_grad():
            expect = ref.llm(inputs_embeds=embeds[None]).logits[0, -1].float()
        _close(logits[0], expect, dtype)
        tok = int(expect.argmax())
        seq.append_token(tok)
        embeds = torch.cat([embeds, ref.embed_tokens([tok])])
        logits = _step(runner, blocks, [(seq, 1)])


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_blocks_shared_across_turns(ckpt, hf, block_size):
    """A second turn reuses the first turn's full blocks (prefix cache): it starts with
    num_computed_tokens > 0 and must still match HF on its whole sequence."""
    runner = _runner(ckpt, torch.float32, block_size)
    blocks = _Blocks(seed=5)
    first = _seq(runner.model, 12, 8, 12)
    _step(runner, blocks, [(first, first.num_tokens)])
    follow_up = Sequence(first.prompt_token_ids + [7, 8, 9, 10, 11], video_embeds=first.video_embeds,
                         video_key="v12")
    shared = first.num_tokens // block_size  # full blocks only
    follow_up.block_table = first.block_table[:shared]
    follow_up.num_computed_tokens = shared * block_size
    logits = _step(runner, blocks, [(follow_up, follow_up.num_tokens - follow_up.num_computed_tokens)])
    _close(logits[0], _hf_logits(hf, runner.model, follow_up, torch.float32), torch.float32)
