// Float32 inner loops of the CPU paged attention kernels (see attention_core_cpu.h).
#include "attention_core_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "vec_math.h"


namespace stllm {

STLLM_CLONES
void attend_block(int R, int d, const float* q, const int64_t* limit, int64_t t0, int n,
                  const float* k, const float* v, int64_t kv_stride, float* s, float* acc,
                  float* m, float* l) {
  for (int r = 0; r < R; ++r) {
    const int nv = static_cast<int>(std::min<int64_t>(n, limit[r] - t0));
    if (nv <= 0) continue;
    const float* __restrict qr = q + static_cast<int64_t>(r) * d;
    float* __restrict sr = s + static_cast<int64_t>(r) * n;
    int t = 0;
    for (; t + 4 <= nv; t += 4) {  // four independent dot products share the q loads
      const float* __restrict k0 = k + t * kv_stride;
      const float* __restrict k1 = k0 + kv_stride;
      const float* __restrict k2 = k1 + kv_stride;
      const float* __restrict k3 = k2 + kv_stride;
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int i = 0; i < d; ++i) {
        const float qi = qr[i];
        d0 += qi * k0[i];
        d1 += qi * k1[i];
        d2 += qi * k2[i];
        d3 += qi * k3[i];
      }
      sr[t] = d0;
      sr[t + 1] = d1;
      sr[t + 2] = d2;
      sr[t + 3] = d3;
    }
    for (; t < nv; ++t) {
      const float* __restrict kt = k + t * kv_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < d; ++i) dot += qr[i] * kt[i];
      sr[t] = dot;
    }
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
    t = 0;
    for (; t + 4 <= nv; t += 4) {  // one read-modify-write of acc per four value rows
      const float p0 = sr[t], p1 = sr[t + 1], p2 = sr[t + 2], p3 = sr[t + 3];
      const float* __restrict v0 = v + t * kv_stride;
      const float* __restrict v1 = v0 + kv_stride;
      const float* __restrict v2 = v1 + kv_stride;
      const float* __restrict v3 = v2 + kv_stride;
#pragma omp simd
      for (int i = 0; i < d; ++i) ar[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
    }
    for (; t < nv; ++t) {
      const float p = sr[t];
      const float* __restrict vt = v + t * kv_stride;
#pragma omp simd
      for (int i = 0; i < d; ++i) ar[i] += p * vt[i];
    }
  }
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
