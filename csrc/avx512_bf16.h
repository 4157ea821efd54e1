// AVX-512 / AVX512-BF16 helpers shared by the CPU kernels that have explicit 16-lane paths
// (activation_cpu.cpp, rotary_cpu.cpp, flash_attention_amx_cpu.cpp). Each such path is compiled
// with a target attribute and chosen at run time, so the build needs no -m flags and runs on any
// x86-64 CPU. STLLM_X86_SIMD: the intrinsics exist here (x86-64, GCC or Clang).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define STLLM_X86_SIMD 1
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#define STLLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace stllm {

// Whether the STLLM_BF16_TARGET paths may run on this CPU (checked once).
inline bool avx512_bf16_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// The first min(max(n, 0), 16) lanes.
STLLM_BF16_TARGET inline __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
}

// The first min(max(n, 0), 32) lanes (16-bit lanes of a 512-bit vector).
inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << (n > 0 ? n : 0)) - 1u);
}

// 16 bfloat16 bit patterns (in the low halves of 16 dwords' worth of lanes) as floats.
STLLM_BF16_TARGET inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 bfloat16 values from p as floats (masked lanes read nothing and are 0).
STLLM_BF16_TARGET inline __m512 load_bf16x16(const c10::BFloat16* p, __mmask16 m = 0xFFFF) {
  return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}

// float -> bfloat16 (round to nearest even, vcvtneps2bf16, as c10::BFloat16; a NaN stays a NaN,
// though not always 0x7fc0) -> float: the rounding of one torch op in bfloat16.
STLLM_BF16_TARGET inline __m512 round_bf16x16(__m512 x) {
  return bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(x));
}

// exp_approx (vec_math.h: e^x, ~2 float ulp; 0 below -87.3) on 16 lanes: the same steps, with explicit FMAs.
STLLM_BF16_TARGET inline __m512 exp_approx16(__m512 x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                        _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), p, _mm512_castsi512_ps(bits));
}

// T(T(silu(g)) * u) on 16 lanes of bfloat16 values given as floats, as 16 bfloat16: torch's
// `F.silu(gate) * up` in bfloat16 (silu in float32 through exp_approx16, rounded, times up, rounded).
STLLM_BF16_TARGET inline __m256i silu_mul_bf16x16(__m512 g, __m512 u) {
  const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 s = round_bf16x16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, u));
}

}  // namespace stllm
#endif
