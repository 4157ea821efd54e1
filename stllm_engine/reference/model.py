"""``ReferenceSTLLM``: ST-LLM assembled from ``transformers`` modules (the correctness oracle).

vision (InstructBLIP EVA ViT [+ BT-Adapter] + ln_vision) -> instruction-aware Q-Former ->
``llama_proj`` -> projector (all | mean | residual) -> ``LlamaForCausalLM`` fed ``inputs_embeds``.
Chat/MVBench prompting and generation live in :mod:`.chat`; this file builds and loads the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..config import LLMConfig, STLLMConfig
from .keymap import KeyMappingError, official_to_reference
from .projector import VideoProjector
from .qformer import ReferenceQFormer
from .vision import ReferenceVision
from . import chat


def hf_llama_config(lc: LLMConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_layers, num_attention_heads=lc.num_heads,
        num_key_value_heads=lc.num_kv_heads, hidden_act="silu", rms_norm_eps=lc.rms_norm_eps,
        rope_theta=lc.rope_theta, max_position_embeddings=lc.max_position_embeddings,
        bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id, pad_token_id=lc.pad_token_id,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = attn_implementation
    return cfg


class ReferenceSTLLM(nn.Module):
    """The whole model; use :meth:`from_pretrained`. Inference only (``eval``, ``no_grad``)."""

    def __init__(self, config: STLLMConfig, llama_tokenizer=None, qformer_tokenizer=None,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision = ReferenceVision(config.vision, attn_implementation)
        self.qformer = ReferenceQFormer(config.qformer, config.vision.width, attn_implementation)
        self.llama_proj = nn.Linear(config.qformer.hidden_size, config.llm.hidden_size)
        self.projector = VideoProjector(config.video_input, config.llm.hidden_size,
                                        config.residual_size, config.residual_hidden)
        self.llm = LlamaForCausalLM(hf_llama_config(config.llm, attn_implementation))
        self.llama_tokenizer = llama_tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.variant = ("btadapter" if config.vision.btadapter else "eva") + "/" + config.video_input
        self.eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", qformer_tokenizer: str | Path | None = None,
                        video_input: str | None = None, attn_implementation: str = "sdpa",
                        progress: bool = False) -> "ReferenceSTLLM":
        """Load an official-layout folder: weights via ``load_checkpoint``, both tokenizers.

        ``qformer_tokenizer``: path of the Q-Former tokenizer (default ``folder/qformer_tokenizer``).
        ``video_input``: override the projector (see ``load_checkpoint``).
        """
        from ..tokenizers import load_llama_tokenizer, load_qformer_tokenizer
        from ..weights import load_checkpoint

        folder = Path(folder)
        ckpt = load_checkpoint(folder, dtype=dtype, video_input=video_input, progress=progress)
        llama_tok = load_llama_tokenizer(folder)
        q_tok = load_qformer_tokenizer(qformer_tokenizer if qformer_tokenizer is not None else folder)
        with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
            model = cls(ckpt.config, llama_tok, q_tok, attn_implementation).to(dtype)
        model.to_empty(device=device)
        model._rebuild_buffers()
        model.load_official_state_dict(ckpt.state_dict)
        return model

    def _rebuild_buffers(self) -> None:
        """Recompute the non-persistent buffers (left uninitialised by ``to_empty``)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        emb = self.qformer.bert.embeddings
        emb.position_ids = torch.arange(emb.position_ids.shape[-1], device=emb.position_ids.device)[None]
        device = self.device
        with torch.device(device):
            self.llm.model.rotary_emb = LlamaRotaryEmbedding(self.llm.config)  # float32 inv_freq

    def load_official_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load official key names (strict: every parameter filled, every key used once)."""
        mapped = official_to_reference(sd)
        result = self.load_state_dict(mapped.state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyMappingError(f"reference model load mismatch: missing {sorted(result.missing_keys)[:10]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:10]}")

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llama_proj.weight.dtype

    # ------------------------------------------------------------------ video side
    @torch.no_grad()
    def encode_vision(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[T, 3, S, S]`` -> ``ln_vision`` features ``[T, 1 + P, Dv]``."""
        return self.vision(frames.to(device=self.device, dtype=self.dtype))

    def qformer_inputs(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Question -> Q-Former ``input_ids``, ``attention_mask`` ``[1, L]`` (left-truncated)."""
        if self.qformer_tokenizer is None:
            raise RuntimeError("no Q-Former tokenizer attached; load with from_pretrained")
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        enc = self.qformer_tokenizer([question], padding="longest", truncation=True,
                                     max_length=self.config.qformer.max_txt_len, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    @torch.no_grad()
    def frame_tokens(self, image_embeds: torch.Tensor, question: str) -> torch.Tensor:
        """``ln_vision`` features ``[T, N, Dv]`` + question -> per-frame LLM tokens ``[T, Q, H]``."""
        ids, mask = self.qformer_inputs(question)
        q = self.qformer(image_embeds.to(self.dtype), ids, mask)
        return self.llama_proj(q)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, question: str) -> torch.Tensor:
        """Frames ``[T, 3, S, S]`` + question -> video tokens ``[T*Q | Q | R*Q, H]``."""
        return self.projector(self.frame_tokens(self.encode_vision(frames), question))

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids)

    # ------------------------------------------------------------------ chat (see chat.py)
    load_frames = chat.load_frames
    generate_ids = chat.generate_ids
    generate_from_embeds = chat.generate_from_embeds
    decode_answer = chat.decode_answer
    answer = chat.answer
    mvbench_answer = chat.mvbench_answer
    chat_inputs_embeds = chat.chat_inputs_embeds
    mvbench_inputs_embeds = chat.mvbench_inputs_embeds
    prompt_bos_id = property(chat.prompt_bos_id)
    stop_sequences = property(chat.model_stop_sequences)
