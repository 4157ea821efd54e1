"""Round trips of tiny checkpoints through the official layout, variants, dtypes, key sets."""
from __future__ import annotations

import pytest
import torch

from stllm_engine.config import STLLMConfig
from stllm_engine.testing.checkpoints import make_config, random_state_dict, write_tiny_checkpoint
from stllm_engine.weights import Checkpoint, CheckpointError, expected_keys, expected_shapes, load_checkpoint

P = "model.stllm_model."
VE = P + "visual_encoder."
QB = P + "Qformer.bert."
LAYOUTS = [("bin", 1), ("bin", 3), ("safetensors", 1), ("safetensors", 2)]


def _assert_same(loaded: dict, written: dict) -> None:
    assert loaded.keys() == written.keys()
    for k, v in written.items():
        assert loaded[k].dtype == v.dtype, k
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("fmt,shards", LAYOUTS)
@pytest.mark.parametrize("video_input", ["all", "mean", "residual"])
@pytest.mark.parametrize("vit", ["eva", "btadapter"])
def test_round_trip_every_variant(tmp_path, vit, video_input, fmt, shards):
    folder = write_tiny_checkpoint(tmp_path / "ck", vit=vit, video_input=video_input, seed=3,
                                   fmt=fmt, shards=shards)
    ck = load_checkpoint(folder)
    assert isinstance(ck, Checkpoint) and ck.folder == folder
    assert ck.variant == f"{vit}/{video_input}"
    assert ck.vit == vit and ck.video_input == video_input
    assert ck.config == STLLMConfig.load(folder)
    assert ck.state_dict.keys() == expected_keys(ck.config)
    written = random_state_dict(ck.config, seed=3)
    written.pop(QB + "embeddings.position_ids")  # derivable buffer: dropped by the loader
    _assert_same(ck.state_dict, written)
    assert ck.ignored_keys == (QB + "embeddings.position_ids",)
    files = sorted(p.name for p in folder.iterdir())
    if shards == 1:
        assert ("pytorch_model.bin" if fmt == "bin" else "model.safetensors") in files
    else:
        stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
        for i in range(1, shards + 1):
            assert f"{stem}-{i:05d}-of-{shards:05d}.{ext}" in files
        assert f"{'pytorch_model.bin' if fmt == 'bin' else 'model.safetensors'}.index.json" in files
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert name in files
    assert (folder / "qformer_tokenizer" / "tokenizer_config.json").is_file()


def test_shards_are_balanced_and_cover_all_keys(tmp_path):
    import json
    folder = write_tiny_checkpoint(tmp_path, shards=4)
    wm = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) == 4
    ck = load_checkpoint(folder)
    assert set(wm) == set(ck.state_dict) | set(ck.ignored_keys)


@pytest.mark.parametrize("stored,requested,expect", [
    (torch.float16, None, torch.float16),
    (torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float16),
    (torch.float32, "bfloat16", torch.bfloat16),
    (torch.bfloat16, "torch.float32", torch.float32),
])
def test_dtype_mapping(tmp_path, stored, requested, expect):
    folder = write_tiny_checkpoint(tmp_path, dtype=stored, fmt="safetensors")
    ck = load_checkpoint(folder, dtype=requested)
    assert {v.dtype for v in ck.state_dict.values()} == {expect}
    assert ck.config.torch_dtype == str(expect).removeprefix("torch.")
    ref = random_state_dict(ck.config, seed=0, dtype=stored)
    for k, v in ck.state_dict.items():
        assert torch.equal(v, ref[k].to(expect)), k


@pytest.mark.parametrize("bad", [torch.int8, "float8", "half-ish"])
def test_bad_dtype_rejected(tmp_path, bad):
    folder = write_tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(folder, dtype=bad)


