"""Chat-format training examples and the evaluation runner's ``video_tokens`` option."""
import pytest
import torch

from stllm_engine.datasets import build_dataset
from stllm_engine.datasets.chat import GENERIC_DIRECTION_QUESTION, chat_answer, chat_pairs
from stllm_engine.prompts import CHAT_SYSTEM, chat_prompt
from stllm_engine.testing.checkpoints import write_tiny_checkpoint

TASKS = ("Moving Direction", "Appearance Order", "Flash Count", "Speed Change", "Object Colour",
         "Object Shape")


@pytest.mark.parametrize("task,question,answer,want", [
    ("Moving Direction", "In which direction is the red circle moving?", "left", "The red circle moves left."),
    ("Appearance Order", "Which shape appeared first?", "the blue square", "The blue square appeared first."),
    ("Flash Count", "How many times does the green triangle flash?", "three times",
     "The green triangle flashes three times."),
    ("Speed Change", "How does the speed of the red circle change?", "It slows down", "It slows down."),
    ("Object Colour", "What colour is the triangle?", "yellow", "The triangle is yellow."),
    ("Object Shape", "What shape is the red object?", "square", "It is a square."),
])
def test_chat_answer_sentences(task, question, answer, want):
    assert chat_answer(task, question, answer) == want


def test_chat_pairs_and_errors():
    pairs = chat_pairs("Moving Direction", "In which direction is the red circle moving?", "up")
    assert pairs == [("In which direction is the red circle moving?", "The red circle moves up."),
                     (GENERIC_DIRECTION_QUESTION, "The red circle moves up.")]
    assert len(chat_pairs("Object Shape", "What shape is the red object?", "circle")) == 1
    with pytest.raises(ValueError, match="no chat answer template"):
        chat_answer("Action Count", "q?", "a")
    with pytest.raises(ValueError, match="no 'the <colour> <shape>'"):
        chat_answer("Flash Count", "How many flashes?", "once")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    data = build_dataset(root / "data", n_train=1, n_test=0, seed=3, num_frames=16, size=32)
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=0, num_frames=8, llm_num_layers=1)
    return data, ckpt


def _dataset(data, ckpt, chat):
    from stllm_engine.training.data import QADataset
    from stllm_engine.training.model import load_trainable

    model = load_trainable(ckpt)
    r = model.reference
    ds = QADataset(data, r.llama_tokenizer, r.prompt_bos_id, model.config.llm.eos_token_id,
                   model.config.num_frames, model.config.vision.image_size, chat=chat)
    return model, ds


@pytest.mark.parametrize("chat", [False, True])
def test_dataset_chat_examples(tiny, chat):
    model, ds = _dataset(*tiny, chat)
    n_items = len(TASKS)
    assert len(ds) == n_items + (n_items + 1 if chat else 0)  # + the generic direction question
    with pytest.raises(IndexError):
        ds[len(ds)]
    tok, bos, eos = ds.tokenizer, ds.bos_id, ds.eos_id
    mv = ds[0]
    assert mv.ids.before[0] == bos and mv.qformer_text.startswith("Question: ")
    if not chat:
        return
    seen = set()
    for i in range(n_items, len(ds)):
        ex = ds[i]
        item = ds.items[ds.chat[i - n_items][0]]
        assert ex.ids.before == [] and ex.task == item.task
        assert ex.ids.after == [bos] + list(tok(chat_prompt(ex.qformer_text, CHAT_SYSTEM),
                                                add_special_tokens=False).input_ids)
        assert ex.ids.target[-1] == eos
        assert tok.decode(ex.ids.target[:-1]) == chat_answer(item.task, item.question, item.answer)
        assert ex.frames.shape == (8, 3, 56, 56)
        seen.add(ex.qformer_text)
    assert GENERIC_DIRECTION_QUESTION in seen and len(seen) == n_items + 1


@pytest.mark.parametrize("mask_rate,mvm", [(None, False), (0.5, True)])
def test_mixed_chat_and_mvbench_batch_trains(tiny, mask_rate, mvm):
    from stllm_engine.training.step import assemble, forward_step

    model, ds = _dataset(*tiny, True)
    batch = [ds[0], ds[len(ds) - 1], ds[3]]  # MVBench, chat, MVBench
    a = assemble(model, batch, torch.zeros(3, 8 * model.config.qformer.num_query_tokens,
                                           model.config.llm.hidden_size))
    assert a.video_start.tolist() == [len(batch[0].ids.before), 0, len(batch[2].ids.before)]
    n_labels = (a.labels != -100).sum(1).tolist()
    assert n_labels == [len(ex.ids.target) for ex in batch]
    out = forward_step(model, batch, mask_rate, mvm, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and (out.mvm is not None) == mvm
    out.loss.backward()
    assert model.reference.llm.lm_head.weight.grad.abs().sum() > 0


def test_train_cli_chat_flag():
    from stllm_engine.training.train import parse_args

    base = ["--data", "d", "--init", "i", "--out", "o"]
    assert parse_args(base).chat is False
    assert parse_args(base + ["--chat"]).chat is True


@pytest.mark.parametrize("video_input", ["all", "mean"])
def test_eval_own_video_tokens(tmp_path, video_input, monkeypatch):
    from stllm_engine.evaluation import load_answerer

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0, num_frames=4, llm_num_layers=1,
                                 video_input=video_input)
    frames = torch.randn(4, 3, 56, 56)
    lengths = {}
    for mode in ("release", "own"):
        ans = load_answerer("reference", str(ckpt), video_tokens=mode)
        real = ans.model.llm.generate  # both paths generate through the LLM with inputs_embeds

        def spy(*args, mode=mode, real=real, **kw):
            lengths[mode] = kw["inputs_embeds"].shape[1]
            return real(*args, **kw)

        monkeypatch.setattr(ans.model.llm, "generate", spy)
        pred = ans.mvbench_answer(frames, "What moves?", ["left", "right"])
        assert pred.startswith("(")
    q = 6  # tiny preset Q-Former queries
    assert lengths["release"] - lengths["own"] == (0 if video_input == "all" else 3 * q)


def test_eval_video_tokens_errors(tmp_path):
    from stllm_engine.evaluation import load_answerer

    with pytest.raises(ValueError, match="video_tokens must be"):
        load_answerer("reference", str(tmp_path), video_tokens="some")
    with pytest.raises(ValueError, match="only implemented for the reference"):
        load_answerer("engine", str(tmp_path), video_tokens="own")
