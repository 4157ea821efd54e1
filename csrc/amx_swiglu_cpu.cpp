// The LLaMA MLP's first half in bfloat16 on Intel AMX tiles: out = silu(x Wg^T) * (x Wu^T) in one
// pass, the CPU prefill's gate_up GEMM with the SwiGLU as its epilogue. Rounded as the unfused
// path rounds (the GEMM's gate and up to bf16, then T(T(silu(gate)) * up)), with float32
// accumulation; it differs from oneDNN's GEMM by summation order only.
//
// Why: at a prefill the unfused path writes the [rows, 2I] gate_up output (6.8 MB at bench-cpu's
// 608 rows) to memory and reads it back for the SwiGLU; here the accumulators of a 32 x 16 block
// of gate and of up sit in tiles side by side and only the [rows, I] result is written.
//
// Layout and constraints
//   weight: the fused [gate; up] projection [2I, K] bf16 (gate rows first), packed once by
//     amx_swiglu_pack into ceil(I / 16) panels; panel p is ceil(K / 32) steps of two B tiles
//     (gate rows 16p..16p+15, then up rows I+16p..I+16p+15), each 16 rows of k pairs x 16 columns in
//     VNNI order: packed[p][kb][h][kp][n][2] = W[h * I + 16p + n][32kb + 2kp + {0, 1}], zeros past I
//     and K; a panel is Kp * 64 contiguous bytes (Kp: K rounded up to 32).
//   x [M, K] bf16, last dim contiguous (any row stride). Returns out [M, I] bf16.
//
// Work: x is copied into 16-row A tiles ([Mp / 16][Kp / 32][16][32], Mp = M rounded up to 32, zeros
// past M and K; 64-byte aligned: tile rows that split cache lines halved the tile throughput).
// Each thread takes a contiguous range of panels and walks x in blocks of MB rows (MB * Kp * 2
// bytes <= 640 KB, so a block stays in L2 while the panels stream through it, the next panel
// prefetched into L2 meanwhile); per panel, for k chunks of 256, every 32 rows of the block run a
// microkernel (C tiles 0/2: gate of rows 0-15/16-31, 1/3: up; A tiles 4-5, B tiles 6-7), the C
// tiles carried between chunks in a per-thread float buffer, and the SwiGLU after the last chunk.
// Wider inputs (K > 1024: ST-LLM-7B's 4096) would leave blocks of only 64-80 rows that way, each
// re-reading the whole weight from memory (155 ms against 102 ms unfused at 7B's [608, 4096] ->
// 2 x 11008); there the k chunks of 1024 columns go outermost instead (run_rows_chunked): the
// threads split the rows (or, with fewer than 64 rows a thread, the panels), a chunk of up to 320
// rows stays in L2 while every panel streams past it once, and the partial sums of all the
// thread's panels wait in a float buffer between chunks (7B: 67 vs 86 ms unfused, benchmarks/kernels.py).
#include <ATen/Parallel.h>

#include <algorithm>

#include "amx_tiles.h"
#include "avx512_bf16.h"
#include "checks.h"
#include "ops.h"

