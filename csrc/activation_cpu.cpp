// CPU activations:
// * SwiGLU of the fused gate_up projection: x [N, 2I] = [gate | up] -> out [N, I] =
//   T(T(silu(gate)) * up), rounded like torch's `F.silu(gate) * up` (silu in float32 through
//   exp_approx, which is within ~2 float ulp of expf). bfloat16 on CPUs with AVX512-BF16 runs an
//   explicit 16-lane version whose float -> bfloat16 roundings are vcvtneps2bf16 (the emulated
//   rounding of the auto-vectorized loop cost ~25%: [608, 2 x 2816], 2 threads, 0.70 -> 0.57 ms).
// * Any element-wise function of a 16-bit dtype as a table lookup over all 65536 bit patterns,
//   in place (the GELU after the ViT/Q-Former fc1: the table holds torch's own results, so the
//   lookup is bit-identical to the torch op it was built from).
#include <ATen/Parallel.h>

#include "avx512_bf16.h"
#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace stllm {
namespace {

template <typename T>
STLLM_CLONES void silu_mul_row(const T* __restrict g, const T* __restrict u, T* __restrict out, int64_t I) {
  for (int64_t i = 0; i < I; ++i) {
    const float x = to_float(g[i]);
    const float s = round_as<T>(x / (1.0f + exp_approx(-x)));
    out[i] = from_float<T>(s * to_float(u[i]));
  }
}

// x[i] = table[x[i]] over n 16-bit values (table: 65536 entries + 1 padding entry).
void lookup16_scalar(uint16_t* __restrict x, const uint16_t* __restrict table, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = table[x[i]];
}

#ifdef STLLM_X86_SIMD
// 16 lookups per dword gather at byte offset 2 * x[i]: the low half of each gathered dword is the
// entry (the padding entry keeps the read of the last one inside the table).
__attribute__((target("avx512f,avx512bw"))) void lookup16_avx512(uint16_t* __restrict x,
                                                                  const uint16_t* __restrict table, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    const __m512i got = _mm512_i32gather_epi32(idx, table, 2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), _mm512_cvtepi32_epi16(got));
  }
  lookup16_scalar(x + i, table, n - i);
}
#endif

void lookup16(uint16_t* x, const uint16_t* table, int64_t n) {
#ifdef STLLM_X86_SIMD
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512) return lookup16_avx512(x, table, n);
#endif
  lookup16_scalar(x, table, n);
}

#ifdef STLLM_X86_SIMD
// bfloat16 SwiGLU row with the CPU's own float -> bfloat16 rounding (round_bf16x16).
STLLM_BF16_TARGET void silu_mul_row_bf16(const c10::BFloat16* __restrict g, const c10::BFloat16* __restrict u,
                                          c10::BFloat16* __restrict out, int64_t I) {
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), silu_mul_bf16x16(load_bf16x16(g + i), load_bf16x16(u + i)));
  }
  silu_mul_row(g + i, u + i, out + i, I - i);
}
#endif

template <typename T>
void silu_mul(const T* g, const T* u, T* out, int64_t I) {
  silu_mul_row(g, u, out, I);
}

template <>
void silu_mul<c10::BFloat16>(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* out, int64_t I) {
#ifdef STLLM_X86_SIMD
  if (avx512_bf16_supported()) return silu_mul_row_bf16(g, u, out, I);
#endif
  silu_mul_row(g, u, out, I);
}

}  // namespace

constexpr int64_t kTable16 = 65536 + 1;

void lookup16_cpu(at::Tensor& x, const at::Tensor& table) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_INPUT(table);
  TORCH_CHECK(x.element_size() == 2, "x must have a 16-bit dtype (bfloat16/float16), got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(table.scalar_type() == x.scalar_type() && table.dim() == 1 && table.numel() == kTable16,
              "table must be a 1-d ", x.scalar_type(), " tensor of 65536 + 1 entries (one per bit pattern, "
              "then one padding entry), got ", table.scalar_type(), " ", table.sizes());
  auto* xp = reinterpret_cast<uint16_t*>(x.data_ptr());
  const auto* tp = reinterpret_cast<const uint16_t*>(table.data_ptr());
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t e) { lookup16(xp + b, tp, e - b); });
}

void silu_and_mul_cpu(const at::Tensor& x, at::Tensor& out) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_F32_BF16(x);
  STLLM_CHECK_INPUT(out);
  STLLM_CHECK_DIM(x, 2);
  STLLM_CHECK_DIM(out, 2);
  TORCH_CHECK(x.stride(1) == 1, "x must be contiguous along a row");
  TORCH_CHECK(x.size(1) % 2 == 0, "x must hold [gate | up] (an even width), got ", x.sizes());
  const int64_t N = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  TORCH_CHECK(out.size(0) == N && out.size(1) == I && out.scalar_type() == x.scalar_type(), "out must be [",
              N, ", ", I, "] of dtype ", x.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, I));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_and_mul_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) silu_mul(xp + n * xs, xp + n * xs + I, op + n * I, I);
    });
  });
}

void register_activation(pybind11::module_& m) {
  m.def("silu_and_mul", &silu_and_mul_cpu, "out = silu(gate) * up for x = [gate | up] (CPU)",
        pybind11::arg("x"), pybind11::arg("out"));
  m.def("lookup16_", &lookup16_cpu,
        "in place: each 16-bit value of x replaced by table[its bit pattern] (CPU; table 65536 + 1 "
        "entries of x's dtype)",
        pybind11::arg("x"), pybind11::arg("table"));
}

}  // namespace stllm
