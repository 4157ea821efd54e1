// Varlen flash attention for bfloat16 on Intel AMX (Sapphire Rapids and later), the CPU prefill
// attention of the engine: the ViT's frames (non-causal, 257 tokens) and the LLM's prompts
// (causal, bottom-right aligned). torch's CPU flash kernel reached 0.33-0.5 TFLOP/s at those
// shapes (head dim 64) because its softmax makes several passes over each score block; here the
// two GEMMs run on AMX tiles and the softmax is one AVX-512 pass for the max and one for exp2 +
// sum + bf16 conversion.
//
// Layout and constraints
//   q [Nq, Hq, D], k/v [Nk, Hk, D] bfloat16, last dim contiguous, any token/head strides;
//   cu_seqlens_q/k int32 [B+1]; sequence b's queries are rows cu_q[b]..cu_q[b+1] of q and its keys
//   rows cu_k[b]..cu_k[b+1] of k/v. Hq % Hk == 0 (query head h reads kv head h / (Hq / Hk)).
//   D even, D <= 256 (padded to a multiple of 32 inside). causal: query i of a sequence sees keys
//   j <= i + (Lk - Lq); a query that sees no key gets zeros.  out [Nq, Hq, D] bfloat16.
// flash_attention_amx_paged: the same, causal, with each sequence's K/V read from paged caches
//   [num_blocks, block_size, Hk, D] (last dim contiguous) through block_tables int32 [B, max_blocks]:
//   sequence b has context_lens[b] keys and its queries are the last of those positions.
//
// Work split: first every (sequence, kv head) packs its K as K^T in the VNNI pair layout (the B
// operand of S = Q K^T) and its V in pairs of rows (the B operand of O = P V), zero-padded and
// blocked so that every B tile is contiguous (pack_k / pack_v, from strided rows or cache blocks);
// then one job per (sequence, head, block of 32 queries) runs an online softmax over key blocks of
// up to 512, with float32 scores, bf16 P and float32 accumulators. Tiles are all 16 rows x 64
// bytes: C 0-3, A 4-5, B 6-7; for head dims up to 64 the scores use C 0-1, Q held in A 2-5 for the
// whole block, B 6-7 (bench-cpu ViT frames: 1.22x -> 1.33x torch's SDPA, timed side by side), and
// a block of at most 16 queries runs one row of tiles.
//
// Built on x86-64 with GCC or Clang only; elsewhere amx_attention_available() is false and the
// engine keeps torch's SDPA.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "amx_tiles.h"
#include "avx512_bf16.h"
#include "checks.h"
#include "ops.h"

namespace stllm {
#ifdef STLLM_HAVE_AMX_KERNEL
namespace {

using amx::DenormalsAreZero;

constexpr int QB = 32;   // query rows per job (two 16-row tiles)
constexpr int KB = 512;  // keys per softmax block (a multiple of 32)
// Row strides of the score (float) and P (bf16) buffers: 64 bytes past a power of two, so the 16
// rows a tile stores or loads do not share L1 sets.
constexpr int SK = KB + 16, PK = KB + 32;

// Key counts and head dims are padded to whole 32-wide tiles (a bf16 tile row holds 32 values).
inline int round32(int n) { return (n + 31) / 32 * 32; }

// 2^x for x <= 0 (the softmax's shifted scores): a degree-3 polynomial for 2^f on |f| <= 1/2,
// fitted for relative error (< 7.5e-5, 50x below the bf16 rounding of P that follows; the degree-5
// Taylor polynomial used before, < 3e-6, cost two more FMAs a vector: 2-5% of the kernel time at
// the engine's shapes, timed side by side), scaled by 2^round(x) with vscalefps, which flushes very
// negative x to 0 without a clamp.
STLLM_AMX inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.055171651f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24261114f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69326099f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992807f));
  return _mm512_scalef_ps(p, n);
}

// Where the K or V rows of one (sequence, kv head) are: row t's D values start at rows(t).
struct StridedRows {  // rows of a [tokens, heads, D] tensor
  const uint16_t* base;
  int64_t stride;
  const uint16_t* operator()(int t) const { return base + (int64_t)t * stride; }
};
struct PagedRows {  // rows of a paged cache [num_blocks, block_size, heads, D] through a block table
  const uint16_t* base;  // the cache at this head
  const int32_t* table;
  int64_t block_stride, slot_stride;
  int block_size;
  const uint16_t* operator()(int t) const {
    return base + (int64_t)table[t / block_size] * block_stride + (int64_t)(t % block_size) * slot_stride;
  }
};