namespace stllm {
#ifdef STLLM_HAVE_AMX_KERNEL
namespace {

constexpr int64_t KC = 8;                  // k steps of 32 per chunk (256 columns of x)
constexpr int64_t BLOCK_BYTES = 640 << 10;  // rows of x per block: MB * Kp * 2 bytes at most this
constexpr int64_t WIDE_K = 1024;            // wider inputs: k chunks outermost (run_rows_chunked)
constexpr int64_t WIDE_KC = 32;             // k steps of 32 per chunk there (1024 columns of x)
constexpr int64_t WIDE_MB = 320;            // rows per block there (a chunk of them: 640 KB)

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows [m, m + 16) of x (zeros past M) over all k as Kp / 32 A tiles at dst.
STLLM_AMX void pack_a_tile(const uint16_t* x, int64_t xs, int64_t M, int64_t K, int64_t KB, int64_t m,
                           uint16_t* dst) {
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __mmask32 mask = tail_mask32(K - kb * 32);
    for (int r = 0; r < 16; ++r) {
      const __m512i v = m + r < M ? _mm512_maskz_loadu_epi16(mask, x + (m + r) * xs + kb * 32) : _mm512_setzero_si512();
      _mm512_store_si512(dst + kb * 512 + r * 32, v);
    }
  }
}

// c: 32 rows x (16 gate | 16 up) floats of rows [m, m + 32) and columns [n, n + 16) -> out.
STLLM_AMX void swiglu_block(const float* c, int64_t m, int64_t n, int64_t M, int64_t I, uint16_t* out) {
  const __mmask16 cols = static_cast<__mmask16>(tail_mask32(I - n) & 0xFFFF);
  const int64_t rows = std::min<int64_t>(32, M - m);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 g = round_bf16x16(_mm512_load_ps(c + r * 32));
    const __m512 u = round_bf16x16(_mm512_load_ps(c + r * 32 + 16));
    _mm256_mask_storeu_epi16(out + (m + r) * I + n, cols, silu_mul_bf16x16(g, u));
  }
}

// Prefetches a panel's next bytes into L2, spread over the k steps that run meanwhile.
struct PanelPrefetch {
  const char* next;  // null: nothing to prefetch
  int64_t lines, per, line = 0;
  PanelPrefetch(const uint16_t* panel, int64_t bytes, int64_t k_steps)
      : next(reinterpret_cast<const char*>(panel)), lines(bytes / 64), per((bytes / 64 + k_steps - 1) / k_steps) {}
  void step() {
    if (next == nullptr || line >= lines) return;
    for (int64_t i = 0; i < per; ++i) _mm_prefetch(next + (line + i) * 64, _MM_HINT_T1);
    line += per;
  }
};

// The 32 rows of A tiles a0/a1 against panel b over k steps [k0, k1), accumulating onto c (32 x
// (16 gate | 16 up) floats, zeros when first) and storing the sums back to c.
STLLM_AMX inline void microkernel(float* c, bool first, const uint16_t* a0, const uint16_t* a1, const uint16_t* b,
                                  int64_t k0, int64_t k1, PanelPrefetch& pf) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, 128);
    _tile_loadd(1, c + 16, 128);
    _tile_loadd(2, c + 512, 128);
    _tile_loadd(3, c + 528, 128);
  }
  for (int64_t kb = k0; kb < k1; ++kb) {
    pf.step();
    _tile_loadd(4, a0 + kb * 512, 64);
    _tile_loadd(5, a1 + kb * 512, 64);
    _tile_loadd(6, b + kb * 1024, 64);
    _tile_loadd(7, b + kb * 1024 + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 512, 128);
  _tile_stored(3, c + 528, 128);
}

// Panels [p0, p1) over all rows (see the header comment).
STLLM_AMX void run_panels(const uint16_t* a, const uint16_t* w, int64_t M, int64_t Mp, int64_t KB, int64_t MB,
                          int64_t I, int64_t p0, int64_t p1, float* cbuf, uint16_t* out) {
  for (int64_t m0 = 0; m0 < Mp; m0 += MB) {
    const int64_t m1 = std::min(m0 + MB, Mp);
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* b = w + p * KB * 1024;
      PanelPrefetch pf(p + 1 < p1 ? b + KB * 1024 : nullptr, KB * 2048, (m1 - m0) / 32 * KB);  // the next panel
      for (int64_t k0 = 0; k0 < KB; k0 += KC) {
        const int64_t k1 = std::min(k0 + KC, KB);
        for (int64_t m = m0; m < m1; m += 32) {
          float* c = cbuf + (m - m0) * 32;
          const uint16_t* a0 = a + (m / 16) * KB * 512;
          microkernel(c, k0 == 0, a0, a0 + KB * 512, b, k0, k1, pf);
          if (k1 == KB) swiglu_block(c, m, p * 16, M, I, out);
        }
      }
    }
  }
}

