// Scalar math written so that GCC auto-vectorizes it inside the target_clones loops of the CPU
// kernels (std::exp does not vectorize without -ffast-math): exp with ~2 ulp float error and the
// float <-> bfloat16 conversions of element-wise ops.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// ISA levels, not CPU models: an "arch=skylake-avx512" clone is chosen by __builtin_cpu_is (the CPU
// model), so on other AVX-512 CPUs (Sapphire Rapids, VMs reporting a generic model) the
// resolver silently fell back to the SSE2 default; "arch=x86-64-v4/v3" are checked by features.
#define STLLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STLLM_CLONES
#endif

// Helpers are force-inlined: GCC does not inline default-target functions into the
// target_clones bodies otherwise, and a call per element blocks vectorization.
#define STLLM_INLINE inline __attribute__((always_inline))

namespace stllm {

// e^x for x in float range: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 minimax-style
// Taylor polynomial; inputs below -87.3 give 0 (as the softmax needs for -inf), above 88.7 +inf.
STLLM_INLINE float exp_approx(float x) {
  const float hi = 88.7f, lo = -87.3f;
  const bool under = x < lo;
  x = x > hi ? hi : (x < lo ? lo : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln2 split in two for an exact n*ln2_hi
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : p * scale;
}

STLLM_INLINE float to_float(float x) { return x; }
STLLM_INLINE float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float -> T with round-to-nearest-even (what torch's element-wise ops do for reduced dtypes).
template <typename T>
STLLM_INLINE T from_float(float f) { return static_cast<T>(f); }
template <>
STLLM_INLINE c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;  // NaN stays NaN (branch-free: vectorizes)
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
  return out;
}

// The value a T stores for float f, back as float (rounding of one reduced-precision op).
template <typename T>
STLLM_INLINE float round_as(float f) { return to_float(from_float<T>(f)); }

}  // namespace stllm
