"""Official checkpoint keys <-> reference parameter names: every key consumed exactly once."""
import pytest
import torch

from stllm_engine.reference import KeyMappingError, ReferenceSTLLM, official_to_reference, reference_to_official
from stllm_engine.reference.keymap import VISION_PREFIX
from stllm_engine.testing.checkpoints import make_config, random_state_dict, write_tiny_checkpoint
from stllm_engine.weights import expected_keys, load_checkpoint

VARIANTS = [(vit, vi) for vit in ("eva", "btadapter") for vi in ("all", "mean", "residual")]


@pytest.mark.parametrize("vit,video_input", VARIANTS)
def test_every_official_key_consumed_once(vit, video_input):
    config = make_config(vit, video_input, mvm_decoder=True)
    sd = random_state_dict(config, seed=1)  # includes the release's Q-Former position_ids buffer
    sd[VISION_PREFIX + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()  # release alias
    mapped = official_to_reference(sd)
    used = [k for keys in mapped.source.values() for k in keys] + list(mapped.dropped)
    assert sorted(used) == sorted(sd)  # each official key exactly once
    assert set(mapped.dropped) == {VISION_PREFIX + "Qformer.bert.embeddings.position_ids",
                                   VISION_PREFIX + "embed_tokens.weight"} | {
        k for k in sd if k.startswith(VISION_PREFIX + "mvm_decoder.")}
    model = ReferenceSTLLM(config)
    own = dict(model.state_dict())
    assert set(mapped.state_dict) == set(own)  # every reference parameter filled
    for name, t in mapped.state_dict.items():
        assert t.shape == own[name].shape, name
    back = reference_to_official(mapped.state_dict)
    assert set(back) == expected_keys(config) - {k for k in sd if "mvm_decoder" in k}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("vit,video_input", [("btadapter", "residual"), ("eva", "mean")])
def test_round_trip_through_loaded_model(tmp_path, vit, video_input):
    """Real files -> load_checkpoint -> reference model -> official names: identical tensors."""
    folder = write_tiny_checkpoint(tmp_path / "ck", vit=vit, video_input=video_input, fmt="safetensors")
    ckpt = load_checkpoint(folder)
    model = ReferenceSTLLM(ckpt.config)
    model.load_official_state_dict(ckpt.state_dict)
    back = reference_to_official(model.state_dict())
    assert set(back) == set(ckpt.state_dict)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back[k], v), k


def test_unknown_and_incomplete_keys_raise():
    with pytest.raises(KeyMappingError, match="unknown checkpoint key 'model.stllm_model.foo.weight'"):
        official_to_reference({VISION_PREFIX + "foo.weight": torch.zeros(1)})
    with pytest.raises(KeyMappingError, match="unknown checkpoint key 'encoder.x'"):
        official_to_reference({"encoder.x": torch.zeros(1)})
    with pytest.raises(KeyMappingError, match="need both q_bias and v_bias"):
        official_to_reference({VISION_PREFIX + "visual_encoder.blocks.0.attn.q_bias": torch.zeros(4)})


def test_nonzero_k_bias_cannot_be_exported():
    bias = torch.ones(12)
    with pytest.raises(KeyMappingError, match="no k bias"):
        reference_to_official({"vision.vit.encoder.layers.0.self_attn.qkv.bias": bias})


def test_missing_parameter_fails_load():
    config = make_config("eva", "all")
    sd = random_state_dict(config)
    del sd[VISION_PREFIX + "ln_vision.weight"]
    with pytest.raises(KeyMappingError, match="missing.*vision.ln_vision.weight"):
        ReferenceSTLLM(config).load_official_state_dict(sd)