// Wide inputs (K > WIDE_K): rows [m0, m1) of x (at most WIDE_MB) against panels [p0, p1), k in
// chunks of WIDE_KC steps (outermost), so the rows' chunk of x (<= 640 KB) stays in L2 while the
// panels stream past it once per chunk; the panels' partial sums wait in cbig (per panel, 32 x 32
// floats per 32 rows) between chunks, and the SwiGLU runs after the last chunk.
STLLM_AMX void run_rows_chunked(const uint16_t* a, const uint16_t* w, int64_t M, int64_t KB, int64_t I, int64_t p0,
                                int64_t p1, int64_t m0, int64_t m1, float* cbig, uint16_t* out) {
  const int64_t steps = (m1 - m0) / 32;
  for (int64_t k0 = 0; k0 < KB; k0 += WIDE_KC) {
    const int64_t k1 = std::min(k0 + WIDE_KC, KB);
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* b = w + p * KB * 1024;
      // the next panel's part of this chunk
      PanelPrefetch pf(p + 1 < p1 ? b + KB * 1024 + k0 * 1024 : nullptr, (k1 - k0) * 2048, steps * (k1 - k0));
      for (int64_t m = m0; m < m1; m += 32) {
        float* c = cbig + ((p - p0) * steps + (m - m0) / 32) * 1024;
        const uint16_t* a0 = a + (m / 16) * KB * 512;
        microkernel(c, k0 == 0, a0, a0 + KB * 512, b, k0, k1, pf);
        if (k1 == KB) swiglu_block(c, m, p * 16, M, I, out);
      }
    }
  }
}

}  // namespace

bool amx_swiglu_available() { return amx::cpu_has_amx_bf16(); }

at::Tensor amx_swiglu_pack(const at::Tensor& weight) {
  STLLM_CHECK_INPUT(weight);
  STLLM_CHECK_DIM(weight, 2);
  STLLM_CHECK_DTYPE(weight, at::kBFloat16);
  const int64_t I = weight.size(0) / 2, K = weight.size(1);
  TORCH_CHECK(weight.size(0) % 2 == 0 && I > 0 && K > 0,
              "amx_swiglu_pack: weight must be the fused [gate; up] projection [2I, K], got ", weight.sizes());
  const int64_t KB = round_up(K, 32) / 32, NP = round_up(I, 16) / 16;
  at::Tensor packed = at::empty({NP * KB * 1024}, weight.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, NP, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int h = 0; h < 2; ++h)
          for (int kp = 0; kp < 16; ++kp)
            for (int n = 0; n < 16; ++n)
              for (int j = 0; j < 2; ++j) {
                const int64_t col = p * 16 + n, k = kb * 32 + 2 * kp + j;
                dst[((p * KB + kb) * 2 + h) * 512 + kp * 32 + n * 2 + j] =
                    col < I && k < K ? w[(h * I + col) * K + k] : 0;
              }
  });
  return packed;
}

