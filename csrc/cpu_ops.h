// The CPU kernels of the compiled core as C++ functions, for kernels that chain them
// (llama_decode_cpu.cpp). Each is defined and documented in its own csrc/*_cpu.cpp file.
#pragma once
#include <torch/extension.h>

namespace stllm {
void rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps);
void add_rms_norm_cpu(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, at::Tensor& out,
                      double eps);
void rotary_embedding_cpu(at::Tensor& x, int64_t num_heads, int64_t head_dim, const at::Tensor& cos,
                          const at::Tensor& sin);
void silu_and_mul_cpu(const at::Tensor& x, at::Tensor& out);
void write_kv_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slot_mapping);
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                                      c10::optional<double> scale);
}  // namespace stllm
