// Registration hooks of the compiled core: each csrc/*.cpp defines one register_* function that
// adds its functions to the single PYBIND11_MODULE in bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace stllm {
void register_block_allocator(pybind11::module_& m);
void register_kv_cache(pybind11::module_& m);
void register_paged_attention(pybind11::module_& m);
void register_packing(pybind11::module_& m);
void register_rms_norm(pybind11::module_& m);
void register_layer_norm(pybind11::module_& m);
void register_rotary(pybind11::module_& m);
void register_activation(pybind11::module_& m);
void register_llama_decode(pybind11::module_& m);
void register_flash_attention_amx(pybind11::module_& m);
void register_amx_swiglu(pybind11::module_& m);
}  // namespace stllm
