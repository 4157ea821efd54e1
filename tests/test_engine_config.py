"""EngineConfig checks and the KV pool's default size (256 MiB on the CPU; on a GPU the free
memory after the weights less headroom, capped by what max_num_seqs full-length sequences use)."""
import pytest
import torch

from stllm_engine.engine.engine_config import (CPU_KV_CACHE_MEMORY, GPU_HEADROOM, EngineConfig,
                                               default_kv_cache_memory)
from test_engine import make_engine

GiB = 1 << 30
CUDA = torch.device("cuda")


def test_cpu_default_is_fixed():
    assert default_kv_cache_memory(torch.device("cpu"), 1 << 20, 10**6, free_bytes=100 * GiB) == CPU_KV_CACHE_MEMORY


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
    eng = make_engine(folders("eva", "all"), num_kv_blocks=None)
    assert eng.num_kv_blocks == CPU_KV_CACHE_MEMORY // eng.bytes_per_block
    assert eng.stats()["kv"]["num_blocks"] == eng.num_kv_blocks
