// Float32 inner loops of the CPU paged attention kernels, compiled for several x86 levels
// (AVX-512 / AVX2+FMA / baseline) and picked at load time, so the build needs no -march flag.
#pragma once
#include <cstdint>

namespace stllm {

// Adds keys [t0, t0 + n) of one KV block to the online-softmax state of R query rows.
//   q      [R, d]   float32, already multiplied by the softmax scale
//   limit  [R]      row r sees keys at positions < limit[r] (causal mask; rows with none are skipped)
//   k, v   n rows of d floats, row t at k + t * kv_stride
//   s      [R, n]   scratch
//   acc    [R, d]   running sum of p * v;  m [R] running max (init -inf);  l [R] running sum of p
void attend_block(int R, int d, const float* q, const int64_t* limit, int64_t t0, int n,
                  const float* k, const float* v, int64_t kv_stride, float* s, float* acc,
                  float* m, float* l);

// Whole-context attention of R query rows that all see the same `ctx` keys (a decode step's GQA
// group): two passes straight from the paged cache, no per-block rescaling and no conversion
// copies. K/V rows are float32 or bfloat16 bits (`bf16`), converted inside the loops.
//   q       [R, d] float32, already multiplied by the softmax scale
//   blocks  block ids of the sequence; key t lives at (blocks[t / bs] * bs + t % bs) * tok_stride
//           + head_off elements from k / v
//   s       [R, ctx] scratch;  out [R, d] float32 (softmax-weighted sum of the values)
void attend_context(int R, int d, const float* q, int64_t ctx, const int32_t* blocks, int64_t bs,
                    const void* k, const void* v, bool bf16, int64_t tok_stride, int64_t head_off,
                    float* s, float* out);

// dst[t * d + i] = float(src[t * src_stride + i]) for t < n, i < d (bfloat16 bits in, float out).
void bf16_rows_to_float(const uint16_t* src, int64_t src_stride, int n, int d, float* dst);

// Software prefetch of n rows of row_bytes each (the next KV block: its rows are strided, so the
// hardware prefetcher does not see them coming).
void prefetch_rows(const void* base, int64_t stride_bytes, int n, int64_t row_bytes);

}  // namespace stllm
