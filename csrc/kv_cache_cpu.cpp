// CPU write of new keys/values into the paged KV cache: token n goes to slot_mapping[n]
// (= block_id * block_size + offset); slots < 0 are skipped (padding / already cached).
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"
#include "ops.h"

namespace stllm {

// k, v [N, Hk, d] (each token's Hk*d values contiguous; any token stride);
// k_cache, v_cache [num_blocks, block_size, Hk, d] contiguous, same dtype; slot_mapping [N] int64.
void write_kv_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  STLLM_CHECK_CPU(k);
  STLLM_CHECK_CPU(v);
  STLLM_CHECK_INPUT(k_cache);
  STLLM_CHECK_INPUT(v_cache);
  STLLM_CHECK_INPUT(slot_mapping);
  STLLM_CHECK_DIM(k, 3);
  STLLM_CHECK_DIM(v, 3);
  STLLM_CHECK_DIM(k_cache, 4);
  STLLM_CHECK_DIM(slot_mapping, 1);
  STLLM_CHECK_DTYPE(slot_mapping, at::kLong);
  TORCH_CHECK(k.sizes() == v.sizes(), "k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ",
              v_cache.sizes(), " must have the same shape");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              "k, v, k_cache, v_cache must share a dtype, got ", k.scalar_type(), ", ", v.scalar_type(),
              ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const int64_t N = k.size(0), Hk = k.size(1), d = k.size(2);
  TORCH_CHECK(k_cache.size(2) == Hk && k_cache.size(3) == d, "k [N, Hk, d] = ", k.sizes(),
              " does not match the cache's [.., .., Hk, d] = ", k_cache.sizes());
  TORCH_CHECK(slot_mapping.size(0) == N, "slot_mapping has ", slot_mapping.size(0), " entries, expected ", N);
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == d && v.stride(2) == 1 && v.stride(1) == d,
              "k and v must be contiguous over [Hk, d] for each token");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK_INDEX(slots[n] < num_slots, "slot_mapping[", n, "] = ", slots[n],
                      " out of range for a cache of ", num_slots, " slots");
  const int64_t row_bytes = Hk * d * static_cast<int64_t>(k.element_size());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (slots[n] < 0) continue;
      std::memcpy(kc + slots[n] * row_bytes, kp + n * ks, row_bytes);
      std::memcpy(vc + slots[n] * row_bytes, vp + n * vs, row_bytes);
    }
  });
}

void register_kv_cache(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("write_kv_cache", &write_kv_cache_cpu, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"),
        "In place: k_cache/v_cache.view(-1, Hk, d)[slot_mapping[n]] = k/v[n] for slot >= 0.");
}

}  // namespace stllm
