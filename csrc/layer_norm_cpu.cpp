// CPU LayerNorm of the vision side (EVA ViT blocks, ln_vision, the Q-Former's BERT layers):
//   out = T((x - mean) * rstd * w + b),  mean/var over the last dim in float32 (two passes over
//   the row, which stays in L1), rstd = 1 / sqrt(var + eps).
// x [N, H] float32 or bfloat16 (rows may be strided, the last dim contiguous); weight/bias [H] of
// x's dtype, upcast to float32; out [N, H] contiguous of x's dtype: one rounding at the end, as
// torch's bfloat16 layer_norm (float32 math) and as `F.layer_norm(x.float(), w.float(),
// b.float()).to(T)` (ln_vision); equal up to the reduction order of the statistics. torch's own
// CPU op took 360 us for [4112, 256] bfloat16 (2 threads) where one copy of x takes 92 us.
#include <ATen/Parallel.h>

#include "avx512_bf16.h"
#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace stllm {
namespace {

template <typename T>
STLLM_CLONES void ln_row(const T* __restrict x, const T* __restrict w, const T* __restrict b,
                         T* __restrict out, int64_t H, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < H; ++i) sum += to_float(x[i]);
  const float mean = sum / static_cast<float>(H);
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float d = to_float(x[i]) - mean;
    ss += d * d;
  }
  const float rstd = 1.0f / __builtin_sqrtf(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i)
    out[i] = from_float<T>((to_float(x[i]) - mean) * rstd * to_float(w[i]) + to_float(b[i]));
}

#ifdef STLLM_X86_SIMD
// bfloat16 rows on 16 lanes: the mean, then the variance about it, then the affine output, each a
// pass over the row (in L1), with the CPU's own float -> bfloat16 rounding (vcvtneps2bf16).
STLLM_BF16_TARGET void ln_row_bf16(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict w,
                                   const c10::BFloat16* __restrict b, c10::BFloat16* __restrict out, int64_t H,
                                   float eps) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= H; i += 32) {
    s0 = _mm512_add_ps(s0, load_bf16x16(x + i));
    s1 = _mm512_add_ps(s1, load_bf16x16(x + i + 16));
  }
  for (; i < H; i += 16) s0 = _mm512_add_ps(s0, load_bf16x16(x + i, tail_mask16(H - i)));
  const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(H);
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
  for (i = 0; i + 32 <= H; i += 32) {
    const __m512 d0 = _mm512_sub_ps(load_bf16x16(x + i), vm), d1 = _mm512_sub_ps(load_bf16x16(x + i + 16), vm);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
  }
  for (; i < H; i += 16) {
    const __mmask16 m = tail_mask16(H - i);
    const __m512 d = _mm512_maskz_sub_ps(m, load_bf16x16(x + i, m), vm);
    q0 = _mm512_fmadd_ps(d, d, q0);
  }
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / static_cast<float>(H);
  const __m512 vr = _mm512_set1_ps(1.0f / __builtin_sqrtf(var + eps));
  for (i = 0; i < H; i += 16) {
    const __mmask16 m = tail_mask16(H - i);
    const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(load_bf16x16(x + i, m), vm), vr),
                                     load_bf16x16(w + i, m), load_bf16x16(b + i, m));
    _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(y));
  }
}
#endif

template <typename T>
void layer_norm_row(const T* x, const T* w, const T* b, T* out, int64_t H, float eps) {
  ln_row(x, w, b, out, H, eps);
}

template <>
void layer_norm_row<c10::BFloat16>(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* b,
                                   c10::BFloat16* out, int64_t H, float eps) {
#ifdef STLLM_X86_SIMD
  if (avx512_bf16_supported()) return ln_row_bf16(x, w, b, out, H, eps);
#endif
  ln_row(x, w, b, out, H, eps);
}

}  // namespace

void layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                    double eps) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_INPUT(weight);
  STLLM_CHECK_INPUT(bias);
  STLLM_CHECK_INPUT(out);
  STLLM_CHECK_F32_BF16(x);
  STLLM_CHECK_DIM(x, 2);
  STLLM_CHECK_DIM(weight, 1);
  STLLM_CHECK_DIM(bias, 1);
  TORCH_CHECK(x.stride(1) == 1, "x must be contiguous along the normalised dim");
  const int64_t N = x.size(0), H = x.size(1), xs = x.stride(0);
  TORCH_CHECK(weight.size(0) == H && bias.size(0) == H, "weight/bias have ", weight.size(0), "/", bias.size(0),
              " entries, x has width ", H);
  TORCH_CHECK(out.sizes() == x.sizes(), "out ", out.sizes(), " must have x's shape ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "x, weight, bias and out must share a dtype, got ", x.scalar_type(), ", ", weight.scalar_type(), ", ",
              bias.scalar_type(), ", ", out.scalar_type());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t s, int64_t e) {
      for (int64_t n = s; n < e; ++n) layer_norm_row(xp + n * xs, wp, bp, op + n * H, H, static_cast<float>(eps));
    });
  });
}

void register_layer_norm(pybind11::module_& m) {
  m.def("layer_norm", &layer_norm_cpu, "LayerNorm of x [N, H] into out (CPU, float32 statistics)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("out"),
        pybind11::arg("eps"));
}

}  // namespace stllm
