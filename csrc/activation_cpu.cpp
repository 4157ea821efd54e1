// CPU SwiGLU of the fused gate_up projection: x [N, 2I] = [gate | up] -> out [N, I] =
// T(T(silu(gate)) * up), rounded like torch's `F.silu(gate) * up` (silu in float32 through
// exp_approx, which is within ~2 float ulp of expf).
#include <ATen/Parallel.h>

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

}  // namespace

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
      for (int64_t n = b; n < e; ++n) silu_mul_row(xp + n * xs, xp + n * xs + I, op + n * I, I);
    });
  });
}

void register_activation(pybind11::module_& m) {
  m.def("silu_and_mul", &silu_and_mul_cpu, "out = silu(gate) * up for x = [gate | up] (CPU)",
        pybind11::arg("x"), pybind11::arg("out"));
}

}  // namespace stllm
