"""STLLMModel.from_checkpoint: official keys -> fused engine weights, dtypes, KV cache binding."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from stllm_engine.model import STLLMModel
from stllm_engine.model.convert import convert_state_dict
from stllm_engine.testing.checkpoints import make_config, random_state_dict, write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint

V = "model.stllm_model."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("loading") / "bt-res", vit="btadapter",
                                 video_input="residual", seed=2, llm_num_kv_heads=2)


def test_weights_are_fused_from_the_official_keys(folder):
    ckpt = load_checkpoint(folder, progress=False)
    sd, model = ckpt.state_dict, STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    layer = model.llm.layers[1]
    qkv = torch.cat([sd[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    gate_up = torch.cat([sd["model.layers.1.mlp.gate_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
    for ours, official in [(model.visual_encoder.blocks[2].attn, V + "visual_encoder.blocks.2.attn."),
                           (model.visual_encoder.btadapter.temporal[1].attn, V + "visual_encoder.BTAdapter_T.1.attn."),
                           (model.visual_encoder.btadapter.spatial[0].attn, V + "visual_encoder.BTAdapter_S.0.attn.")]:
        q, v = sd[official + "q_bias"], sd[official + "v_bias"]
        assert torch.equal(ours.qkv.bias, torch.cat([q, torch.zeros_like(q), v]))
        assert torch.equal(ours.qkv.weight, sd[official + "qkv.weight"])
    p = V + "Qformer.bert.encoder.layer.0."
    qf = model.qformer.layers[0]
    assert torch.equal(qf.self_attn.qkv.bias, torch.cat(
        [sd[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]))
    assert torch.equal(qf.cross_attn.kv.weight, torch.cat(
        [sd[p + f"crossattention.self.{n}.weight"] for n in ("key", "value")]))
    assert model.qformer.layers[1].cross_attn is None  # cross-attention every 2nd layer
    assert torch.equal(model.projector.up_proj.weight, sd[V + "up_proj.weight"])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(t.numel() for t in sd.values()) + sum(  # + the zero k biases
        model.visual_encoder.cfg.width for m in model.modules() if m.__class__.__name__ == "EVAAttention")


@pytest.mark.parametrize("vit", ["eva", "btadapter"])
@pytest.mark.parametrize("video_input", ["all", "mean", "residual"])
def test_every_variant_converts_exactly(vit, video_input):
    """Raw official state dicts (with the release's position_ids buffer) fill every parameter once."""
    config = make_config(vit, video_input, llm_num_kv_heads=2)
    sd = random_state_dict(config, seed=1)
    with torch.device("meta"):
        model = STLLMModel(config)
    converted = convert_state_dict(sd)
    assert model.load_state_dict(converted, strict=True, assign=True) is not None
    assert set(converted) == set(model.state_dict())


@pytest.mark.parametrize("request_dtype,expect", [(None, torch.float16), ("bfloat16", torch.bfloat16),
                                                  (torch.float32, torch.float32)])
def test_dtype(tmp_path, request_dtype, expect):
    folder = write_tiny_checkpoint(tmp_path / "fp16", dtype=torch.float16, fmt="safetensors", shards=1)
    model = STLLMModel.from_checkpoint(load_checkpoint(folder, progress=False), "cpu", request_dtype)
    assert {p.dtype for p in model.parameters()} == {expect}
    feats = model.encode_vision(torch.randn(2, 3, 56, 56))
    assert feats.dtype == expect and torch.isfinite(feats).all()


def test_bad_dtype_and_keys(folder):
    ckpt = load_checkpoint(folder, progress=False)
    with pytest.raises(ValueError, match="unsupported model dtype"):
        STLLMModel.from_checkpoint(ckpt, "cpu", torch.int8)
    with pytest.raises(ValueError, match="unsupported model dtype"):
        STLLMModel.from_checkpoint(ckpt, "cpu", "float64")
    sd = dict(ckpt.state_dict)
    sd[V + "visual_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected.*visual_encoder.extra.weight"):
        STLLMModel.from_checkpoint(replace(ckpt, state_dict=sd), "cpu", torch.float32)
    sd[V + "Qformer.cls.predictions.bias"] = torch.zeros(1)
    with pytest.raises(KeyError, match="Qformer.cls.predictions.bias"):
        convert_state_dict(sd)
    sd = dict(ckpt.state_dict)
    del sd["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="k_proj"):
        convert_state_dict(sd)


def test_consuming_conversion_frees_each_fused_part(folder):
    """``consume=True`` (STLLM.from_pretrained's load): the same weights, the source emptied, and
    no unfused q/k/v or gate/up part left alive (they held ST-LLM-7B's qkv and gate_up twice)."""
    import gc
    import weakref

    sd = load_checkpoint(folder, progress=False).state_dict
    want = convert_state_dict(dict(sd))
    parts = [weakref.ref(v) for k, v in sd.items()
             if k.endswith(("_proj.weight",)) and (".self_attn." in k or ".mlp." in k)
             and not k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(parts) == 5 * 2  # 2 LLM layers: q, k, v, gate, up
    got = convert_state_dict(sd, consume=True)
    assert sd == {} and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    gc.collect()
    assert [r() for r in parts] == [None] * len(parts)


def test_mvm_decoder_is_dropped(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "mvm", mvm_decoder=True)
    ckpt = load_checkpoint(folder, mvm_decoder=True, progress=False)
    assert any("mvm_decoder" in k for k in ckpt.state_dict)
    model = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    assert not any("mvm" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("num_blocks,block_size", [(3, 4), (7, 16)])
def test_kv_cache_binding_and_copy(folder, num_blocks, block_size):
    model = STLLMModel.from_checkpoint(load_checkpoint(folder, progress=False), "cpu", torch.float32)
    c = model.config.llm
    cache = model.allocate_kv_cache(num_blocks, block_size)
    assert cache.shape == (2, c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    for i, layer in enumerate(model.llm.layers):
        assert layer.self_attn.k_cache.data_ptr() == cache[0, i].data_ptr()
        assert layer.self_attn.v_cache.shape == (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    cache.normal_()
    before = cache.clone()
    model.copy_blocks([(0, 2), (2, 1)])  # reads happen before writes: block 1 gets the old block 2
    assert torch.equal(cache[:, :, 2], before[:, :, 0]) and torch.equal(cache[:, :, 1], before[:, :, 2])
    assert torch.equal(cache[:, :, 0], before[:, :, 0])
    with pytest.raises(ValueError, match="positive"):
        model.allocate_kv_cache(0, block_size)


def test_qformer_tokenizer_source(tmp_path):
    """A release-like folder without qformer_tokenizer/ loads; the tokenizer can be given."""
    import shutil

    folder = write_tiny_checkpoint(tmp_path / "ck")
    vocab_dir = tmp_path / "bert"
    shutil.move(str(folder / "qformer_tokenizer"), vocab_dir)
    ckpt = load_checkpoint(folder, progress=False)
    bare = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32)
    assert bare.qformer_tokenizer is None
    feats = bare.encode_vision(torch.randn(2, 3, 56, 56))
    with pytest.raises(RuntimeError, match="qformer_tokenizer"):
        bare.encode_video(feats, "why?")
    given = STLLMModel.from_checkpoint(ckpt, "cpu", torch.float32, qformer_tokenizer=vocab_dir)
    ids = given.qformer_ids("why?")
    assert ids[0].item() == given.qformer_tokenizer.cls_token_id
    torch.testing.assert_close(bare.encode_video(feats, ids), given.encode_video(feats, "why?"),
                               rtol=0, atol=0)
