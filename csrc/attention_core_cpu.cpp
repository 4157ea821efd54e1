// Float32 inner loops of the CPU paged attention kernels (see attention_core_cpu.h).
#include "attention_core_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "vec_math.h"


namespace stllm {

namespace {

STLLM_INLINE float load_f(const float* p, int64_t i) { return p[i]; }
STLLM_INLINE float load_f(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// GCC vector types: 16 floats, the lanes of one AVX-512 register (two AVX2 / four SSE registers in
// the other target_clones builds). GCC finishes an `omp simd reduction` with a serial chain of 16
// scalar adds through the stack (most of the decode kernel's time in perf); a shuffle tree takes
// 4 steps and independent dot products overlap.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

STLLM_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
STLLM_INLINE v16f load16(const uint16_t* p) {  // 16 bfloat16 bit patterns -> float
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  const v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

STLLM_INLINE float hsum(v16f x) {
  x += __builtin_shuffle(x, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += __builtin_shuffle(x, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x += __builtin_shuffle(x, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return x[0];
}

// q . k over d elements (float32 q; float32 or bf16-bit k)
template <typename T>
STLLM_INLINE float dot(int d, const float* __restrict q, const T* __restrict k) {
  v16f acc = {};
  int i = 0;
  for (; i + 16 <= d; i += 16) acc += load16(q + i) * load16(k + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += q[i] * load_f(k, i);
  return s;
}

// sr[t] = q . k_t for n keys `stride` elements apart (float32 or bf16 bits)
template <typename T>
STLLM_INLINE void row_scores(int d, const float* __restrict qr, const T* k, int64_t stride, int n,
                             float* __restrict sr) {
  for (int t = 0; t < n; ++t) sr[t] = dot(d, qr, k + t * stride);
}

// o += sum_t pr[t] * v_t over n values `stride` elements apart
template <typename T>
STLLM_INLINE void row_values(int d, const float* __restrict pr, const T* v, int64_t stride, int n,
                             float* __restrict o) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {  // one read-modify-write of o per four value rows
    const float p0 = pr[t], p1 = pr[t + 1], p2 = pr[t + 2], p3 = pr[t + 3];
    const T* __restrict v0 = v + t * stride;
    const T* __restrict v1 = v0 + stride;
    const T* __restrict v2 = v1 + stride;
    const T* __restrict v3 = v2 + stride;
#pragma omp simd
    for (int i = 0; i < d; ++i)
      o[i] += p0 * load_f(v0, i) + p1 * load_f(v1, i) + p2 * load_f(v2, i) + p3 * load_f(v3, i);
  }
  for (; t < n; ++t) {
    const float pt = pr[t];
    const T* __restrict vt = v + t * stride;
#pragma omp simd
    for (int i = 0; i < d; ++i) o[i] += pt * load_f(vt, i);
  }
}

}  // namespace

STLLM_CLONES
void attend_block(int R, int d, const float* q, const int64_t* limit, int64_t t0, int n,
                  const float* k, const float* v, int64_t kv_stride, float* s, float* acc,
                  float* m, float* l) {
  for (int r = 0; r < R; ++r) {
    const int nv = static_cast<int>(std::min<int64_t>(n, limit[r] - t0));
    if (nv <= 0) continue;
    float* __restrict sr = s + static_cast<int64_t>(r) * n;
    row_scores(d, q + static_cast<int64_t>(r) * d, k, kv_stride, nv, sr);
    float mx = m[r];
    for (int j = 0; j < nv; ++j) mx = std::max(mx, sr[j]);
    const float alpha = std::exp(m[r] - mx);  // 0 on the first block (m = -inf)
    float sum = 0.f;
    for (int j = 0; j < nv; ++j) {
      sr[j] = exp_approx(sr[j] - mx);  // vectorizes (std::exp does not)
      sum += sr[j];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
    float* __restrict ar = acc + static_cast<int64_t>(r) * d;
    if (alpha != 1.f) {
#pragma omp simd
      for (int i = 0; i < d; ++i) ar[i] *= alpha;
    }
    row_values(d, sr, v, kv_stride, nv, ar);
  }
}

namespace {

template <typename T>
STLLM_INLINE void attend_context_t(int R, int d, const float* q, int64_t ctx, const int32_t* blocks, int64_t bs,
                                   const T* k, const T* v, int64_t tok_stride, int64_t head_off, float* s,
                                   float* out) {
  const int64_t nblk = (ctx + bs - 1) / bs;
  for (int64_t j = 0; j < nblk; ++j) {
    const int64_t t0 = j * bs;
    const int n = static_cast<int>(std::min<int64_t>(bs, ctx - t0));
    const int64_t base = static_cast<int64_t>(blocks[j]) * bs * tok_stride + head_off;
    if (j + 1 < nblk)  // rows of one head are tok_stride apart: the hardware prefetcher misses them
      prefetch_rows(k + static_cast<int64_t>(blocks[j + 1]) * bs * tok_stride + head_off,
                    tok_stride * sizeof(T), static_cast<int>(std::min<int64_t>(bs, ctx - t0 - bs)), d * sizeof(T));
    for (int r = 0; r < R; ++r)
      row_scores(d, q + static_cast<int64_t>(r) * d, k + base, tok_stride, n, s + r * ctx + t0);
  }
  for (int r = 0; r < R; ++r) {  // softmax numerators in place; out starts at zero
    float* __restrict sr = s + r * ctx;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sr[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < ctx; ++t) {
      sr[t] = exp_approx(sr[t] - mx);
      sum += sr[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < ctx; ++t) sr[t] *= inv;
    std::fill(out + static_cast<int64_t>(r) * d, out + static_cast<int64_t>(r + 1) * d, 0.f);
  }
  for (int64_t j = 0; j < nblk; ++j) {
    const int64_t t0 = j * bs;
    const int n = static_cast<int>(std::min<int64_t>(bs, ctx - t0));
    const int64_t base = static_cast<int64_t>(blocks[j]) * bs * tok_stride + head_off;
    if (j + 1 < nblk)
      prefetch_rows(v + static_cast<int64_t>(blocks[j + 1]) * bs * tok_stride + head_off,
                    tok_stride * sizeof(T), static_cast<int>(std::min<int64_t>(bs, ctx - t0 - bs)), d * sizeof(T));
    for (int r = 0; r < R; ++r)
      row_values(d, s + r * ctx + t0, v + base, tok_stride, n, out + static_cast<int64_t>(r) * d);
  }
}

}  // namespace

STLLM_CLONES
void attend_context(int R, int d, const float* q, int64_t ctx, const int32_t* blocks, int64_t bs,
                    const void* k, const void* v, bool bf16, int64_t tok_stride, int64_t head_off,
                    float* s, float* out) {
  if (bf16)
    attend_context_t(R, d, q, ctx, blocks, bs, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
                     tok_stride, head_off, s, out);
  else
    attend_context_t(R, d, q, ctx, blocks, bs, static_cast<const float*>(k), static_cast<const float*>(v),
                     tok_stride, head_off, s, out);
}

STLLM_CLONES
void bf16_rows_to_float(const uint16_t* src, int64_t src_stride, int n, int d, float* dst) {
  for (int t = 0; t < n; ++t) {
    const uint16_t* __restrict st = src + t * src_stride;
    uint32_t* __restrict dt = reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(t) * d);
#pragma omp simd
    for (int i = 0; i < d; ++i) dt[i] = static_cast<uint32_t>(st[i]) << 16;
  }
}

void prefetch_rows(const void* base, int64_t stride_bytes, int n, int64_t row_bytes) {
  const char* p = static_cast<const char*>(base);
  for (int t = 0; t < n; ++t)
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + t * stride_bytes + off, 0, 3);
}

}  // namespace stllm
