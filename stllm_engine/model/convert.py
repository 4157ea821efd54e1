"""Official ST-LLM state-dict names -> the engine model's names, fusing weights on the way.

* prefix ``model.stllm_model.`` dropped; ``Qformer.bert.*`` / ``query_tokens`` -> ``qformer.*``;
  ``llama_proj``/``down_proj``/``up_proj`` -> ``projector.*``; ``model.*`` -> ``llm.*``.
* EVA attention (ViT blocks and BT-Adapter): ``q_bias``, zero k bias, ``v_bias`` -> ``qkv.bias``.
* BT-Adapter ``BTAdapter_{cls,position,S,T}`` -> ``btadapter.{cls,position,spatial,temporal}``.
* Q-Former self-attention q/k/v -> ``qkv``; cross-attention k/v -> ``kv``.
* LLaMA q/k/v -> ``qkv_proj``; gate/up -> ``gate_up_proj``.
``mvm_decoder.*`` (training only) and derivable buffers (``is_ignorable``) are dropped; any
other unknown key raises here or in the model's strict loading.
"""
from __future__ import annotations

import re

import torch

from stllm_engine.weights.keys import VIDEO_PREFIX, is_ignorable

_RENAMES = (  # (pattern on the prefix-stripped key, replacement), first match wins
    (r"^visual_encoder\.BTAdapter_cls$", "visual_encoder.btadapter.cls"),
    (r"^visual_encoder\.BTAdapter_position\.", "visual_encoder.btadapter.position."),
    (r"^visual_encoder\.BTAdapter_S\.", "visual_encoder.btadapter.spatial."),
    (r"^visual_encoder\.BTAdapter_T\.", "visual_encoder.btadapter.temporal."),
    (r"^(visual_encoder|ln_vision)\.", r"\1."),
    (r"^query_tokens$", "qformer.query_tokens"),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.emb_norm."),
    (r"^Qformer\.bert\.embeddings\.", "qformer."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.query\.", r"qformer.layers.\1.cross_attn.q."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.intermediate(_query)?\.dense\.", r"qformer.layers.\1.ffn\2.fc1."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.output(_query)?\.dense\.", r"qformer.layers.\1.ffn\2.fc2."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.output(_query)?\.LayerNorm\.", r"qformer.layers.\1.ffn\2.norm."),
    (r"^(llama_proj|down_proj|up_proj)\.", r"projector.\1."),
    (r"^model\.", "llm."),
    (r"^lm_head\.", "lm_head."),
)
_RENAMES = tuple((re.compile(p), r) for p, r in _RENAMES)


def _strip(key: str) -> str:
    return key[len(VIDEO_PREFIX):] if key.startswith(VIDEO_PREFIX) else key


def _rename(key: str) -> str:
    for pat, rep in _RENAMES:
        if pat.match(key):
            return pat.sub(rep, key, count=1).replace(".ffn.", ".ffn_text.")
    raise KeyError(f"checkpoint key {key!r} has no place in the engine model")


def convert_state_dict(sd: dict[str, torch.Tensor], consume: bool = False) -> dict[str, torch.Tensor]:
    """Official keys (as :func:`stllm_engine.weights.load_checkpoint` returns) -> engine keys.
    ``consume``: empty ``sd`` on the way, so that each fused weight's parts are freed as soon as
    it is built (else the parts of every fused weight live on in ``sd``: +9 GB at ST-LLM-7B in
    bfloat16, qkv and gate_up, on top of its 15 GB)."""
    src: dict[str, torch.Tensor] = {}
    for k in list(sd):
        v = sd.pop(k) if consume else sd[k]
        if not (is_ignorable(k) or _strip(k).startswith("mvm_decoder.")):
            src[_strip(k)] = v
    out: dict[str, torch.Tensor] = {}

    def take(*keys: str) -> list[torch.Tensor]:
        missing = [k for k in keys if k not in src]
        if missing:
            raise KeyError(f"checkpoint is missing {missing}")
        return [src.pop(k) for k in keys]

    for key in list(src):
        if key not in src:  # taken by an earlier key's group
            continue
        m = re.match(r"^(.*)\.attn\.q_bias$", key)  # EVA attention (ViT, BT-Adapter S and T)
        if m:
            q, v = take(key, f"{m[1]}.attn.v_bias")
            out[_rename(m[1] + ".attn.qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
            continue
        m = re.match(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)$", key)
        if m:
            p, s = f"Qformer.bert.encoder.layer.{m[1]}", m[2]
            parts = take(*(f"{p}.attention.self.{n}.{s}" for n in ("query", "key", "value")))
            out[f"qformer.layers.{m[1]}.self_attn.qkv.{s}"] = torch.cat(parts)
            continue
        m = re.match(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.key\.(weight|bias)$", key)
        if m:
            p, s = f"Qformer.bert.encoder.layer.{m[1]}.crossattention.self", m[2]
            parts = take(f"{p}.key.{s}", f"{p}.value.{s}")
            out[f"qformer.layers.{m[1]}.cross_attn.kv.{s}"] = torch.cat(parts)
            continue
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", key)
        if m:
            p = f"model.layers.{m[1]}.self_attn."
            parts = take(*(f"{p}{n}_proj.weight" for n in "qkv"))
            out[f"llm.layers.{m[1]}.self_attn.qkv_proj.weight"] = torch.cat(parts)
            continue
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", key)
        if m:
            p = f"model.layers.{m[1]}.mlp."
            out[f"llm.layers.{m[1]}.mlp.gate_up_proj.weight"] = torch.cat(
                take(p + "gate_proj.weight", p + "up_proj.weight"))
    for key, value in src.items():  # the rest, a fused part without its group's first key
        out[_rename(key)] = value   # included (then reported as unexpected by the model's loader)
    return out
