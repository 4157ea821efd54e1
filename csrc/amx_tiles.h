// Intel AMX (Sapphire Rapids and later) helpers shared by the bf16 tile kernels
// (flash_attention_amx_cpu.cpp, amx_swiglu_cpu.cpp): run-time detection, the one tile layout they
// use (8 tiles of 16 rows x 64 bytes) and a DAZ/FTZ scope. Everything is compiled with a target
// attribute, so the build needs no -m flags and runs on any x86-64 CPU; elsewhere
// (STLLM_HAVE_AMX_KERNEL undefined) the kernels report themselves unavailable.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define STLLM_HAVE_AMX_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#define STLLM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace stllm {
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// AMX-TILE + AMX-BF16 + the AVX-512 subsets the kernels use, and the OS lets this process use the
// tile state (Linux >= 5.16: arch_prctl permission). Checked once.
inline bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tiles = (d >> 24 & 1) && (d >> 22 & 1);                                      // AMX-TILE, AMX-BF16
    const bool avx512 = (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1) && (b >> 17 & 1);  // F BW VL DQ
    if (!tiles || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool bf16 = a >> 5 & 1;  // AVX512_BF16
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return bf16 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// All 8 tiles as 16 rows x 64 bytes (16 floats or 32 bf16 a row), for this thread.
STLLM_AMX inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  // GCC 12 does not see the builtin read cfg and drops the stores above without this barrier.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

STLLM_AMX inline void release_tiles() { _tile_release(); }

// The tile layout above for this thread while in scope, released after (also when the scope
// unwinds through an exception).
class TileScope {
 public:
  STLLM_AMX TileScope() { configure_tiles(); }
  STLLM_AMX ~TileScope() { release_tiles(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Flush-to-zero + denormals-are-zero for this thread's SSE/AVX math while in scope (the caller's
// mode is restored after).
class DenormalsAreZero {
 public:
  DenormalsAreZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved_); }
  DenormalsAreZero(const DenormalsAreZero&) = delete;
  DenormalsAreZero& operator=(const DenormalsAreZero&) = delete;

 private:
  unsigned saved_;
};

// Scratch memory for one thread, 64-byte aligned (tile rows that split cache lines halve the tile
// throughput): kept between calls up to 32 MiB, since a fresh buffer of a few MB per call costs its
// page faults every time (~6 ms of a 14 ms attention call at 16 ViT frames x 16 heads); a larger
// request (long prompts, a wide model's partial sums, where the work dwarfs that) gets a fresh
// tensor held in ``fresh`` until the caller drops it. Use as ``thread_local KeptBuffer``.
class KeptBuffer {
 public:
  KeptBuffer() = default;
  KeptBuffer(const KeptBuffer&) = delete;
  KeptBuffer& operator=(const KeptBuffer&) = delete;
  ~KeptBuffer() { std::free(data_); }

  void* get(int64_t bytes, at::Tensor& fresh) {
    constexpr int64_t keep_max = 32 << 20;
    bytes = (std::max<int64_t>(bytes, 64) + 63) / 64 * 64;
    if (bytes > keep_max) {
      fresh = at::empty({bytes + 64}, at::TensorOptions().dtype(at::kByte));
      return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(fresh.data_ptr()) + 63) / 64 * 64);
    }
    if (bytes > bytes_) {
      std::free(data_);
      data_ = std::aligned_alloc(64, bytes);
      bytes_ = data_ != nullptr ? bytes : 0;
      TORCH_CHECK(data_ != nullptr, "out of memory for a ", bytes, "-byte AMX scratch buffer");
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

}  // namespace amx
}  // namespace stllm
#endif
