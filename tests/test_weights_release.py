"""Release-style folders: a plain LlamaConfig config.json (no "stllm" sizes) and extra buffers."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import CheckpointError, load_checkpoint, write_checkpoint

P = "model.stllm_model."
# head dims of the release (EVA 88, BERT 64) so the head counts can be inferred from widths
RELEASE_LIKE = dict(vision_width=88, vision_num_heads=1, vision_mlp_dim=384,
                    qformer_hidden_size=64, qformer_num_heads=1)


def _strip_stllm(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("stllm")
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("vit,video_input,qlayers,freq", [
    ("eva", "all", 2, 2), ("btadapter", "residual", 4, 2), ("btadapter", "all", 3, 1),
    ("eva", "residual", 3, 3),
])
def test_sizes_and_variant_inferred_from_tensors(tmp_path, vit, video_input, qlayers, freq):
    folder = write_tiny_checkpoint(tmp_path, vit=vit, video_input=video_input, qformer_num_layers=qlayers,
                                   qformer_cross_attention_freq=freq, **RELEASE_LIKE)
    want = load_checkpoint(folder).config
    _strip_stllm(folder)
    ck = load_checkpoint(folder)
    got = ck.config
    assert ck.variant == f"{vit}/{video_input}"
    if vit == "eva":  # the branch depth means nothing without the branch
        assert got.vision == replace(want.vision, btadapter_depth=got.vision.btadapter_depth)
    else:
        assert got.vision == want.vision
    assert got.llm == want.llm
    for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_query_tokens",
              "vocab_size", "max_position_embeddings", "cross_attention_freq"):
        assert getattr(got.qformer, f) == getattr(want.qformer, f), f
    if video_input == "residual":
        assert got.residual_hidden == want.residual_hidden and got.num_frames == 64


def test_release_buffers_and_aliases_are_ignored(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, video_input="residual", **RELEASE_LIKE)
    ck = load_checkpoint(folder)
    sd = dict(ck.state_dict)
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8),
        P + "embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
        P + "residual_index": torch.arange(4),
    }
    write_checkpoint(folder, ck.config, {**sd, **extra}, shards=2)
    _strip_stllm(folder)
    again = load_checkpoint(folder)
    assert set(extra) <= set(again.ignored_keys)
    assert again.state_dict.keys() == ck.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in ck.state_dict.items())


def test_uninferable_head_count_is_a_clear_error(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, vision_width=60, vision_num_heads=5)
    _strip_stllm(folder)
    with pytest.raises(CheckpointError, match="vision head count for width 60"):
        load_checkpoint(folder)
