// One decode step of the LLaMA decoder on the CPU in a single call: every layer's norms, fused
// projections, rotary embedding, KV-cache write, paged attention and SwiGLU MLP, chained in C++.
// It runs exactly the kernels the Python layer loop (stllm_engine/model/llama.py) calls, in the
// same order, so the result is bit-identical to it; what it removes is the Python between them
// (8 layers x ~15 calls, each with its argument checks): a bench-cpu bf16 step (context 600,
// forward + LM head) 18.3 -> 14.7 ms (benchmarks/decode_step.py).
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "checks.h"
#include "cpu_ops.h"
#include "ops.h"

namespace stllm {
namespace {

// x [B, in] @ W^T: `w` is a oneDNN-packed weight (mkldnn::_linear_pointwise, as PackedLinear) or
// a plain [out, in] weight (at::linear).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, bool packed) {
  if (!packed) return at::linear(x, w);
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(c10::IValue());  // no bias
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

// embeds [B, H]: the new token of each of B sequences; cos/sin [B, d] at their positions.
// norms: 2L + 1 weights [H] (input_layernorm and post_attention_layernorm of each layer, then the
// final norm); linears: 4L weights (qkv_proj, o_proj, gate_up_proj, down_proj of each layer),
// packed[i] says whether linears[i] is oneDNN-packed; k_caches/v_caches: L caches
// [num_blocks, block_size, Hk, d]; slot_mapping [B] int64, block_tables [B, max_blocks] int32,
// context_lens [B] int32 (after this token). Returns the final-normed hidden states [B, H].
at::Tensor llama_decode_cpu(const at::Tensor& embeds, const at::Tensor& cos, const at::Tensor& sin,
                            const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& linears,
                            const std::vector<bool>& packed, const std::vector<at::Tensor>& k_caches,
                            const std::vector<at::Tensor>& v_caches, const at::Tensor& slot_mapping,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  STLLM_CHECK_CPU(embeds);
  STLLM_CHECK_DIM(embeds, 2);
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(v_caches.size()) == L, "need one K and one V cache per layer, got ",
              k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L + 1, "expected ", 2 * L + 1, " norm weights, got ",
              norms.size());
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == 4 * L && packed.size() == linears.size(), "expected ",
              4 * L, " linear weights and flags, got ", linears.size(), " and ", packed.size());
  const int64_t B = embeds.size(0);
  const int64_t qs = num_heads * head_dim, kvs = num_kv_heads * head_dim;
  at::Tensor residual = embeds.contiguous().clone();
  at::Tensor normed = at::empty_like(residual);
  rms_norm_cpu(residual, norms[0], normed, eps);
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor qkv = linear(normed, linears[4 * l], packed[4 * l]);
    TORCH_CHECK(qkv.size(1) == qs + 2 * kvs, "layer ", l, ": qkv_proj gives ", qkv.size(1), " columns, expected ",
                qs + 2 * kvs);
    rotary_embedding_cpu(qkv, num_heads + num_kv_heads, head_dim, cos, sin);
    const at::Tensor q = qkv.narrow(1, 0, qs).view({B, num_heads, head_dim});
    const at::Tensor k = qkv.narrow(1, qs, kvs).view({B, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, qs + kvs, kvs).view({B, num_kv_heads, head_dim});
    at::Tensor kc = k_caches[l], vc = v_caches[l];
    write_kv_cache_cpu(k, v, kc, vc, slot_mapping);
    const at::Tensor o = paged_decode_attention_cpu(q, kc, vc, block_tables, context_lens, scale);
    const at::Tensor a = linear(o.view({B, qs}), linears[4 * l + 1], packed[4 * l + 1]);
    normed = at::empty_like(residual);
    add_rms_norm_cpu(a, residual, norms[2 * l + 1], normed, eps);
    const at::Tensor gu = linear(normed, linears[4 * l + 2], packed[4 * l + 2]);
    at::Tensor act = at::empty({B, gu.size(1) / 2}, gu.options());
    silu_and_mul_cpu(gu, act);
    const at::Tensor down = linear(act, linears[4 * l + 3], packed[4 * l + 3]);
    normed = at::empty_like(residual);
    add_rms_norm_cpu(down, residual, norms[2 * l + 2], normed, eps);
  }
  return normed;
}

void register_llama_decode(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("llama_decode", &llama_decode_cpu, py::arg("embeds"), py::arg("cos"), py::arg("sin"), py::arg("norms"),
        py::arg("linears"), py::arg("packed"), py::arg("k_caches"), py::arg("v_caches"), py::arg("slot_mapping"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("eps"), py::arg("scale"),
        "One LLaMA decode step over all layers (see csrc/llama_decode_cpu.cpp): embeds [B, H] -> "
        "final-normed hidden [B, H].");
}

}  // namespace stllm
