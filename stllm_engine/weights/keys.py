"""Official state-dict key names and shapes of an ST-LLM checkpoint (one source of truth).

Names follow the public release: a ``LlamaForCausalLM`` (``model.*``, ``lm_head``) whose inner model
holds the video side under ``model.stllm_model.``: the EVA ViT (``visual_encoder``, with the
BT-Adapter branch ``BTAdapter_*`` for ``eva_btadapter_g``), ``ln_vision``, the LAVIS Q-Former
(``Qformer.bert.*``, ``query_tokens``), ``llama_proj``, global-local ``down_proj``/``up_proj`` and
the training-only ``mvm_decoder``.
"""
from __future__ import annotations

import re

from ..config import STLLMConfig

VIDEO_PREFIX = "model.stllm_model."
VIT_PREFIX = VIDEO_PREFIX + "visual_encoder."
QFORMER_PREFIX = VIDEO_PREFIX + "Qformer.bert."
MVM_PREFIX = VIDEO_PREFIX + "mvm_decoder."

# Keys the release may hold that carry no weights the engine needs (derivable buffers and an alias
# of the LLM embedding); the loader drops them instead of calling them unexpected.
IGNORABLE_KEY_PATTERNS = (
    re.compile(r"^model\.stllm_model\.Qformer\.bert\.embeddings\.position_ids$"),
    re.compile(r"^model\.stllm_model\.residual_index$"),
    re.compile(r"^model\.stllm_model\.embed_tokens\.weight$"),
    re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$"),
)


def is_ignorable(key: str) -> bool:
    """True for buffers/aliases the release may save that the engine does not need."""
    return any(p.match(key) for p in IGNORABLE_KEY_PATTERNS)


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[name + ".weight"] = (n_out, n_in)
    if bias:
        out[name + ".bias"] = (n_out,)


def _norm(out: dict, name: str, dim: int, bias: bool = True) -> None:
    out[name + ".weight"] = (dim,)
    if bias:
        out[name + ".bias"] = (dim,)


def _eva_attention(out: dict, p: str, width: int) -> None:
    out[p + "attn.qkv.weight"] = (3 * width, width)
    out[p + "attn.q_bias"] = (width,)
    out[p + "attn.v_bias"] = (width,)
    _linear(out, p + "attn.proj", width, width)


def _eva_block(out: dict, p: str, width: int, mlp: int) -> None:
    _norm(out, p + "norm1", width)
    _eva_attention(out, p, width)
    _norm(out, p + "norm2", width)
    _linear(out, p + "mlp.fc1", mlp, width)
    _linear(out, p + "mlp.fc2", width, mlp)


def vision_shapes(config: STLLMConfig) -> dict[str, tuple[int, ...]]:
    """EVA ViT (+ BT-Adapter) and ``ln_vision`` keys."""
    v, out = config.vision, {}
    w, p = v.width, VIT_PREFIX
    out[p + "cls_token"] = (1, 1, w)
    out[p + "pos_embed"] = (1, v.num_tokens, w)
    out[p + "patch_embed.proj.weight"] = (w, 3, v.patch_size, v.patch_size)
    out[p + "patch_embed.proj.bias"] = (w,)
    for i in range(v.depth):
        _eva_block(out, f"{p}blocks.{i}.", w, v.mlp_dim)
    if v.btadapter:
        out[p + "BTAdapter_cls"] = (1, 1, w)
        out[p + "BTAdapter_position.weight"] = (v.btadapter_max_frames, w)
        for j in range(v.btadapter_depth):
            _eva_block(out, f"{p}BTAdapter_S.{j}.", w, v.mlp_dim)
            t = f"{p}BTAdapter_T.{j}."
            _eva_attention(out, t, w)
            _norm(out, t + "norm1", w)
            _linear(out, t + "temporal_fc", w, w)
    _norm(out, VIDEO_PREFIX + "ln_vision", w)
    return out


