// CPU row gather/scatter (the data movement of token packing and its backward): OpenMP memcpy of
// whole rows; scatter sums rows that share an index.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace stllm {
namespace {

// Range check of index [N] against `rows`; returns true if some index repeats.
bool check_index(const at::Tensor& index, int64_t rows, const char* what) {
  STLLM_CHECK_INPUT(index);
  STLLM_CHECK_DIM(index, 1);
  STLLM_CHECK_DTYPE(index, at::kLong);
  const int64_t* idx = index.data_ptr<int64_t>();
  std::vector<uint8_t> seen(rows, 0);
  bool dup = false;
  for (int64_t n = 0; n < index.size(0); ++n) {
    TORCH_CHECK_INDEX(idx[n] >= 0 && idx[n] < rows, what, ": index[", n, "] = ", idx[n],
                      " out of range [0, ", rows, ")");
    dup |= seen[idx[n]]++ > 0;
  }
  return dup;
}

template <typename T>
void accumulate_rows(const at::Tensor& src, const int64_t* idx, at::Tensor& out) {
  const int64_t N = src.size(0), D = src.size(1), ss = src.stride(0);
  const T* sp = src.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t n = 0; n < N; ++n) {
    T* dst = op + idx[n] * D;
    for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(static_cast<float>(dst[x]) + static_cast<float>(sp[n * ss + x]));
  }
}

}  // namespace

// x [M, D] (rows contiguous, any row stride); index [N] int64 in [0, M). Returns x[index] [N, D].
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index) {
  STLLM_CHECK_CPU(x);
  STLLM_CHECK_DIM(x, 2);
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x must be contiguous along dim 1");
  check_index(index, x.size(0), "gather_rows");
  const int64_t N = index.size(0), D = x.size(1);
  at::Tensor out = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  const int64_t row_bytes = D * x.element_size(), xs = x.stride(0) * x.element_size();
  const int64_t* idx = index.data_ptr<int64_t>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) std::memcpy(op + n * row_bytes, xp + idx[n] * xs, row_bytes);
  });
  return out;
}

// src [N, D] (rows contiguous); index [N] int64 in [0, num_rows). Returns [num_rows, D]: zeros,
// plus src[n] added at row index[n] (a plain copy when indices are unique).
at::Tensor scatter_rows_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_rows) {
  STLLM_CHECK_CPU(src);
  STLLM_CHECK_DIM(src, 2);
  TORCH_CHECK(src.stride(1) == 1 || src.size(1) <= 1, "src must be contiguous along dim 1");
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0), "index must be [N] with N = src.size(0) = ",
              src.size(0), ", got ", index.sizes());
  const bool dup = check_index(index, num_rows, "scatter_rows");
  const int64_t N = src.size(0), D = src.size(1);
  at::Tensor out = at::zeros({num_rows, D}, src.options());
  if (N == 0 || D == 0) return out;
  const int64_t* idx = index.data_ptr<int64_t>();
  if (dup) {
    switch (src.scalar_type()) {
      case at::kFloat: accumulate_rows<float>(src, idx, out); break;
      case at::kBFloat16: accumulate_rows<at::BFloat16>(src, idx, out); break;
      case at::kHalf: accumulate_rows<at::Half>(src, idx, out); break;
      default: TORCH_CHECK(false, "scatter_rows with repeated indices needs a float dtype, got ", src.scalar_type());
    }
    return out;
  }
  const int64_t row_bytes = D * src.element_size(), ss = src.stride(0) * src.element_size();
  const char* sp = static_cast<const char*>(src.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) std::memcpy(op + idx[n] * row_bytes, sp + n * ss, row_bytes);
  });
  return out;
}

void register_packing(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gather_rows", &gather_rows_cpu, py::arg("x"), py::arg("index"), "x [M, D], index [N] int64 -> x[index] [N, D].");
  m.def("scatter_rows", &scatter_rows_cpu, py::arg("src"), py::arg("index"), py::arg("num_rows"),
        "src [N, D], index [N] int64 -> [num_rows, D], zeros elsewhere; repeated indices are summed.");
}

}  // namespace stllm
