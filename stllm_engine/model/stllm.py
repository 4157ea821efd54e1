"""STLLMModel: the engine's ST-LLM, tying vision, Q-Former, projector and LLaMA together.

Video side (per request): ``encode_vision`` (EVA ViT (+ BT-Adapter) -> ``ln_vision`` in float32;
cacheable per video) then ``encode_video`` (instruction-aware Q-Former with the question ->
``llama_proj`` -> all/mean/residual). LLM side (per step): ``embed_tokens``, ``forward`` over packed
embeddings with explicit positions (attention metadata from the AttentionContext) and
``compute_logits``; the paged KV cache is bound by ``allocate_kv_cache``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stllm_engine.config import STLLMConfig
from stllm_engine.model.convert import convert_state_dict
from stllm_engine.model.llama import LlamaModel
from stllm_engine.model.projector import VideoProjector
from stllm_engine.model.qformer import QFormer
from stllm_engine.model.threads import ThreadPolicy, cpu_threads
from stllm_engine.model.vision import EVAVisionTransformer
from stllm_engine.ops import elementwise as ew

LN_VISION_EPS = 1e-5  # the release's ln_vision is a torch LayerNorm with the default eps
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class STLLMModel(nn.Module):
    def __init__(self, config: STLLMConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = EVAVisionTransformer(config.vision)
        self.ln_vision = nn.LayerNorm(config.vision.width, eps=LN_VISION_EPS)
        self.qformer = QFormer(config.qformer, config.vision.width)
        self.projector = VideoProjector(config)
        self.llm = LlamaModel(config.llm)
        self.lm_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
        self.qformer_tokenizer = None  # set by from_checkpoint (or by the caller)
        self.kv_cache: torch.Tensor | None = None  # [2, layers, num_blocks, block_size, Hk, d]
        self.block_size = 0
        self.thread_policy = ThreadPolicy.from_env()  # CPU threads of decode vs prefill/vision passes

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None,
                        qformer_tokenizer=None, consume: bool = False) -> "STLLMModel":
        """Build from a :class:`stllm_engine.weights.Checkpoint` (official keys), fusing weights.

        dtype: float32 / bfloat16 / float16 (None: the checkpoint's stored dtype).
        qformer_tokenizer: a tokenizer, or a path for ``load_qformer_tokenizer``; None tries the
        checkpoint folder (``qformer_tokenizer/``) and leaves it unset when the folder has none
        (release folders ship no BERT vocabulary; ``encode_video`` then needs ids or a tokenizer).
        consume: empty ``ckpt.state_dict`` while converting, so the load peaks at about one copy of
        the weights (the caller drops the checkpoint's tensors; ``STLLM.from_pretrained`` does).
        """
        dtype = _as_dtype(dtype, ckpt)
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(ckpt.config)
        state = convert_state_dict(ckpt.state_dict, consume=consume)
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                 for k, v in state.items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(f"checkpoint does not fit the model: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
        model.qformer_tokenizer = _qformer_tokenizer(qformer_tokenizer, getattr(ckpt, "folder", None))
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.embed_tokens.weight.dtype  # never packed (a packed LM head may drop its weight)

    @property
    def device(self) -> torch.device:
        return self.llm.embed_tokens.weight.device

    # --- video side -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_vision(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [T, 3, S, S] (normalised) -> image_embeds [T, Nv, Wv] in the model dtype."""
        with cpu_threads(self.thread_policy.threads(decode=False), self.device):
            # the patch embedding casts the frames (on the bf16 CPU path inside its patch gather)
            x = self.visual_encoder(frames.to(self.device))
            ln = self.ln_vision
            return ew.layer_norm(x, ln.weight, ln.bias, ln.eps, upcast=True).to(self.dtype)

    def qformer_ids(self, question: str) -> torch.Tensor:
        """The question's Q-Former token ids [n] (truncated from the left to max_txt_len)."""
        if self.qformer_tokenizer is None:
            raise RuntimeError("STLLMModel has no Q-Former tokenizer: pass qformer_tokenizer= to "
                               "from_checkpoint / STLLM.from_pretrained, or --qformer-tokenizer to the "
                               "CLI (a bert-base-uncased folder or vocab.txt)")
        enc = self.qformer_tokenizer(question, truncation=True,
                                     max_length=self.config.qformer.max_txt_len)
        vocab = self.config.qformer.vocab_size
        if enc["input_ids"] and max(enc["input_ids"]) >= vocab:
            raise ValueError(f"the Q-Former tokenizer gave id {max(enc['input_ids'])}, outside the checkpoint's "
                             f"Q-Former vocabulary ({vocab} rows): the tokenizer does not match the checkpoint")
        return torch.tensor(enc["input_ids"], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_video(self, image_embeds: torch.Tensor, question: str | torch.Tensor) -> torch.Tensor:
        """image_embeds [T, Nv, Wv] + question (text or Q-Former ids) -> video tokens [Lv, H]."""
        ids = question if isinstance(question, torch.Tensor) else self.qformer_ids(question)
        with cpu_threads(self.thread_policy.threads(decode=False), self.device):
            states = self.qformer(image_embeds.to(self.device, self.dtype), ids)
            return self.projector(states)

    # --- LLM side ---------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] int64 -> [n, H]."""
        return self.llm.embed_tokens(ids.to(self.device))

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed embeds [N, H] + positions [N] -> hidden [N, H] (or only ``out_rows``, see
        LlamaModel.forward); reads the AttentionContext."""
        if out_rows is not None:
            out_rows = torch.as_tensor(out_rows, dtype=torch.int64, device=self.device)
        return self.llm(embeds.to(self.dtype), positions.to(self.device), out_rows)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> logits [M, vocab] float32."""
        return self.lm_head(hidden).float()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """Bind one paged K and V cache [num_blocks, block_size, Hk, d] to every layer."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        c = self.config.llm
        self.kv_cache = torch.zeros(2, c.num_layers, num_blocks, block_size, c.num_kv_heads,
                                    c.head_dim, dtype=self.dtype, device=self.device)
        self.block_size = block_size
        for i, layer in enumerate(self.llm.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return self.kv_cache

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks src -> dst in every layer (copy-on-write)."""
        if not pairs:
            return
        if self.kv_cache is None:
            raise RuntimeError("copy_blocks needs a KV cache: call allocate_kv_cache first")
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]


def _qformer_tokenizer(given, folder):
    from stllm_engine.tokenizers import load_qformer_tokenizer

    if given is not None:
        return load_qformer_tokenizer(given) if isinstance(given, (str, Path)) else given
    if folder is None or not (Path(folder) / "qformer_tokenizer").is_dir():
        return None  # never guess: the folder's own tokenizer files are LLaMA's
    return load_qformer_tokenizer(Path(folder) / "qformer_tokenizer")


def _as_dtype(dtype, ckpt) -> torch.dtype:
    if dtype is None:
        dtype = next(iter(ckpt.state_dict.values())).dtype
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"unsupported model dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise ValueError(f"unsupported model dtype {dtype}; expected float32, bfloat16 or float16")
    return dtype
