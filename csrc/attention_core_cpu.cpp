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

// sr[t] = q . k_t for n keys `stride` elements apart (float32 or bf16 bits)
template <typename T>
STLLM_INLINE void row_scores(int d, const float* __restrict qr, const T* k, int64_t stride, int n,
                             float* __restrict sr) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {  // four independent dot products share the q loads
    const T* __restrict k0 = k + t * stride;
    const T* __restrict k1 = k0 + stride;
    const T* __restrict k2 = k1 + stride;
    const T* __restrict k3 = k2 + stride;
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int i = 0; i < d; ++i) {
      const float qi = qr[i];
      d0 += qi * load_f(k0, i);
      d1 += qi * load_f(k1, i);
      d2 += qi * load_f(k2, i);
      d3 += qi * load_f(k3, i);
    }
    sr[t] = d0;
    sr[t + 1] = d1;
    sr[t + 2] = d2;
    sr[t + 3] = d3;
  }
  for (; t < n; ++t) {
    const T* __restrict kt = k + t * stride;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int i = 0; i < d; ++i) dot += qr[i] * load_f(kt, i);
    sr[t] = dot;
  }
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