// K^T in VNNI pairs, blocked by 16 keys so that a B tile is 1 KB of contiguous memory (a tile of
// 16 rows strided by the sequence length thrashed L1 sets at 2k+ keys):
// kt[(t / 16) * (Dp / 2) * 16 + kp * 16 + t % 16] = dword (K[t][2kp], K[t][2kp+1]),
// zeros past D and Lk. 16 x 16 dword blocks are transposed in registers.
template <typename Rows>
STLLM_AMX void pack_k(const Rows& k, int Lk, int D, int Dp, int Lkp, uint32_t* kt) {
  const int dw = D / 2;
  alignas(64) uint32_t blk[16][16];
  for (int t0 = 0; t0 < Lkp; t0 += 16) {
    for (int kp0 = 0; kp0 < Dp / 2; kp0 += 16) {
      const __mmask16 m = tail_mask16(dw - kp0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = t0 + i < Lk ? _mm512_maskz_loadu_epi32(m, k(t0 + i) + 2 * kp0) : _mm512_setzero_si512();
      // 16x16 transpose: 32-bit, 64-bit unpacks, then 128-bit lane shuffles.
      __m512i t[16];
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      // r[4i + j] holds, per 128-bit lane L, column 4L + j of rows 4i..4i+3.
      for (int i = 0; i < 16; ++i) _mm512_store_si512(blk[i], r[i]);
      for (int j = 0; j < 4; ++j) {
        for (int L = 0; L < 4; ++L) {
          const int col = 4 * L + j;  // kp0 + col
          if (kp0 + col >= Dp / 2) continue;
          uint32_t* dst = kt + (int64_t)t0 * (Dp / 2) + (kp0 + col) * 16;
          for (int i = 0; i < 4; ++i) std::memcpy(dst + 4 * i, &blk[4 * i + j][4 * L], 16);
        }
      }
    }
  }
}

// V in VNNI pairs of rows, blocked by 16 columns (contiguous B tiles, as kt):
// vv[(d / 16) * (Lkp / 2) * 16 + kp * 16 + d % 16] = dword (V[2kp][d], V[2kp+1][d]), zeros past D
// and Lk.
template <typename Rows>
STLLM_AMX void pack_v(const Rows& v, int Lk, int D, int Dp, int Lkp, uint32_t* vv) {
  static const uint16_t idx_arr[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_loadu_si512(idx_arr);
  for (int kp = 0; kp < Lkp / 2; ++kp) {
    const int t = 2 * kp;
    for (int d0 = 0; d0 < Dp; d0 += 16) {
      const __mmask16 m = tail_mask16(D - d0);
      const __m256i a = t < Lk ? _mm256_maskz_loadu_epi16(m, v(t) + d0) : _mm256_setzero_si256();
      const __m256i b = t + 1 < Lk ? _mm256_maskz_loadu_epi16(m, v(t + 1) + d0) : _mm256_setzero_si256();
      const __m512i x = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
      _mm512_storeu_si512(vv + (int64_t)d0 * (Lkp / 2) + kp * 16, x);
    }
  }
}

// A zeroed, 64-byte-aligned array for one thread's scratch: the score, P and O buffers are read
// and written as tile rows, and rows that split cache lines are slow (std::vector's malloc only
// promises 16 bytes; the same scratch offset by 16 bytes ran 10-20% slower at bench-cpu shapes).
template <typename T>
class AlignedArray {
 public:
  explicit AlignedArray(size_t n) : ptr_(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {
    TORCH_CHECK(ptr_ != nullptr, "flash_attention_amx: out of memory for a scratch buffer");
    std::memset(ptr_, 0, n * sizeof(T));
  }
  ~AlignedArray() { std::free(ptr_); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  T& operator[](size_t i) { return ptr_[i]; }
  T* data() { return ptr_; }

 private:
  T* ptr_;
};

struct Scratch {
  AlignedArray<uint16_t> q;  // [QB][Dp] bf16
  AlignedArray<float> s;     // [QB][SK]
  AlignedArray<uint16_t> p;  // [QB][PK] bf16
  AlignedArray<float> o;     // [QB][Dp]
  explicit Scratch(int Dp) : q(QB * Dp), s(QB * SK), p(QB * PK), o(QB * Dp) {}
};

struct Seq {
  const uint16_t* q;
  uint16_t* out;
  int64_t qs, os;  // token strides (elements)
  int Lq, Lk, D, Dp, Lkp;
  const uint32_t *kt, *vv;
  bool causal;
  float c;  // scale * log2(e)
};

// One job: queries q0..q0+QB of one (sequence, head). Tiles must be configured.
STLLM_AMX void attend_block(const Seq& a, int q0, Scratch& w) {
  const int Dp = a.Dp, nrows = std::min(QB, a.Lq - q0);
  const int off = a.Lk - a.Lq;
  // The A tiles of Q: straight from q for a full block of a head dim that fills whole tiles,
  // else from a zero-padded [QB][Dp] copy. The P rows of missing queries stay zero.
  const uint16_t* qa = a.q + (int64_t)q0 * a.qs;
  int64_t qstride = a.qs * 2;
  if (nrows < QB || a.D != Dp) {
    for (int r = 0; r < QB; ++r) {
      uint16_t* qr = &w.q[r * Dp];
      const int n = r < nrows ? a.D : 0;
      if (n) std::memcpy(qr, a.q + (int64_t)(q0 + r) * a.qs, 2 * n);
      std::memset(qr + n, 0, 2 * (Dp - n));
    }
    qa = w.q.data();
    qstride = Dp * 2;
  }
  if (nrows < QB) std::memset(&w.p[nrows * PK], 0, sizeof(uint16_t) * (QB - nrows) * PK);
  float m[QB], l[QB];
  for (int r = 0; r < QB; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.0f;
  int kv_end = a.Lk;
  if (a.causal) kv_end = std::max(0, std::min(a.Lk, q0 + nrows + off));
  const __m512 vc = _mm512_set1_ps(a.c);
  bool first = true;
  // A last block of at most 16 queries (e.g. the 257th token of a ViT frame) runs one row of tiles.
  const bool two = nrows > 16;
  for (int k0 = 0; k0 < kv_end; k0 += KB) {
    const int kb = std::min(KB, round32(kv_end - k0));
    const int kb16 = std::min(kb, (kv_end - k0 + 15) / 16 * 16);  // score columns the softmax reads
    if (Dp == 64) {
      // Head dims up to 64: Q stays in four A tiles (2-5) for the whole block, and each step of
      // 16 keys loads only its two K^T tiles (6-7): half the tile loads of the general loop.
      _tile_loadd(2, qa, qstride);
      _tile_loadd(3, qa + 32, qstride);
      if (two) {
        _tile_loadd(4, (const char*)qa + 16 * qstride, qstride);
        _tile_loadd(5, (const char*)(qa + 32) + 16 * qstride, qstride);
      }
      for (int j = 0; j < kb16; j += 16) {
        const uint32_t* b = a.kt + (int64_t)(k0 + j) * 32;
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 256, 64);
        _tile_zero(0);
        if (two) {
          // Both rows' products before either store: a store waits for its tile's products
          // (4-5% faster than row by row at bench-cpu's ViT frames and prompt).
          _tile_zero(1);
          _tile_dpbf16ps(0, 2, 6);
          _tile_dpbf16ps(1, 4, 6);
          _tile_dpbf16ps(0, 3, 7);
          _tile_dpbf16ps(1, 5, 7);
          _tile_stored(0, &w.s[j], SK * 4);
          _tile_stored(1, &w.s[16 * SK + j], SK * 4);
        } else {
          _tile_dpbf16ps(0, 2, 6);
          _tile_dpbf16ps(0, 3, 7);
          _tile_stored(0, &w.s[j], SK * 4);
        }
      }
    } else {
      // S = Q K^T for keys k0..k0+kb: 32 keys (two 16-key tiles) per step.
      for (int j = 0; j < kb; j += 32) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int d = 0; d < Dp; d += 32) {
          _tile_loadd(4, qa + d, qstride);
          const uint32_t* b = a.kt + (int64_t)(k0 + j) * (Dp / 2) + (d / 2) * 16;
          _tile_loadd(6, b, 64);
          _tile_loadd(7, b + 8 * Dp, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, (const char*)(qa + d) + 16 * qstride, qstride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, &w.s[j], SK * 4);
        _tile_stored(1, &w.s[j + 16], SK * 4);
        if (two) {
          _tile_stored(2, &w.s[16 * SK + j], SK * 4);
          _tile_stored(3, &w.s[16 * SK + j + 16], SK * 4);
        }
      }
    }
    // Online softmax in the log2 domain, row by row.
    for (int r = 0; r < nrows; ++r) {
      const int limit = a.causal ? std::min(a.Lk, q0 + r + 1 + off) : a.Lk;
      const int nv = std::min(kb, limit - k0);
      uint16_t* pr = &w.p[r * PK];
      if (nv <= 0) {
        std::memset(pr, 0, 2 * kb);
        continue;
      }
      const float* sr = &w.s[r * SK];
      // Row max: four independent chains (vmaxps latency), unmasked over whole 64-key runs.
      const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512 vm0 = ninf, vm1 = ninf, vm2 = ninf, vm3 = ninf;
      int j = 0;
      for (; j + 64 <= nv; j += 64) {
        vm0 = _mm512_max_ps(vm0, _mm512_loadu_ps(sr + j));
        vm1 = _mm512_max_ps(vm1, _mm512_loadu_ps(sr + j + 16));
        vm2 = _mm512_max_ps(vm2, _mm512_loadu_ps(sr + j + 32));
        vm3 = _mm512_max_ps(vm3, _mm512_loadu_ps(sr + j + 48));
      }
      for (; j < nv; j += 16) vm0 = _mm512_mask_max_ps(vm0, tail_mask16(nv - j), vm0, _mm512_loadu_ps(sr + j));
      const __m512 vm = _mm512_max_ps(_mm512_max_ps(vm0, vm1), _mm512_max_ps(vm2, vm3));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(vm) * a.c);
      const float alpha = std::exp2(m[r] - m_new);  // 0 on the first visible block
      const __m512 vmn = _mm512_set1_ps(m_new);
      __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
      // p = 2^(s c - m) over the visible keys (masks only in the last 32), zeros after them.
      for (j = 0; j < nv; j += 32) {
        __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, vmn));
        __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j + 16), vc, vmn));
        if (j + 32 > nv) {
          e0 = _mm512_maskz_mov_ps(tail_mask16(nv - j), e0);
          e1 = _mm512_maskz_mov_ps(tail_mask16(nv - j - 16), e1);
        }
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      for (; j < kb; j += 32) _mm512_storeu_si512(pr + j, _mm512_setzero_si512());
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
      m[r] = m_new;
      if (!first && alpha != 1.0f) {
        const __m512 va = _mm512_set1_ps(alpha);
        float* orow = &w.o[r * Dp];
        for (int d = 0; d < Dp; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), va));
      }
    }
    // O += P V over the block: 32 output columns (two 16-wide tiles) per step.
    for (int d = 0; d < Dp; d += 32) {
      float* o = &w.o[d];
      if (first) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
      } else {
        _tile_loadd(0, o, Dp * 4);
        _tile_loadd(1, o + 16, Dp * 4);
        if (two) {
          _tile_loadd(2, o + 16 * Dp, Dp * 4);
          _tile_loadd(3, o + 16 * Dp + 16, Dp * 4);
        }
      }
      for (int j = 0; j < kb; j += 32) {
        _tile_loadd(4, &w.p[j], PK * 2);
        const uint32_t* b = a.vv + (int64_t)d * (a.Lkp / 2) + (k0 + j) / 2 * 16;
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 8 * a.Lkp, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, &w.p[16 * PK + j], PK * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o, Dp * 4);
      _tile_stored(1, o + 16, Dp * 4);
      if (two) {
        _tile_stored(2, o + 16 * Dp, Dp * 4);
        _tile_stored(3, o + 16 * Dp + 16, Dp * 4);
      }
    }
    first = false;
  }
  for (int r = 0; r < nrows; ++r) {
    uint16_t* dst = a.out + (int64_t)(q0 + r) * a.os;
    const float* orow = &w.o[r * Dp];
    const __m512 inv = _mm512_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
    for (int d = 0; d < a.D; d += 16) {
      const __m512 x = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_loadu_ps(orow + d), inv);
      _mm256_mask_storeu_epi16(dst + d, tail_mask16(a.D - d), (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

// DenormalsAreZero (amx_tiles.h) on the worker threads: scores far below a row's max give exp2
// results under 2^-126: as denormals, every vscalefps / vaddps on them took a microcode assist, and
// the bench-cpu ViT's attention (random weights, large scores) ran 1.6x slower than on unit-scale
// scores (3.4 vs 2.2 ms). As zeros they change nothing: the tiles already read bf16 denormals as
// zero, and the row sums lose less than 2^-126 each.

// Space for the packed K and V (see amx::KeptBuffer).
uint32_t* packed_workspace(int64_t dwords, at::Tensor& fresh) {
  thread_local amx::KeptBuffer kept;
  return static_cast<uint32_t*>(kept.get(dwords * (int64_t)sizeof(uint32_t), fresh));
}

// The head layout both entry points take: GQA groups, an even head dim of at most 256.
void check_heads(const char* op, int64_t Hq, int64_t Hk, int64_t D) {
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": Hq=", Hq, " is not a multiple of Hk=", Hk);
  TORCH_CHECK(D % 2 == 0 && D > 0 && D <= 256, op, ": head dim must be even and <= 256, got ", D);
}

// The kernel over B sequences: sequence b's queries are rows cq[b]..cq[b+1] of q, it has lk[b]
// keys, and rows(b, kv_head) gives that head's K and V row sources (StridedRows / PagedRows).
template <typename RowsFn>
at::Tensor attend_all(const at::Tensor& q, const int32_t* cq, const std::vector<int>& lk, int64_t Hk, bool causal,
                      double scale, const RowsFn& rows) {
  const int B = (int)lk.size();
  const int64_t Hq = q.size(1), D = q.size(2);
  at::Tensor out = at::empty({q.size(0), Hq, D}, q.options());
  const int Dp = round32(D);
  // Packed K^T / V per (sequence, kv head), at offsets into one buffer each.
  std::vector<int64_t> pack_off(B + 1, 0);
  for (int b = 0; b < B; ++b) pack_off[b + 1] = pack_off[b] + (int64_t)round32(lk[b]) * Dp / 2 * Hk;
  auto packed_at = [&](int b, int64_t h) { return pack_off[b] + h * round32(lk[b]) * Dp / 2; };
  at::Tensor fresh;  // only for packings too large to keep
  uint32_t* ktp = packed_workspace(2 * pack_off[B], fresh);
  uint32_t* vvp = ktp + pack_off[B];
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());

  at::parallel_for(0, (int64_t)B * Hk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int b = job / Hk, h = job % Hk;
      const int64_t base = packed_at(b, h);
      const auto kv = rows(b, h);
      pack_k(kv.first, lk[b], (int)D, Dp, round32(lk[b]), ktp + base);
      pack_v(kv.second, lk[b], (int)D, Dp, round32(lk[b]), vvp + base);
    }
  });

  // Jobs: (sequence, head, query block), the blocks of one head in a row (they share its packed
  // K/V in L2), the last (under a causal mask the longest) first; threads take the next job as
  // they finish, since causal blocks differ in cost up to the sequence length.
  std::vector<int64_t> job_start(B + 1, 0);
  for (int b = 0; b < B; ++b) job_start[b + 1] = job_start[b] + (int64_t)(cq[b + 1] - cq[b] + QB - 1) / QB * Hq;
  const float c = (float)(scale * 1.4426950408889634);
  const int64_t group = Hq / Hk, total = job_start[B];
  struct alignas(64) Counter {  // on its own cache line: the threads' other reads must not share it
    std::atomic<int64_t> value{0};
    char pad[64 - sizeof(std::atomic<int64_t>)];
  } next;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const amx::TileScope tiles;
    const DenormalsAreZero daz;
    Scratch w(Dp);
    for (int64_t job; (job = next.value.fetch_add(1, std::memory_order_relaxed)) < total;) {
      const int b = std::upper_bound(job_start.begin(), job_start.end(), job) - job_start.begin() - 1;
      const int nblk = (cq[b + 1] - cq[b] + QB - 1) / QB;
      const int64_t rel = job - job_start[b];
      const int h = rel / nblk, qblk = nblk - 1 - rel % nblk, hk = h / group;
      Seq a;
      a.Lq = cq[b + 1] - cq[b];
      a.Lk = lk[b];
      a.Lkp = round32(a.Lk);
      a.D = D, a.Dp = Dp, a.causal = causal, a.c = c;
      a.q = qp + cq[b] * q.stride(0) + h * q.stride(1);
      a.qs = q.stride(0);
      a.out = op + cq[b] * out.stride(0) + h * out.stride(1);
      a.os = out.stride(0);
      a.kt = ktp + packed_at(b, hk), a.vv = vvp + packed_at(b, hk);
      attend_block(a, qblk * QB, w);
    }
  });
  return out;
}

}  // namespace

