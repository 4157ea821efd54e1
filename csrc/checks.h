// Boundary checks shared by the CPU kernels (TORCH_CHECK raises RuntimeError naming the argument).
#pragma once
#include <torch/extension.h>

#define STLLM_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define STLLM_CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define STLLM_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got shape ", (x).sizes())
#define STLLM_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define STLLM_CHECK_FLOAT(x)                                                              \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||   \
                  (x).scalar_type() == at::kHalf,                                         \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())
#define STLLM_CHECK_INPUT(x) \
  STLLM_CHECK_CPU(x);        \
  STLLM_CHECK_CONTIG(x)
#define STLLM_CHECK_F32_BF16(x)                                                         \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16,   \
              #x " must be float32 or bfloat16, got ", (x).scalar_type())
