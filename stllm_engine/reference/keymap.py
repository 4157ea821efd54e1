"""Official checkpoint key names <-> the reference model's parameter names.

Official names (STLLM_REFERENCE §7): LLaMA keys at the top level (``model.*``, ``lm_head.*``),
everything else under ``model.stllm_model.``. Every official key is consumed exactly once: mapped to
one reference parameter, or (``q_bias``/``v_bias``) packed into InstructBLIP's single ``qkv.bias``
``cat(q_bias, 0, v_bias)``, or dropped with a reason (training-only ``mvm_decoder``, the
``position_ids`` buffer, the ``stllm_model.embed_tokens`` alias of ``model.embed_tokens``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

VISION_PREFIX = "model.stllm_model."

# (official suffix after VISION_PREFIX, reference name); \d groups are carried over in order.
_RULES: list[tuple[str, str]] = [
    (r"visual_encoder\.cls_token", "vision.vit.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision.vit.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.vit.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.vit.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.vit.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision.vit.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.vit.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.vit.encoder.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.BTAdapter_cls", "vision.btadapter.cls_token"),
    (r"visual_encoder\.BTAdapter_position\.weight", "vision.btadapter.position.weight"),
    (r"visual_encoder\.BTAdapter_S\.(\d+)\.(.+)", r"vision.btadapter.spatial.\1.\2"),
    (r"visual_encoder\.BTAdapter_T\.(\d+)\.(.+)", r"vision.btadapter.temporal.\1.\2"),
    (r"ln_vision\.(weight|bias)", r"vision.ln_vision.\1"),
    (r"query_tokens", "qformer.query_tokens"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight",
     r"qformer.bert.embeddings.\1.weight"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.bert.embeddings.layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)",
     r"qformer.bert.encoder.layer.\1.\2.attention.\3"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", r"qformer.bert.encoder.layer.\1.\2"),
    (r"llama_proj\.(weight|bias)", r"llama_proj.\1"),
    (r"(down_proj|up_proj)\.(weight|bias)", r"projector.\1.\2"),
]
_COMPILED = [(re.compile(p + r"\Z"), r) for p, r in _RULES]
_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)\Z")
_DROPPED = {
    "Qformer.bert.embeddings.position_ids": "position ids buffer (recomputed)",
    "embed_tokens.weight": "alias of model.embed_tokens.weight",
    "residual_index": "global-local frame index buffer (recomputed)",
}
_ROTARY = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq\Z")


class KeyMappingError(KeyError):
    """An official key has no place in the reference model (or is consumed twice)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class MappedState:
    state_dict: dict[str, torch.Tensor]
    source: dict[str, list[str]] = field(default_factory=dict)  # reference name -> official keys
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> reason


def reference_name(official: str) -> str | None:
    """Reference parameter name of an official key; None for keys that are packed or dropped."""
    if _ROTARY.match(official):
        return None
    if not official.startswith(VISION_PREFIX):
        if official.startswith("model.") or official.startswith("lm_head."):
            return "llm." + official
        raise KeyMappingError(f"unknown checkpoint key {official!r}")
    rest = official[len(VISION_PREFIX):]
    if rest in _DROPPED or rest.startswith("mvm_decoder.") or _QV_BIAS.match(rest):
        return None
    for pat, rep in _COMPILED:
        if pat.match(rest):
            return pat.sub(rep, rest)
    raise KeyMappingError(f"unknown checkpoint key {official!r}")


