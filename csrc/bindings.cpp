// The one PYBIND11_MODULE of stllm_engine._C. Each csrc/*.cpp exposes a register_* function
// declared in ops.h; this file only binds them.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stllm-engine compiled core";
  m.def("omp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  stllm::register_block_allocator(m);
  stllm::register_kv_cache(m);
  stllm::register_paged_attention(m);
  stllm::register_packing(m);
  stllm::register_rms_norm(m);
  stllm::register_layer_norm(m);
  stllm::register_rotary(m);
  stllm::register_activation(m);
  stllm::register_llama_decode(m);
  stllm::register_flash_attention_amx(m);
  stllm::register_amx_swiglu(m);
}