bool amx_attention_available() { return amx::cpu_has_amx_bf16(); }

// See the header comment for layouts. Returns out [Nq, Hq, D] bfloat16.
at::Tensor flash_attention_amx_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal,
                                   double scale) {
  TORCH_CHECK(amx_attention_available(), "flash_attention_amx: this CPU (or kernel) has no AMX-BF16 tiles");
  for (const at::Tensor* t : {&q, &k, &v}) {
    STLLM_CHECK_CPU(*t);
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1, "flash_attention_amx: q/k/v must be [tokens, heads, d] "
                "with a contiguous last dim, got shape ", t->sizes(), " strides ", t->strides());
    STLLM_CHECK_DTYPE(*t, at::kBFloat16);
  }
  const int64_t Hq = q.size(1), Hk = k.size(1), D = q.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == D, "flash_attention_amx: k and v must be [Nk, Hk, ", D,
              "], got ", k.sizes(), " and ", v.sizes());
  check_heads("flash_attention_amx", Hq, Hk, D);
  for (const at::Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    STLLM_CHECK_INPUT(*t);
    STLLM_CHECK_DTYPE(*t, at::kInt);
  }
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 2,
              "flash_attention_amx: cu_seqlens_q/k must both be [B+1]");
  const int B = cu_seqlens_q.numel() - 1;
  const int32_t *cq = cu_seqlens_q.data_ptr<int32_t>(), *ck = cu_seqlens_k.data_ptr<int32_t>();
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0 && cq[B] == q.size(0) && ck[B] == k.size(0),
              "flash_attention_amx: cu_seqlens must start at 0 and end at the row counts ", q.size(0), "/", k.size(0));
  for (int b = 0; b < B; ++b)
    TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "flash_attention_amx: cu_seqlens must not decrease");

  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  std::vector<int> lk(B);
  for (int b = 0; b < B; ++b) lk[b] = ck[b + 1] - ck[b];
  return attend_all(q, cq, lk, Hk, causal, scale, [&](int b, int64_t h) {
    return std::make_pair(StridedRows{kp + ck[b] * k.stride(0) + h * k.stride(1), k.stride(0)},
                          StridedRows{vp + ck[b] * v.stride(0) + h * v.stride(1), v.stride(0)});
  });
}

