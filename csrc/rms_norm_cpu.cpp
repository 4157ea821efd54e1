// CPU RMSNorm of LLaMA, optionally fused with the residual add that precedes it:
//   rms_norm:      out = w * T(x / rms(x))                       (statistics in float32)
//   add_rms_norm_: residual = T(residual + x) (in place); out = w * T(residual / rms(residual))
// Every intermediate is rounded to the tensor dtype T where torch's op-by-op version rounds, so
// results equal `weight * (h * rsqrt(mean(h^2) + eps)).to(T)` with h = x.float().
#include <ATen/Parallel.h>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace stllm {
namespace {

template <typename T>
STLLM_CLONES void norm_row(const T* __restrict x, const T* __restrict w, T* __restrict out, int64_t H,
                           float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = to_float(x[i]);
    ss += v * v;
  }
  const float inv = 1.0f / __builtin_sqrtf(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i)
    out[i] = from_float<T>(to_float(w[i]) * round_as<T>(to_float(x[i]) * inv));
}

template <typename T>
STLLM_CLONES void add_row(const T* __restrict x, T* __restrict res, int64_t H) {
  for (int64_t i = 0; i < H; ++i) res[i] = from_float<T>(to_float(res[i]) + to_float(x[i]));
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_INPUT(weight);
  STLLM_CHECK_INPUT(out);
  STLLM_CHECK_F32_BF16(x);
  STLLM_CHECK_DIM(x, 2);
  STLLM_CHECK_DIM(weight, 1);
  TORCH_CHECK(x.stride(1) == 1, "x must be contiguous along the hidden dim");
  TORCH_CHECK(weight.size(0) == x.size(1), "weight has ", weight.size(0), " entries, x has hidden size ",
              x.size(1));
  TORCH_CHECK(out.sizes() == x.sizes(), "out ", out.sizes(), " must have x's shape ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "x, weight and out must share a dtype, got ", x.scalar_type(), ", ", weight.scalar_type(),
              ", ", out.scalar_type());
}

int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)); }

}  // namespace

// x [N, H] (rows may be strided), weight [H], out [N, H] contiguous.
void rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  check_norm_args(x, weight, out);
  const int64_t N = x.size(0), H = x.size(1), xs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(H), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) norm_row(xp + n * xs, wp, op + n * H, H, static_cast<float>(eps));
    });
  });
}

// residual [N, H] contiguous, updated in place to residual + x; out = rms_norm(residual).
void add_rms_norm_cpu(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                      at::Tensor& out, double eps) {
  check_norm_args(x, weight, out);
  STLLM_CHECK_INPUT(residual);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual ", residual.sizes(), " ", residual.scalar_type(), " must match x ", x.sizes(), " ",
              x.scalar_type());
  const int64_t N = x.size(0), H = x.size(1), xs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(H), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        add_row(xp + n * xs, rp + n * H, H);
        norm_row(static_cast<const scalar_t*>(rp + n * H), wp, op + n * H, H, static_cast<float>(eps));
      }
    });
  });
}

void register_rms_norm(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm_cpu, "RMSNorm of x [N, H] into out (CPU)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("out"), pybind11::arg("eps"));
  m.def("add_rms_norm_", &add_rms_norm_cpu, "residual += x; out = RMSNorm(residual) (CPU)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("out"),
        pybind11::arg("eps"));
}

}  // namespace stllm