def official_to_reference(sd: dict[str, torch.Tensor]) -> MappedState:
    """Rename/pack an official state dict for :class:`ReferenceSTLLM` (strict-loadable)."""
    out = MappedState(state_dict={})
    qv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        name = reference_name(key)
        rest = key[len(VISION_PREFIX):] if key.startswith(VISION_PREFIX) else key
        if name is None:
            m = _QV_BIAS.match(rest)
            if m:
                target = f"vision.vit.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
                qv.setdefault(target, {})[m.group(2)] = t
                out.source.setdefault(target, []).append(key)
            elif _ROTARY.match(key):
                out.dropped[key] = "rotary inverse frequencies (recomputed)"
            elif rest.startswith("mvm_decoder."):
                out.dropped[key] = "training-only MVM head"
            else:
                out.dropped[key] = _DROPPED[rest]
            continue
        if name in out.state_dict:
            raise KeyMappingError(f"{key!r} maps to {name!r}, already filled by {out.source[name]}")
        out.state_dict[name] = t
        out.source[name] = [key]
    for target, parts in qv.items():
        if set(parts) != {"q_bias", "v_bias"}:
            raise KeyMappingError(f"{target}: need both q_bias and v_bias, got {sorted(parts)}")
        q, v = parts["q_bias"], parts["v_bias"]
        out.state_dict[target] = torch.cat((q, torch.zeros_like(q), v))
    alias = VISION_PREFIX + "embed_tokens.weight"
    if alias in sd and "model.embed_tokens.weight" in sd and not torch.equal(sd[alias], sd["model.embed_tokens.weight"]):
        raise KeyMappingError(f"{alias} differs from model.embed_tokens.weight")
    return out


def reference_to_official(ref_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_reference` (without dropped keys); checks the k bias is zero."""
    inverse: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in ref_sd.items():
        m = re.match(r"vision\.vit\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias\Z", name)
        if m:
            q, k, v = t.chunk(3)
            if torch.any(k != 0):
                raise KeyMappingError(f"{name}: EVA has no k bias, but the k part is non-zero")
            base = f"{VISION_PREFIX}visual_encoder.blocks.{m.group(1)}.attn."
            out[base + "q_bias"], out[base + "v_bias"] = q, v
            continue
        if name.startswith("llm."):
            out[name[4:]] = t
            continue
        if not inverse:
            inverse = _inverse_rules()
        for pat, rep in inverse.items():
            m2 = re.fullmatch(pat, name)
            if m2:
                out[VISION_PREFIX + m2.expand(rep)] = t
                break
        else:
            raise KeyMappingError(f"reference parameter {name!r} has no official name")
    return out


def _inverse_rules() -> dict[str, str]:
    inv = {
        r"vision\.vit\.embeddings\.class_embedding": "visual_encoder.cls_token",
        r"vision\.vit\.embeddings\.position_embedding": "visual_encoder.pos_embed",
        r"vision\.vit\.embeddings\.patch_embedding\.(weight|bias)": r"visual_encoder.patch_embed.proj.\1",
        r"vision\.vit\.encoder\.layers\.(\d+)\.layer_norm1\.(.+)": r"visual_encoder.blocks.\1.norm1.\2",
        r"vision\.vit\.encoder\.layers\.(\d+)\.layer_norm2\.(.+)": r"visual_encoder.blocks.\1.norm2.\2",
        r"vision\.vit\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight": r"visual_encoder.blocks.\1.attn.qkv.weight",
        r"vision\.vit\.encoder\.layers\.(\d+)\.self_attn\.projection\.(.+)": r"visual_encoder.blocks.\1.attn.proj.\2",
        r"vision\.vit\.encoder\.layers\.(\d+)\.mlp\.(.+)": r"visual_encoder.blocks.\1.mlp.\2",
        r"vision\.btadapter\.cls_token": "visual_encoder.BTAdapter_cls",
        r"vision\.btadapter\.position\.weight": "visual_encoder.BTAdapter_position.weight",
        r"vision\.btadapter\.spatial\.(\d+)\.(.+)": r"visual_encoder.BTAdapter_S.\1.\2",
        r"vision\.btadapter\.temporal\.(\d+)\.(.+)": r"visual_encoder.BTAdapter_T.\1.\2",
        r"vision\.ln_vision\.(.+)": r"ln_vision.\1",
        r"qformer\.query_tokens": "query_tokens",
        r"qformer\.bert\.embeddings\.layernorm\.(.+)": r"Qformer.bert.embeddings.LayerNorm.\1",
        r"qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight":
            r"Qformer.bert.embeddings.\1.weight",
        r"qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)":
            r"Qformer.bert.encoder.layer.\1.\2.self.\3",
        r"qformer\.bert\.encoder\.layer\.(\d+)\.(.+)": r"Qformer.bert.encoder.layer.\1.\2",
        r"llama_proj\.(.+)": r"llama_proj.\1",
        r"projector\.(down_proj|up_proj)\.(.+)": r"\1.\2",
    }
    return inv
