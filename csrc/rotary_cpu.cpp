// CPU rotary embedding (rotate-half / GPT-NeoX convention of LLaMA), in place on the first
// `num_heads` heads of each row, which is where q and k sit in the fused qkv projection output:
//   x [N, >= num_heads * d] (row stride any, heads contiguous), cos/sin [N, d] contiguous
//   x[h, i]       = T(T(x1 * cos[i])       + T(-x2 * sin[i]))        i < d/2
//   x[h, i + d/2] = T(T(x2 * cos[i + d/2]) + T( x1 * sin[i + d/2]))
// with x1 = x[h, i], x2 = x[h, i + d/2] and T the dtype rounding of torch's op-by-op
// `x * cos + cat(-x2, x1) * sin`. bfloat16 on CPUs with AVX512-BF16: 16 lanes with vcvtneps2bf16
// for those roundings (the same bits; bench-cpu prefill, 593 rows x 32 heads of 64, 2 threads:
// 0.28 -> 0.18 ms).
#include <ATen/Parallel.h>

#include "avx512_bf16.h"
#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace stllm {
namespace {

template <typename T>
STLLM_CLONES void rotate_row(T* __restrict x, const T* __restrict c, const T* __restrict s, int64_t heads,
                             int64_t d) {
  const int64_t h2 = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* __restrict xh = x + h * d;
    for (int64_t i = 0; i < h2; ++i) {
      const float x1 = to_float(xh[i]), x2 = to_float(xh[i + h2]);
      const float a = round_as<T>(x1 * to_float(c[i])) + round_as<T>(-x2 * to_float(s[i]));
      const float b = round_as<T>(x2 * to_float(c[i + h2])) + round_as<T>(x1 * to_float(s[i + h2]));
      xh[i] = from_float<T>(a);
      xh[i + h2] = from_float<T>(b);
    }
  }
}

#ifdef STLLM_X86_SIMD
// rotate_row for bfloat16 on 16 lanes (masked at the end of each half head): the same roundings.
STLLM_BF16_TARGET void rotate_row_bf16(c10::BFloat16* __restrict x, const c10::BFloat16* __restrict c,
                                        const c10::BFloat16* __restrict s, int64_t heads, int64_t d) {
  const int64_t h2 = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    c10::BFloat16* __restrict xh = x + h * d;
    for (int64_t i = 0; i < h2; i += 16) {
      const __mmask16 m = tail_mask16(h2 - i);
      const __m512 x1 = load_bf16x16(xh + i, m), x2 = load_bf16x16(xh + i + h2, m);
      const __m512 a = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(c + i, m))),
                                     round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2),
                                                              load_bf16x16(s + i, m))));
      const __m512 b = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, load_bf16x16(c + i + h2, m))),
                                     round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(s + i + h2, m))));
      _mm256_mask_storeu_epi16(xh + i, m, (__m256i)_mm512_cvtneps_pbh(a));
      _mm256_mask_storeu_epi16(xh + i + h2, m, (__m256i)_mm512_cvtneps_pbh(b));
    }
  }
}
#endif

template <typename T>
void rotate(T* x, const T* c, const T* s, int64_t heads, int64_t d) {
  rotate_row(x, c, s, heads, d);
}

template <>
void rotate<c10::BFloat16>(c10::BFloat16* x, const c10::BFloat16* c, const c10::BFloat16* s, int64_t heads,
                           int64_t d) {
#ifdef STLLM_X86_SIMD
  if (avx512_bf16_supported()) return rotate_row_bf16(x, c, s, heads, d);
#endif
  rotate_row(x, c, s, heads, d);
}

}  // namespace

void rotary_embedding_cpu(at::Tensor& x, int64_t num_heads, int64_t head_dim, const at::Tensor& cos,
                          const at::Tensor& sin) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_F32_BF16(x);
  STLLM_CHECK_INPUT(cos);
  STLLM_CHECK_INPUT(sin);
  STLLM_CHECK_DIM(x, 2);
  STLLM_CHECK_DIM(cos, 2);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim must be positive and even, got ", head_dim);
  TORCH_CHECK(num_heads >= 0 && num_heads * head_dim <= x.size(1), "num_heads * head_dim = ",
              num_heads * head_dim, " exceeds the row width ", x.size(1));
  TORCH_CHECK(x.stride(1) == 1, "x must be contiguous along a row");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == head_dim,
              "cos/sin must be [N, head_dim] = [", x.size(0), ", ", head_dim, "], got ", cos.sizes(), ", ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos/sin must have x's dtype ", x.scalar_type());
  const int64_t N = x.size(0), xs = x.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, num_heads * head_dim));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rotary_embedding_cpu", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        rotate(xp + n * xs, cp + n * head_dim, sp + n * head_dim, num_heads, head_dim);
    });
  });
}

void register_rotary(pybind11::module_& m) {
  m.def("rotary_embedding_", &rotary_embedding_cpu,
        "rotate the first num_heads heads of each row of x in place (CPU)", pybind11::arg("x"),
        pybind11::arg("num_heads"), pybind11::arg("head_dim"), pybind11::arg("cos"), pybind11::arg("sin"));
}

}  // namespace stllm