// Causal attention of each sequence's new queries over its paged KV cache (chunked prefill, a chat
// turn over its history): sequence b's queries are rows cu_seqlens_q[b]..[b+1] of q, the last of
// its context_lens[b] positions, whose K/V are already in the caches [num_blocks, block_size, Hk,
// D] at the blocks block_tables[b] lists. The same kernel as flash_attention_amx_cpu, packing K/V
// straight from the cache blocks instead of from a gathered copy.
at::Tensor flash_attention_amx_paged_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(amx_attention_available(), "flash_attention_amx_paged: this CPU (or kernel) has no AMX-BF16 tiles");
  STLLM_CHECK_CPU(q);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "flash_attention_amx_paged: q must be [tokens, heads, d] with a "
              "contiguous last dim, got shape ", q.sizes(), " strides ", q.strides());
  STLLM_CHECK_DTYPE(q, at::kBFloat16);
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    STLLM_CHECK_CPU(*t);
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "flash_attention_amx_paged: caches must be [num_blocks, "
                "block_size, heads, d] with a contiguous last dim, got shape ", t->sizes(), " strides ", t->strides());
    STLLM_CHECK_DTYPE(*t, at::kBFloat16);
  }
  const int64_t Hq = q.size(1), D = q.size(2), Hk = k_cache.size(2), nblocks = k_cache.size(0);
  const int bs = (int)k_cache.size(1);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D, "flash_attention_amx_paged: k_cache and "
              "v_cache must be [num_blocks, block_size, Hk, ", D, "], got ", k_cache.sizes(), " and ", v_cache.sizes());
  check_heads("flash_attention_amx_paged", Hq, Hk, D);
  TORCH_CHECK(bs > 0, "flash_attention_amx_paged: block_size must be positive");
  for (const at::Tensor* t : {&block_tables, &cu_seqlens_q, &context_lens}) {
    STLLM_CHECK_INPUT(*t);
    STLLM_CHECK_DTYPE(*t, at::kInt);
  }
  const int B = context_lens.numel();
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && cu_seqlens_q.numel() == B + 1,
              "flash_attention_amx_paged: block_tables must be [B, max_blocks] and cu_seqlens_q [B+1] for ", B,
              " context_lens, got ", block_tables.sizes(), " and ", cu_seqlens_q.sizes());
  const int32_t *cq = cu_seqlens_q.data_ptr<int32_t>(), *cl = context_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t width = block_tables.size(1);
  TORCH_CHECK(cq[0] == 0 && cq[B] == q.size(0), "flash_attention_amx_paged: cu_seqlens_q must start at 0 and end at ",
              q.size(0), " (q's rows)");
  std::vector<int> lk(B);
  for (int b = 0; b < B; ++b) {
    TORCH_CHECK(cq[b + 1] >= cq[b], "flash_attention_amx_paged: cu_seqlens_q must not decrease");
    TORCH_CHECK(cl[b] >= 0, "flash_attention_amx_paged: context_lens[", b, "] = ", cl[b], " must be >= 0");
    const int64_t used = (cl[b] + bs - 1) / bs;
    TORCH_CHECK(used <= width, "flash_attention_amx_paged: context_lens[", b, "] = ", cl[b], " needs ", used,
                " blocks but block_tables has ", width, " columns");
    for (int64_t j = 0; j < used; ++j) {
      const int32_t blk = bt[b * width + j];
      TORCH_CHECK(blk >= 0 && blk < nblocks, "flash_attention_amx_paged: block_tables[", b, "] holds block ", blk,
                  ", outside [0, ", nblocks, ")");
    }
    lk[b] = cl[b];
  }
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  return attend_all(q, cq, lk, Hk, /*causal=*/true, scale, [&](int b, int64_t h) {
    const int32_t* table = bt + b * width;
    return std::make_pair(PagedRows{kp + h * k_cache.stride(2), table, k_cache.stride(0), k_cache.stride(1), bs},
                          PagedRows{vp + h * v_cache.stride(2), table, v_cache.stride(0), v_cache.stride(1), bs});
  });
}

#else  // not x86-64: no AMX

bool amx_attention_available() { return false; }

at::Tensor flash_attention_amx_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, bool, double) {
  TORCH_CHECK(false, "flash_attention_amx: this build has no AMX kernel (not x86-64)");
}

at::Tensor flash_attention_amx_paged_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double) {
  TORCH_CHECK(false, "flash_attention_amx_paged: this build has no AMX kernel (not x86-64)");
}
#endif

void register_flash_attention_amx(pybind11::module_& m) {
  m.def("amx_attention_available", &amx_attention_available,
        "True when this CPU and kernel run AMX-BF16 tiles (flash_attention_amx can run)");
  m.def("flash_attention_amx", &flash_attention_amx_cpu, "varlen bf16 flash attention on AMX tiles",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("flash_attention_amx_paged", &flash_attention_amx_paged_cpu,
        "causal bf16 flash attention of new queries over a paged KV cache on AMX tiles", pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("cu_seqlens_q"), pybind11::arg("context_lens"), pybind11::arg("scale"));
}

}  // namespace stllm
