"""Broken checkpoint folders fail with CheckpointError messages that name what is wrong."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from stllm_engine.testing.checkpoints import random_state_dict, write_tiny_checkpoint
from stllm_engine.weights import CheckpointError, load_checkpoint, write_checkpoint
from stllm_engine.weights.files import read_weight_file

P = "model.stllm_model."


def _rewrite(folder, mutate, **kw):
    """Load a tiny folder's tensors, mutate the dict, write it back without the config check."""
    ck = load_checkpoint(folder)
    sd = dict(ck.state_dict)
    mutate(sd)
    write_checkpoint(folder, ck.config, sd, check=False, **kw)
    return folder


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ck", shards=1)


def test_missing_key_named(tiny):
    _rewrite(tiny, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: model\.layers\.1\.mlp\.down_proj\.weight"):
        load_checkpoint(tiny)
    ck = load_checkpoint(tiny, strict=False)
    assert "model.layers.1.mlp.down_proj.weight" not in ck.state_dict


def test_missing_btadapter_key_keeps_variant(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, vit="btadapter")
    key = P + "visual_encoder.BTAdapter_T.1.temporal_fc.weight"
    _rewrite(folder, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="btadapter/all.*" + key.replace(".", r"\.")):
        load_checkpoint(folder)


def test_unexpected_key_named(tiny):
    _rewrite(tiny, lambda sd: sd.__setitem__(P + "extra_head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: model\.stllm_model\.extra_head\.weight"):
        load_checkpoint(tiny)
    ck = load_checkpoint(tiny, strict=False)
    assert P + "extra_head.weight" in ck.ignored_keys and P + "extra_head.weight" not in ck.state_dict


def test_wrong_shape_named_even_when_not_strict(tiny):
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(tiny, lambda sd: sd.__setitem__(key, torch.zeros(64, 63)))
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"shape mismatches: .*o_proj\.weight \(checkpoint \(64, 63\), "
                                                  r"expected \(64, 64\)\)"):
            load_checkpoint(tiny, strict=strict)


def test_long_key_lists_truncated_with_counts(tiny):
    def drop_layers(sd):
        for k in [k for k in sd if k.startswith("model.layers.")]:
            sd.pop(k)
    _rewrite(tiny, drop_layers)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny)
    msg = str(e.value)
    assert "18 missing keys" in msg and "(+6 more, 18 in all)" in msg
    assert "model.layers.0.input_layernorm.weight" in msg


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_corrupt_shard_named(tmp_path, fmt):
    folder = write_tiny_checkpoint(tmp_path, fmt=fmt, shards=2)
    shard = sorted(folder.glob("*-00002-of-00002.*"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=f"cannot read weight file .*{shard.name}"):
        load_checkpoint(folder)
    shard.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(folder)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    path = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1), "y": Evil()}, path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_weight_file(path)
    with open(tmp_path / "legacy.bin", "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(CheckpointError, match="legacy.bin"):
        read_weight_file(tmp_path / "legacy.bin")


def test_non_tensor_payload_refused(tmp_path):
    torch.save({"x": torch.zeros(1), "n": 3}, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        read_weight_file(tmp_path / "w.bin")


def test_index_problems(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, shards=2)
    index = folder / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "pytorch_model-00009-of-00009.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="pytorch_model-00009-of-00009.bin"):
        load_checkpoint(folder)
    data["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00002.bin"
    moved = next(k for k, v in data["weight_map"].items() if v.startswith("pytorch_model-00002"))
    data["weight_map"][moved] = "pytorch_model-00001-of-00002.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="00001-of-00002.bin holds keys it does not contain: "
                                              + moved.replace(".", r"\.")):
        load_checkpoint(folder)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="weight index"):
        load_checkpoint(folder)


def test_unindexed_shards_load_and_gaps_are_named(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, shards=3, fmt="safetensors")
    (folder / "model.safetensors.index.json").unlink()
    assert load_checkpoint(folder).variant == "eva/all"
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shards \[2\] of 3"):
        load_checkpoint(folder)


def test_duplicate_key_across_shards(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, shards=2)
    (folder / "pytorch_model.bin.index.json").unlink()
    torch.save({"lm_head.weight": torch.zeros(1)}, folder / "pytorch_model-00002-of-00002.bin")
    torch.save({"lm_head.weight": torch.zeros(1)}, folder / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(CheckpointError, match="stored twice.*lm_head.weight"):
        load_checkpoint(folder)


def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    folder = write_tiny_checkpoint(tmp_path / "ck", shards=1)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda d: [], "must hold a JSON object, got list"),
    (lambda d: 64, "must hold a JSON object, got int"),
    (lambda d: dict(d, rms_norm_eps="abc"), "rms_norm_eps must be a positive number, got 'abc'"),
    (lambda d: dict(d, rms_norm_eps=0), "rms_norm_eps must be a positive number"),
    (lambda d: dict(d, rope_theta="x"), "rope_theta"),
    (lambda d: dict(d, stllm=dict(d["stllm"], vision={"eps": None})), "eps must be a positive number"),
])
def test_config_values_are_checked_at_load(tmp_path, edit, match):
    """A config.json of the wrong shape or with a non-number eps fails at load naming the field
    (it loaded, then every request failed with 'model step failed')."""
    folder = write_tiny_checkpoint(tmp_path / "ck", shards=1)
    cfg = folder / "config.json"
    cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder)


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "ck", shards=1)
    with pytest.raises(CheckpointError, match="config.json is a file; give the checkpoint folder"):
        load_checkpoint(folder / "config.json")


def test_a_tokenizer_larger_than_the_embedding_fails_the_request_naming_it(tmp_path):
    import shutil

    from stllm_engine import STLLM, RequestFailedError
    from stllm_engine.testing.videos import write_video

    small = write_tiny_checkpoint(tmp_path / "small", shards=1, llm_vocab_size=400)
    big = write_tiny_checkpoint(tmp_path / "big", shards=1, llm_vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(big / name, small / name)
    llm = STLLM.from_pretrained(small)
    video = write_video(tmp_path / "v.mp4", num_frames=8, size=(64, 48))
    with pytest.raises(RequestFailedError, match="the LLaMA tokenizer gave id .* outside the checkpoint's "
                                                 "vocabulary \\(400 embedding rows\\)"):
        llm.answer(video, "what moves in this video, and which way does it go?", max_new_tokens=2)


def test_write_checkpoint_checks(tmp_path):
    from stllm_engine.testing.checkpoints import make_config
    c = make_config()
    sd = random_state_dict(c)
    sd.pop("lm_head.weight")
    with pytest.raises(CheckpointError, match="missing keys: lm_head.weight"):
        write_checkpoint(tmp_path, c, sd)
    with pytest.raises(ValueError, match="format"):
        write_checkpoint(tmp_path, c, random_state_dict(c), fmt="npz")
    with pytest.raises(ValueError, match="shards"):
        write_checkpoint(tmp_path, c, random_state_dict(c), shards=0)
    with pytest.raises(ValueError, match="cannot split"):
        write_checkpoint(tmp_path, c, random_state_dict(c), shards=10_000)
