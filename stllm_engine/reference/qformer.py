"""Instruction-aware Q-Former as ``transformers``' ``InstructBlipQFormerModel``.

Release facts (``stllm/models/st_llm.py`` ``encode_img``, LAVIS ``Qformer.py``): 32 learned
``query_tokens`` are concatenated **before** the question's BERT embeddings (word + absolute
position, positions of the text start at 0), one LayerNorm over both; self-attention spans queries
and text (mask = ones for the queries + the text attention mask); cross-attention to the
``ln_vision`` features happens in layers 0, f, 2f, ... for the query positions only; queries use the
``intermediate_query``/``output_query`` FFN, text the ``intermediate``/``output`` FFN. Output: the
query states ``[:, :32]``. The question is tokenized with BERT uncased (+ ``[DEC]``), truncated from
the left to ``max_txt_len``, with ``[CLS]``/``[SEP]``, and repeated for every frame.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from ..config import QFormerConfig


def hf_qformer_config(qc: QFormerConfig, vision_width: int, attn_implementation: str = "sdpa"
                      ) -> InstructBlipQFormerConfig:
    cfg = InstructBlipQFormerConfig(
        vocab_size=qc.vocab_size, hidden_size=qc.hidden_size, num_hidden_layers=qc.num_layers,
        num_attention_heads=qc.num_heads, intermediate_size=qc.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=qc.max_position_embeddings, layer_norm_eps=qc.eps, pad_token_id=0,
        cross_attention_frequency=qc.cross_attention_freq, encoder_hidden_size=vision_width)
    cfg._attn_implementation = attn_implementation
    return cfg


class ReferenceQFormer(nn.Module):
    """``image_embeds [T, N, Dv]`` + question ids ``[1, L]`` -> query states ``[T, Q, H]``."""

    def __init__(self, qc: QFormerConfig, vision_width: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = qc
        self.bert = InstructBlipQFormerModel(hf_qformer_config(qc, vision_width, attn_implementation))
        self.query_tokens = nn.Parameter(torch.zeros(1, qc.num_query_tokens, qc.hidden_size))

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, L] (one question), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"question has {input_ids.shape[1]} Q-Former tokens, more than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        T = image_embeds.shape[0]
        Q = self.query_tokens.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        query = self.query_tokens.expand(T, -1, -1)
        mask = torch.cat([torch.ones(T, Q, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask.expand(T, -1)], dim=1)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.bert(
            input_ids=input_ids.expand(T, -1), attention_mask=mask, query_embeds=query,
            encoder_hidden_states=image_embeds.to(query.dtype), encoder_attention_mask=image_atts,
            return_dict=True)
        return out.last_hidden_state[:, :Q, :]
