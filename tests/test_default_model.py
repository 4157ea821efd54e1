"""The shipped default model (``stllm_engine/assets``): files, loading, the sample's answer, and
held-out accuracy far above chance (scripts/train_default_model.py trains and ships it)."""
import json
from pathlib import Path

import pytest
import torch

from stllm_engine.default_model import ASSETS, default_model, sample_question, sample_video

MODEL = ASSETS / "default_model"
HELDOUT = Path(__file__).parent / "data" / "default_model_heldout"


@pytest.fixture(scope="module")
def sample():
    return json.loads((ASSETS / "sample.json").read_text())


@pytest.fixture(scope="module")
def reference():
    from stllm_engine.reference import ReferenceSTLLM

    return ReferenceSTLLM.from_pretrained(MODEL)


def test_shipped_files_official_layout():
    from stllm_engine.weights import load_checkpoint

    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "qformer_tokenizer"} <= names
    assert not any(n.endswith(".bin") or n.startswith("trainer_state") for n in names)
    assert (MODEL / "qformer_tokenizer" / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size < 8 << 20, f"default model is {size / 2**20:.1f} MiB"
    ckpt = load_checkpoint(MODEL, progress=False)  # strict: exactly the expected keys
    assert ckpt.variant == "eva/all" and not ckpt.ignored_keys
    assert not any(k.startswith("mvm_decoder.") for k in ckpt.state_dict)
    assert not ckpt.config.mvm_decoder and ckpt.config.num_frames == 8


def test_default_model_and_sample_are_found(sample):
    from importlib.resources import files

    from stllm_engine.video import probe

    dm = default_model()
    assert dm.trained and dm.path == MODEL
    assert sample_video() == ASSETS / "sample.mp4"
    assert sample_question() == sample and sample["question"] and sample["expected"]
    n, fps = probe(sample_video())
    assert n == 16 and fps == 8
    # what setup.py's package_data ("assets/**/*") ships, as the installed package sees it
    pkg = files("stllm_engine")
    for rel in ("assets/sample.mp4", "assets/sample.json", "assets/default_model/config.json",
                "assets/default_model/model.safetensors",
                "assets/default_model/qformer_tokenizer/tokenizer.json"):
        assert pkg.joinpath(rel).is_file(), rel


def test_reference_answers_the_sample(reference, sample):
    assert reference.answer(str(sample_video()), sample["question"]) == sample["expected"]


def test_engine_answers_the_sample(sample):
    from stllm_engine.api import STLLM

    llm = STLLM.from_pretrained(MODEL, dtype="float32")
    assert llm.answer(str(sample_video()), sample["question"]) == sample["expected"]


def test_cli_default_question_and_video(capsys, sample):
    from stllm_engine.cli import main

    assert main(["answer", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == sample["question"] and out["model"] == str(MODEL)
    assert out["text"] == sample["expected"]


def test_heldout_temporal_chat_accuracy_far_above_chance(reference):
    """Chat path (answers in words, what the CLI uses), greedy, on the first 12 held-out Flash Count
    and Appearance Order clips. (MVBench-format letter answers are at chance: see
    benchmarks/results/default_model.md.)"""
    from stllm_engine.datasets.chat import chat_answer
    from stllm_engine.evaluation import load_items

    items = load_items(HELDOUT)
    assert len(items) == 24 and {i.task for i in items} == {"Flash Count", "Appearance Order"}
    right = {"Flash Count": 0, "Appearance Order": 0}
    with torch.no_grad():
        for i in items:
            got = reference.answer(str(i.video_path), i.question, max_new_tokens=20)
            right[i.task] += got == chat_answer(i.task, i.question, i.answer)
    chance = (1 / 4 + 1 / 3) / 2  # four flash counts, three shapes to appear first
    accuracy = sum(right.values()) / len(items)
    assert accuracy >= 0.6 and accuracy >= 2 * chance, right


def test_results_table_names_the_shipped_model(sample):
    """benchmarks/results/default_model.md marks exactly one row shipped: the run sample.json names."""
    table = (Path(__file__).parent.parent / "benchmarks" / "results" / "default_model.md").read_text()
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    shipped = [n for n in names if n.endswith("(shipped)")]
    assert shipped == [f"{sample['model']} (shipped)"], shipped
