"""EngineConfig checks and the KV pool's default size (on the CPU room for 4 full-length
sequences within a quarter of the available memory, at least 256 MiB; on a GPU the free memory
after the weights less headroom, capped by what max_num_seqs full-length sequences use)."""
import pytest
import torch

from stllm_engine.engine.engine_config import (CPU_KV_CACHE_MEMORY, GPU_HEADROOM, EngineConfig,
                                               default_kv_cache_memory)
from test_engine import make_engine

GiB = 1 << 30
CUDA = torch.device("cuda")


CPU = torch.device("cpu")
MIB = 1 << 20


@pytest.mark.parametrize("per_block,seq_blocks,free,want", [
    (1 << 20, 0, 100 * GiB, CPU_KV_CACHE_MEMORY),        # no length given: the floor
    (512 << 10, 125, 100 * GiB, CPU_KV_CACHE_MEMORY),    # bench-cpu bf16, 4 x 2000 positions: 250 MiB
    (8 * MIB, 125, 100 * GiB, 4 * 125 * 8 * MIB),        # ST-LLM-7B bf16: 4 full sequences, 4000 MiB
    (8 * MIB, 125, 8 * GiB, 2 * GiB),                    # ... within a quarter of what is available
    (8 * MIB, 125, 0, CPU_KV_CACHE_MEMORY),              # nothing available: still the floor
])
def test_cpu_default_holds_full_sequences_within_memory(per_block, seq_blocks, free, want):
    assert default_kv_cache_memory(CPU, per_block, 10**6, free_bytes=free, seq_blocks=seq_blocks) == want


def test_7b_on_a_cpu_holds_a_16_frame_request():
    """ST-LLM-7B in float32 on a 24 GiB machine with ~14 GiB left after its weights: the pool
    holds one ~600-position request (the fixed 256 MiB held 256 positions)."""
    per_block = 2 * 32 * 16 * 32 * 128 * 4
    blocks = default_kv_cache_memory(CPU, per_block, 10**6, free_bytes=14 * GiB, seq_blocks=125) // per_block
    assert blocks * 16 >= 2000 > 600


@pytest.mark.parametrize("free,want", [
    (64 * GiB, 64 * GiB - GPU_HEADROOM),   # an 80 GB card with the 7B model loaded
    (10 * GiB, 5 * GiB),                   # a small card: half of what is free
    (0, 8 << 20),                          # nothing free: one block (allocation then fails loudly)
])
def test_gpu_default_follows_free_memory(free, want):
    assert default_kv_cache_memory(CUDA, 8 << 20, 10**6, free_bytes=free) == want


def test_gpu_default_is_capped_by_useful_blocks():
    # a tiny model: 4 KiB blocks would be millions of blocks; the cap keeps max_useful_blocks
    assert default_kv_cache_memory(CUDA, 4096, 1000, free_bytes=64 * GiB) == 1000 * 4096


def test_7b_on_an_h100_holds_many_requests():
    """ST-LLM-7B bf16: 8 MiB a 16-position block; 64 GiB free -> 7168 blocks (~115k positions)."""
    per_block = 2 * 32 * 16 * 32 * 128 * 2
    blocks = default_kv_cache_memory(CUDA, per_block, 4 * 64 * 125, free_bytes=64 * GiB) // per_block
    assert blocks == 7168


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GiB"])
def test_bad_kv_cache_memory_is_named(bad):
    with pytest.raises(ValueError, match="kv_cache_memory must be a positive number of bytes"):
        EngineConfig(kv_cache_memory=bad)


def test_engine_uses_the_default_on_cpu(folders):
    eng = make_engine(folders("eva", "all"), num_kv_blocks=None)  # a tiny model: the floor
    assert eng.num_kv_blocks == CPU_KV_CACHE_MEMORY // eng.bytes_per_block
    assert eng.stats()["kv"]["num_blocks"] == eng.num_kv_blocks


@pytest.mark.parametrize("value,budget,want", [(None, 2048, 1024), (None, 1, 1), (300, 2048, 300), (5000, 2048, 2048)])
def test_long_prefill_token_threshold_resolves(value, budget, want):
    cfg = EngineConfig(long_prefill_token_threshold=value, max_num_batched_tokens=budget)
    assert cfg.resolved_long_prefill_token_threshold() == want


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_bad_long_prefill_token_threshold_is_named(bad):
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(long_prefill_token_threshold=bad)