def test_mvm_decoder_dropped_unless_asked(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, mvm_decoder=True)
    mvm = {P + "mvm_decoder.head.weight", P + "mvm_decoder.head.bias",
           P + "mvm_decoder.norm.weight", P + "mvm_decoder.norm.bias"}
    ck = load_checkpoint(folder)
    assert not ck.config.mvm_decoder and not mvm & ck.state_dict.keys()
    assert mvm <= set(ck.ignored_keys)
    ck = load_checkpoint(folder, mvm_decoder=True)
    assert ck.config.mvm_decoder and mvm <= ck.state_dict.keys()
    h = ck.config.llm.hidden_size
    assert ck.state_dict[P + "mvm_decoder.head.weight"].shape == (h, h)


def test_video_input_override(tmp_path):
    res = write_tiny_checkpoint(tmp_path / "res", vit="btadapter", video_input="residual")
    ck = load_checkpoint(res, video_input="all")
    assert ck.variant == "btadapter/all"
    assert not any(k.startswith((P + "up_proj", P + "down_proj")) for k in ck.state_dict)
    assert P + "up_proj.weight" in ck.ignored_keys
    assert load_checkpoint(res, video_input="mean").variant == "btadapter/mean"
    plain = write_tiny_checkpoint(tmp_path / "all")
    assert load_checkpoint(plain, video_input="mean").variant == "eva/mean"
    with pytest.raises(CheckpointError, match="up_proj"):
        load_checkpoint(plain, video_input="residual")
    with pytest.raises(ValueError, match="video_input"):
        load_checkpoint(plain, video_input="concat")


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_shapes(tmp_path, kv_heads):
    folder = write_tiny_checkpoint(tmp_path, llm_num_kv_heads=kv_heads)
    ck = load_checkpoint(folder)
    d = ck.config.llm.head_dim
    assert ck.config.llm.num_kv_heads == kv_heads
    assert ck.state_dict["model.layers.1.self_attn.k_proj.weight"].shape == (kv_heads * d, 64)
    assert ck.state_dict["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)


def test_size_overrides_and_unknown_override(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, vision_image_size=28, vision_width=60, vision_num_heads=5,
                                   qformer_num_layers=3, qformer_num_query_tokens=8, num_frames=4)
    c = load_checkpoint(folder).config
    assert (c.vision.num_tokens, c.vision.head_dim, c.qformer.num_layers, c.num_frames) == (5, 12, 3, 4)
    with pytest.raises(TypeError, match="vision_widht"):
        write_tiny_checkpoint(tmp_path / "x", vision_widht=60)


def test_expected_keys_release_names_and_shapes():
    c = make_config("btadapter", "residual", mvm_decoder=True)
    s = expected_shapes(c)
    w, q, h = c.vision.width, c.qformer.hidden_size, c.llm.hidden_size
    assert s[VE + "cls_token"] == (1, 1, w)
    assert s[VE + "pos_embed"] == (1, c.vision.num_tokens, w)
    assert s[VE + "patch_embed.proj.weight"] == (w, 3, 14, 14)
    assert s[VE + "blocks.2.attn.qkv.weight"] == (3 * w, w)
    assert s[VE + "blocks.0.attn.q_bias"] == s[VE + "blocks.0.attn.v_bias"] == (w,)
    assert VE + "blocks.0.attn.qkv.bias" not in s  # EVA: qkv without bias, q_bias/v_bias instead
    assert s[VE + "blocks.1.mlp.fc1.weight"] == (c.vision.mlp_dim, w)
    assert s[VE + "BTAdapter_cls"] == (1, 1, w)
    assert s[VE + "BTAdapter_position.weight"] == (64, w)
    assert s[VE + "BTAdapter_T.1.temporal_fc.weight"] == (w, w)
    assert s[VE + "BTAdapter_T.0.norm1.bias"] == (w,)
    assert VE + "BTAdapter_T.0.norm2.weight" not in s and VE + "BTAdapter_T.0.mlp.fc1.weight" not in s
    assert s[VE + "BTAdapter_S.1.mlp.fc2.weight"] == (w, c.vision.mlp_dim)
    assert VE + f"BTAdapter_S.{c.vision.btadapter_depth}.norm1.weight" not in s
    assert s[P + "ln_vision.weight"] == (w,)
    assert s[P + "query_tokens"] == (1, c.qformer.num_query_tokens, q)
    assert s[QB + "encoder.layer.0.crossattention.self.key.weight"] == (q, w)
    assert s[QB + "encoder.layer.0.crossattention.self.query.weight"] == (q, q)
    assert QB + "encoder.layer.1.crossattention.self.key.weight" not in s  # every 2nd layer
    for name in ("attention.output.LayerNorm.weight", "intermediate.dense.weight", "output.dense.bias",
                 "intermediate_query.dense.weight", "output_query.LayerNorm.bias"):
        assert QB + "encoder.layer.1." + name in s
    assert s[QB + "embeddings.word_embeddings.weight"] == (c.qformer.vocab_size, q)
    assert s[P + "llama_proj.weight"] == (h, q)
    assert s[P + "down_proj.weight"] == (c.residual_hidden, h)
    assert s[P + "up_proj.weight"] == (h, c.residual_hidden)
    assert s[P + "mvm_decoder.norm.weight"] == (h,)
    assert s["lm_head.weight"] == s["model.embed_tokens.weight"] == (c.llm.vocab_size, h)
    assert s["model.layers.1.mlp.gate_proj.weight"] == (c.llm.intermediate_size, h)
    assert "model.layers.0.self_attn.q_proj.bias" not in s


@pytest.mark.parametrize("vit,video_input,mvm,extra", [
    ("eva", "all", False, 0), ("eva", "mean", False, 0), ("eva", "residual", False, 4),
    ("eva", "all", True, 4),
])
def test_expected_key_counts(vit, video_input, mvm, extra):
    c = make_config(vit, video_input, mvm_decoder=mvm)
    n_llm = 2 + 9 * c.llm.num_layers + 1
    n_vit = 4 + 13 * c.vision.depth + 2
    n_cross = len(range(0, c.qformer.num_layers, c.qformer.cross_attention_freq))
    n_q = 1 + 4 + 10 * c.qformer.num_layers + 10 * n_cross + 12 * c.qformer.num_layers
    assert len(expected_keys(c)) == n_llm + n_vit + n_q + 2 + extra
    bt = expected_keys(make_config("btadapter", video_input, mvm_decoder=mvm)) - expected_keys(c)
    assert len(bt) == 2 + c.vision.btadapter_depth * (13 + 9)
    assert all(k.startswith(VE + "BTAdapter_") for k in bt)


def test_random_weights_are_seeded_and_sensible():
    c = make_config()
    a, b, other = random_state_dict(c, 0), random_state_dict(c, 0), random_state_dict(c, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], other["lm_head.weight"])
    ln = a[P + "ln_vision.weight"]
    assert (ln - 1).abs().max() < 0.2 and ln.std() > 0
    assert 0.01 < a["model.layers.0.mlp.up_proj.weight"].std() < 0.3
    assert a[VE + "blocks.0.attn.q_bias"].abs().max() < 0.2


def test_rewrite_replaces_earlier_weights(tmp_path):
    write_tiny_checkpoint(tmp_path, fmt="safetensors", shards=3, seed=1)
    write_tiny_checkpoint(tmp_path, fmt="bin", shards=1, seed=2, video_input="mean")
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert not [n for n in names if "safetensors" in n]
    ck = load_checkpoint(tmp_path)
    assert ck.variant == "eva/mean"
    assert torch.equal(ck.state_dict["lm_head.weight"], random_state_dict(ck.config, 2)["lm_head.weight"])


SPLITS = [(sizes, n) for sizes in ([4] * 7, [1, 100, 1, 1, 100, 1, 1], [1000, 1, 1, 1, 1, 1, 1], [5])
          for n in (1, 2, 3, 7) if n <= len(sizes)]


@pytest.mark.parametrize("sizes,shards", SPLITS)
def test_shard_split_keeps_order_and_fills_every_shard(sizes, shards):
    from stllm_engine.weights.writer import _split
    keys = [f"k{i}" for i in range(len(sizes))]
    groups = _split(keys, dict(zip(keys, sizes)), shards)
    assert len(groups) == shards and all(groups)
    assert [k for g in groups for k in g] == keys