// See the header comment; ``in_features``: K, ``intermediate``: I of the packed weight.
at::Tensor amx_swiglu(const at::Tensor& x, const at::Tensor& packed, int64_t in_features, int64_t intermediate) {
  TORCH_CHECK(amx_swiglu_available(), "amx_swiglu: this CPU (or kernel) has no AMX-BF16 tiles");
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_DIM(x, 2);
  STLLM_CHECK_DTYPE(x, at::kBFloat16);
  STLLM_CHECK_INPUT(packed);
  STLLM_CHECK_DTYPE(packed, at::kBFloat16);
  const int64_t M = x.size(0), K = in_features, I = intermediate;
  TORCH_CHECK(K > 0 && I > 0 && x.size(1) == K, "amx_swiglu: x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || K == 1, "amx_swiglu: x needs a contiguous last dim, got strides ", x.strides());
  const int64_t KB = round_up(K, 32) / 32, NP = round_up(I, 16) / 16;
  TORCH_CHECK(packed.numel() == NP * KB * 1024, "amx_swiglu: packed weight has ", packed.numel(),
              " values, a [", 2 * I, ", ", K, "] weight packs to ", NP * KB * 1024, " (use amx_swiglu_pack)");
  at::Tensor out = at::empty({M, I}, x.options());
  if (M == 0) return out;
  const int64_t Mp = round_up(M, 32);
  thread_local amx::KeptBuffer a_scratch;
  at::Tensor a_fresh;
  uint16_t* a = static_cast<uint16_t*>(a_scratch.get(Mp * KB * 32 * (int64_t)sizeof(uint16_t), a_fresh));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t xs = x.stride(0);
  at::parallel_for(0, Mp / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pack_a_tile(xp, xs, M, K, KB, i * 16, a + i * KB * 512);
  });
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  if (KB * 32 > WIDE_K) {
    // Wide: k chunk by chunk; the threads split the rows (32-row steps) when there are enough of
    // them, else the panels.
    const int64_t steps = Mp / 32, threads = at::get_num_threads();
    const bool by_rows = steps >= 2 * threads;
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(threads, by_rows ? steps : NP));
    at::parallel_for(0, nth, 1, [&](int64_t begin, int64_t end) {
      thread_local amx::KeptBuffer c_scratch;
      const amx::TileScope tiles;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = by_rows ? steps * t / nth * 32 : 0, r1 = by_rows ? steps * (t + 1) / nth * 32 : Mp;
        const int64_t p0 = by_rows ? 0 : NP * t / nth, p1 = by_rows ? NP : NP * (t + 1) / nth;
        at::Tensor c_fresh;
        float* cbig = static_cast<float*>(
            c_scratch.get((p1 - p0) * std::min(WIDE_MB, r1 - r0) * 32 * (int64_t)sizeof(float), c_fresh));
        for (int64_t m0 = r0; m0 < r1; m0 += WIDE_MB)
          run_rows_chunked(a, w, M, KB, I, p0, p1, m0, std::min(m0 + WIDE_MB, r1), cbig, o);
      }
    });
    return out;
  }
  const int64_t MB = std::clamp<int64_t>(BLOCK_BYTES / (KB * 64) / 32 * 32, 32, Mp);
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), NP));
  at::parallel_for(0, nth, 1, [&](int64_t begin, int64_t end) {
    thread_local amx::KeptBuffer c_scratch;
    at::Tensor c_fresh;
    float* cbuf = static_cast<float*>(c_scratch.get(MB * 32 * (int64_t)sizeof(float), c_fresh));
    const amx::TileScope tiles;
    for (int64_t t = begin; t < end; ++t) run_panels(a, w, M, Mp, KB, MB, I, NP * t / nth, NP * (t + 1) / nth, cbuf, o);
  });
  return out;
}

#else  // not x86-64: no AMX

bool amx_swiglu_available() { return false; }

at::Tensor amx_swiglu_pack(const at::Tensor&) {
  TORCH_CHECK(false, "amx_swiglu_pack: this build has no AMX kernel (not x86-64)");
}

at::Tensor amx_swiglu(const at::Tensor&, const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "amx_swiglu: this build has no AMX kernel (not x86-64)");
}
#endif

void register_amx_swiglu(pybind11::module_& m) {
  m.def("amx_swiglu_available", &amx_swiglu_available,
        "True when this CPU and kernel run AMX-BF16 tiles (amx_swiglu can run)");
  m.def("amx_swiglu_pack", &amx_swiglu_pack, "pack a bf16 fused [gate; up] weight [2I, K] for amx_swiglu",
        pybind11::arg("weight"));
  m.def("amx_swiglu", &amx_swiglu, "bf16 silu(x Wg^T) * (x Wu^T) on AMX tiles (packed [gate; up] weight)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("in_features"), pybind11::arg("intermediate"));
}

}  // namespace stllm