def _bert_attention(out: dict, p: str, hidden: int, kv_in: int) -> None:
    _linear(out, p + "self.query", hidden, hidden)
    _linear(out, p + "self.key", hidden, kv_in)
    _linear(out, p + "self.value", hidden, kv_in)
    _linear(out, p + "output.dense", hidden, hidden)
    _norm(out, p + "output.LayerNorm", hidden)


def qformer_shapes(config: STLLMConfig) -> dict[str, tuple[int, ...]]:
    """Instruction-aware LAVIS Q-Former keys (text embeddings and text FFNs included)."""
    q, out = config.qformer, {}
    h, p = q.hidden_size, QFORMER_PREFIX
    out[VIDEO_PREFIX + "query_tokens"] = (1, q.num_query_tokens, h)
    out[p + "embeddings.word_embeddings.weight"] = (q.vocab_size, h)
    out[p + "embeddings.position_embeddings.weight"] = (q.max_position_embeddings, h)
    _norm(out, p + "embeddings.LayerNorm", h)
    for i in range(q.num_layers):
        lp = f"{p}encoder.layer.{i}."
        _bert_attention(out, lp + "attention.", h, h)
        if i % q.cross_attention_freq == 0:
            _bert_attention(out, lp + "crossattention.", h, config.vision.width)
        for suffix in ("", "_query"):
            _linear(out, f"{lp}intermediate{suffix}.dense", q.intermediate_size, h)
            _linear(out, f"{lp}output{suffix}.dense", h, q.intermediate_size)
            _norm(out, f"{lp}output{suffix}.LayerNorm", h)
    return out


def projector_shapes(config: STLLMConfig) -> dict[str, tuple[int, ...]]:
    """``llama_proj``, global-local ``down_proj``/``up_proj`` and ``mvm_decoder`` keys."""
    out: dict[str, tuple[int, ...]] = {}
    h = config.llm.hidden_size
    _linear(out, VIDEO_PREFIX + "llama_proj", h, config.qformer.hidden_size)
    if config.video_input == "residual":
        _linear(out, VIDEO_PREFIX + "down_proj", config.residual_hidden, h)
        _linear(out, VIDEO_PREFIX + "up_proj", h, config.residual_hidden)
    if config.mvm_decoder:
        _linear(out, MVM_PREFIX + "head", h, h)
        _norm(out, MVM_PREFIX + "norm", h)
    return out


def llm_shapes(config: STLLMConfig) -> dict[str, tuple[int, ...]]:
    """LLaMA keys (``LlamaForCausalLM`` naming, untied ``lm_head``)."""
    l, out = config.llm, {}
    h, d = l.hidden_size, l.head_dim
    out["model.embed_tokens.weight"] = (l.vocab_size, h)
    for i in range(l.num_layers):
        p = f"model.layers.{i}."
        _linear(out, p + "self_attn.q_proj", l.num_heads * d, h, bias=False)
        _linear(out, p + "self_attn.k_proj", l.num_kv_heads * d, h, bias=False)
        _linear(out, p + "self_attn.v_proj", l.num_kv_heads * d, h, bias=False)
        _linear(out, p + "self_attn.o_proj", h, l.num_heads * d, bias=False)
        _linear(out, p + "mlp.gate_proj", l.intermediate_size, h, bias=False)
        _linear(out, p + "mlp.up_proj", l.intermediate_size, h, bias=False)
        _linear(out, p + "mlp.down_proj", h, l.intermediate_size, bias=False)
        _norm(out, p + "input_layernorm", h, bias=False)
        _norm(out, p + "post_attention_layernorm", h, bias=False)
    _norm(out, "model.norm", h, bias=False)
    out["lm_head.weight"] = (l.vocab_size, h)
    return out


def expected_shapes(config: STLLMConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of a checkpoint for ``config`` mapped to its tensor shape."""
    out = llm_shapes(config)
    out.update(vision_shapes(config))
    out.update(qformer_shapes(config))
    out.update(projector_shapes(config))
    return out


def expected_keys(config: STLLMConfig) -> set[str]:
    """Official key names of a checkpoint for ``config`` (variant aware)."""
    return set(expected_shapes(config))
