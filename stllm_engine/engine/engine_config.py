"""EngineConfig: the engine's sizes and policies (plain dataclass, checked on construction)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MAX_DEFAULT_DECODE_THREADS = 8  # parallel decord readers by default (each holds its own decoder)
RELEASE_MAX_LENGTH = 2000  # Chat.answer: prompt + max_new_tokens beyond this cuts the prompt's left


@dataclass
class EngineConfig:
    """block_size: KV positions per block; num_kv_blocks or kv_cache_memory (bytes) sizes the
    pool (None: :func:`default_kv_cache_memory` - on the CPU room for 4 max_length sequences
    within a quarter of the available memory, at least 256 MiB; most of the free memory on a
    GPU); max_length: prompt + new tokens cap (the release's 2000, bounded by the model's
    positions); truncate_prompt: cut longer prompts from the left like the release (else error);
    beam_stop_first_row: stop ids/strings end beams as the release's criterion does (judged on the
    best candidate, applied to all), else per candidate; frame_workers: threads decoding new
    videos in the background while the model steps (0: decode inside ``add_request``);
    decode_threads: decord readers one video decoded on the engine thread (no model pass running
    meanwhile: an idle engine, cached plans, ``frame_workers=0``) may use in parallel over its
    keyframe segments (``stllm_engine/video/segments.py``; None: the CPUs this process may use, at
    most ``MAX_DEFAULT_DECODE_THREADS``, as every reader holds its own decoder; 1: one reader).
    Background decodes use one reader each, beside the model's threads. enforce_eager: on CUDA,
    decode steps, fresh prefills, ViT and Q-Former passes launch their kernels one by one instead
    of replaying CUDA graphs (decode: captured at start, ``cuda_graphs.py``; prefill: per 64-token
    bucket at warm-up, ``prefill_graphs.py``; ViT / Q-Former: per shape on first use,
    ``video_graphs.py``; for debugging and comparisons). long_prefill_token_threshold: the most
    tokens a prefill chunk takes in a step while a waiting request could be admitted (None: half
    of max_num_batched_tokens; max_num_batched_tokens turns it off), so a short request arriving
    during a long video's prefill starts at once. warmup: run three short synthetic
    requests when the engine is built, so Triton compiles and library set-up are paid at load and
    not by the first request (``warmup.py``); None: on CUDA only."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    vision_cache_bytes: int = 256 << 20
    enable_prefix_caching: bool = True
    max_length: int = RELEASE_MAX_LENGTH
    truncate_prompt: bool = True
    beam_stop_first_row: bool = True
    frame_workers: int = 1
    decode_threads: int | None = None
    enforce_eager: bool = False
    warmup: bool | None = None
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {v!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks <= 0):
            raise ValueError(f"EngineConfig.num_kv_blocks must be a positive int, got {self.num_kv_blocks!r}")
        if self.num_kv_blocks is None and self.kv_cache_memory is not None and (
                isinstance(self.kv_cache_memory, bool) or not isinstance(self.kv_cache_memory, int)
                or self.kv_cache_memory <= 0):
            raise ValueError(f"EngineConfig.kv_cache_memory must be a positive number of bytes, "
                             f"got {self.kv_cache_memory!r}")
        if isinstance(self.frame_workers, bool) or not isinstance(self.frame_workers, int) or self.frame_workers < 0:
            raise ValueError(f"EngineConfig.frame_workers must be an int >= 0, got {self.frame_workers!r}")
        if self.decode_threads is not None and (isinstance(self.decode_threads, bool) or not isinstance(
                self.decode_threads, int) or self.decode_threads < 1):
            raise ValueError(f"EngineConfig.decode_threads must be a positive int or None, got {self.decode_threads!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"EngineConfig.enforce_eager must be a bool, got {self.enforce_eager!r}")
        if self.warmup is not None and not isinstance(self.warmup, bool):
            raise ValueError(f"EngineConfig.warmup must be a bool or None, got {self.warmup!r}")
        t = self.long_prefill_token_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"EngineConfig.long_prefill_token_threshold must be a positive int or None, got {t!r}")
        if not isinstance(self.vision_cache_bytes, int) or self.vision_cache_bytes < 0:
            raise ValueError(f"EngineConfig.vision_cache_bytes must be >= 0, got {self.vision_cache_bytes!r}")

    def resolved_long_prefill_token_threshold(self) -> int:
        """long_prefill_token_threshold, None resolved to half the token budget."""
        t = self.long_prefill_token_threshold
        return min(t, self.max_num_batched_tokens) if t else max(1, self.max_num_batched_tokens // 2)

    def resolved_warmup(self, device: torch.device) -> bool:
        """warmup, None resolved to whether ``device`` is a GPU (where first calls compile)."""
        return device.type == "cuda" if self.warmup is None else self.warmup

    def resolved_decode_threads(self) -> int:
        """decode_threads, None resolved to the CPUs this process may run on (at most
        ``MAX_DEFAULT_DECODE_THREADS``)."""
        if self.decode_threads is not None:
            return self.decode_threads
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, MAX_DEFAULT_DECODE_THREADS))


def kv_bytes_per_block(model, block_size: int) -> int:
    c = model.config.llm
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * torch.finfo(model.dtype).bits // 8


CPU_KV_CACHE_MEMORY = 256 << 20  # the CPU pool's floor
CPU_FULL_SEQUENCES = 4  # the CPU pool grows to hold this many max_length sequences,
CPU_MEMORY_SHARE = 4  # within this fraction (1/4) of the memory still available
GPU_HEADROOM = 8 << 30  # GPU memory left beside the KV pool: activations, ViT passes, graphs, vision cache
MAX_BLOCKS_PER_SLOT = 4  # pool cap: this many full-length sequences per max_num_seqs slot


def default_kv_cache_memory(device: torch.device, bytes_per_block: int, max_useful_blocks: int,
                            free_bytes: int | None = None, seq_blocks: int = 0) -> int:
    """The KV pool's bytes when ``kv_cache_memory`` is None. CPU: room for
    ``CPU_FULL_SEQUENCES`` sequences of ``seq_blocks`` blocks (max_length), at most a quarter of the
    memory available (``MemAvailable``, or ``free_bytes``), at least 256 MiB: a fixed 256 MiB
    held 512 positions of ST-LLM-7B in bf16 (256 in float32), not one 16-frame request (~600),
    while bench-cpu bf16 needs 250 MB for 4 x 2000 positions. GPU: what is free after the weights
    (``torch.cuda.mem_get_info``, or ``free_bytes``) less 8 GiB of headroom, at least half of it
    (a small card), at most ``max_useful_blocks`` blocks (a tiny model would otherwise get
    millions of blocks). The 7B model on an 80 GB H100 had 32 blocks (512 positions) at the old
    fixed 256 MiB: one 16-frame request did not fit."""
    if device.type != "cuda":
        if free_bytes is None:
            from stllm_engine.model.packed_linear import memory_available

            free_bytes = memory_available() or 0
        full = CPU_FULL_SEQUENCES * seq_blocks * bytes_per_block
        return max(CPU_KV_CACHE_MEMORY, min(full, free_bytes // CPU_MEMORY_SHARE))
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    budget = max(free_bytes // 2, free_bytes - GPU_HEADROOM)
    return max(bytes_per_block, min(budget, max_useful_blocks * bytes_per_block))
