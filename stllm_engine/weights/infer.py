"""Variant detection and config completion from a checkpoint's key names and tensor shapes.

The release's ``config.json`` is a plain LlamaConfig: it says nothing about the vision tower, the
Q-Former or the variant. Those are read off the tensors here. Checkpoints written by this project
carry an ``"stllm"`` entry with every size, so only the variant is taken from the keys.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

from ..config import STLLMConfig
from .errors import CheckpointError
from .keys import MVM_PREFIX, QFORMER_PREFIX, VIDEO_PREFIX, VIT_PREFIX

Shapes = dict[str, tuple[int, ...]]
RELEASE_VIT_HEAD_DIM = 88  # EVA ViT-g: num_heads = 1408 // 88
BERT_HEAD_DIM = 64  # BERT-base: 768 / 12


def has_btadapter(keys) -> bool:
    return any(k.startswith(VIT_PREFIX + "BTAdapter_") for k in keys)


def has_residual(keys) -> bool:
    return VIDEO_PREFIX + "up_proj.weight" in keys or VIDEO_PREFIX + "down_proj.weight" in keys


def has_mvm_decoder(keys) -> bool:
    return any(k.startswith(MVM_PREFIX) for k in keys)


def variant_name(config: STLLMConfig) -> str:
    """``"eva/all"``, ``"btadapter/residual"``, ..."""
    return f"{'btadapter' if config.vision.btadapter else 'eva'}/{config.video_input}"


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.match(k))})


def resolve_variant(config: STLLMConfig, keys, video_input: str | None,
                    keep_mvm: bool) -> STLLMConfig:
    """Set ``vision.btadapter``, ``video_input`` and ``mvm_decoder`` from the keys and arguments."""
    bt = has_btadapter(keys) or config.vision.btadapter
    vision = replace(config.vision, btadapter=bt)
    if video_input is not None:
        if video_input == "residual" and not has_residual(keys):
            raise CheckpointError("video_input='residual' requested but the checkpoint has no "
                                  f"{VIDEO_PREFIX}up_proj/down_proj (global-local) weights")
        vi = video_input
    elif has_residual(keys):
        vi = "residual"
    else:
        vi = config.video_input  # "all" unless config.json says "mean" (or a broken "residual")
    mvm = keep_mvm and (has_mvm_decoder(keys) or config.mvm_decoder)
    try:
        return replace(config, vision=vision, video_input=vi, mvm_decoder=mvm)
    except ValueError as e:
        raise CheckpointError(f"checkpoint variant is inconsistent with its config: {e}") from e


def infer_release_sizes(config: STLLMConfig, shapes: Shapes) -> STLLMConfig:
    """Fill vision / Q-Former / global-local sizes from tensor shapes (release config.json)."""
    keys = shapes.keys()
    v, q = config.vision, config.qformer
    vis: dict = {}
    pe, pw = shapes.get(VIT_PREFIX + "pos_embed"), shapes.get(VIT_PREFIX + "patch_embed.proj.weight")
    if pe is not None and pw is not None and len(pe) == 3 and len(pw) == 4:
        width, n_tok, patch = pe[2], pe[1], pw[-1]
        side = math.isqrt(max(n_tok - 1, 0))
        if side * side != n_tok - 1:
            raise CheckpointError(f"{VIT_PREFIX}pos_embed has {n_tok} tokens: not 1 + a square grid")
        vis.update(width=width, patch_size=patch, image_size=side * patch)
        if width % RELEASE_VIT_HEAD_DIM == 0:
            vis["num_heads"] = width // RELEASE_VIT_HEAD_DIM
        elif width % v.num_heads:
            raise CheckpointError(f"cannot tell the vision head count for width {width}; add "
                                  "'stllm': {'vision': {'num_heads': ...}} to config.json")
    depth = _indices(keys, re.escape(VIT_PREFIX) + r"blocks\.(\d+)\.")
    if depth:
        vis["depth"] = depth[-1] + 1
    fc1 = shapes.get(VIT_PREFIX + "blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        vis["mlp_dim"] = fc1[0]
    bt = _indices(keys, re.escape(VIT_PREFIX) + r"BTAdapter_T\.(\d+)\.")
    if bt:
        vis["btadapter_depth"] = bt[-1] + 1
    pos = shapes.get(VIT_PREFIX + "BTAdapter_position.weight")
    if pos is not None:
        vis["btadapter_max_frames"] = pos[0]

    qf: dict = {}
    qt = shapes.get(VIDEO_PREFIX + "query_tokens")
    if qt is not None and len(qt) == 3:
        hidden = qt[2]
        qf.update(num_query_tokens=qt[1], hidden_size=hidden)
        if hidden % BERT_HEAD_DIM == 0:
            qf["num_heads"] = hidden // BERT_HEAD_DIM
        elif hidden % q.num_heads:
            raise CheckpointError(f"cannot tell the Q-Former head count for hidden {hidden}; add "
                                  "'stllm': {'qformer': {'num_heads': ...}} to config.json")
    layers = _indices(keys, re.escape(QFORMER_PREFIX) + r"encoder\.layer\.(\d+)\.")
    if layers:
        qf["num_layers"] = layers[-1] + 1
        cross = _indices(keys, re.escape(QFORMER_PREFIX) + r"encoder\.layer\.(\d+)\.crossattention\.")
        if len(cross) > 1:
            qf["cross_attention_freq"] = cross[1] - cross[0]
        elif cross:
            qf["cross_attention_freq"] = max(layers[-1] + 1, 1)
    inter = shapes.get(QFORMER_PREFIX + "encoder.layer.0.intermediate_query.dense.weight")
    if inter is not None:
        qf["intermediate_size"] = inter[0]
    for name, field_ in (("word_embeddings", "vocab_size"), ("position_embeddings", "max_position_embeddings")):
        s = shapes.get(f"{QFORMER_PREFIX}embeddings.{name}.weight")
        if s is not None:
            qf[field_] = s[0]

    top: dict = {}
    down = shapes.get(VIDEO_PREFIX + "down_proj.weight")
    if down is not None:
        top["residual_hidden"] = down[0]
        top["num_frames"] = 64  # conversation_weight runs 64 frames global-local
    try:
        return replace(config, vision=replace(v, **vis), qformer=replace(q, **qf), **top)
    except ValueError as e:
        raise CheckpointError(f"tensor shapes give an invalid config: {e}") from e
