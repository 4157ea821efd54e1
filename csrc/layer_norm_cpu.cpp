// CPU LayerNorm of the vision side (EVA ViT blocks, ln_vision, the Q-Former's BERT layers):
//   out = T((x - mean) * rstd * w + b),  mean/var over the last dim in float32 (two passes over
//   the row, which stays in L1), rstd = 1 / sqrt(var + eps).
// x [N, H] float32 or bfloat16 (rows may be strided, the last dim contiguous); weight/bias [H] of
// x's dtype, upcast to float32; out [N, H] contiguous of x's dtype: one rounding at the end, as
// torch's bfloat16 layer_norm (float32 math) and as `F.layer_norm(x.float(), w.float(),
// b.float()).to(T)` (ln_vision); equal up to the reduction order of the statistics. torch's own
// CPU op took 360 us for [4112, 256] bfloat16 (2 threads) where one copy of x takes 92 us.
#include <ATen/Parallel.h>

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
      for (int64_t n = s; n < e; ++n) ln_row(xp + n * xs, wp, bp, op + n * H, H, static_cast<float>(eps));
    });
  });
}

void register_layer_norm(pybind11::module_& m) {
  m.def("layer_norm", &layer_norm_cpu, "LayerNorm of x [N, H] into out (CPU, float32 statistics)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("out"),
        pybind11::arg("eps"));
}

}  // namespace stllm
