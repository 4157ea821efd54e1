// CPU paged attention over the block-table KV cache: decode (one query a sequence) and causal
// prefill (queries are the last qlen positions of each context). Online softmax block by block
// straight from the cache (no gather copy), float32 accumulation, GQA: the Hq/Hk query heads of a
// kv head are processed together so each K/V block is read once per (sequence, kv head, q tile).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_core_cpu.h"
#include "checks.h"
#include "ops.h"

namespace stllm {
namespace {

constexpr int kPrefillQueryTile = 16;

// One unit of work: kv head `h` of sequence `b`, query rows [q0, q0 + nq) of that sequence.
struct WorkItem {
  int64_t b, h, q0, nq;
};

struct Geometry {
  int64_t Hq, Hk, G, d, bs, num_blocks, max_blocks;
  double scale;
};

// Shared checks of the cache and block table; returns the geometry.
Geometry check_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t B,
                     c10::optional<double> scale) {
  STLLM_CHECK_INPUT(k_cache);  // [num_blocks, block_size, Hk, d]
  STLLM_CHECK_INPUT(v_cache);  // [num_blocks, block_size, Hk, d]
  STLLM_CHECK_INPUT(block_tables);  // [B, max_blocks] int32
  STLLM_CHECK_INPUT(context_lens);  // [B] int32
  STLLM_CHECK_CPU(q);
  STLLM_CHECK_DIM(q, 3);
  STLLM_CHECK_DIM(k_cache, 4);
  STLLM_CHECK_FLOAT(q);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ",
              v_cache.sizes(), " must have the same shape");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(q.stride(2) == 1, "q must be contiguous in the head dim");
  STLLM_CHECK_DIM(block_tables, 2);
  STLLM_CHECK_DIM(context_lens, 1);
  STLLM_CHECK_DTYPE(block_tables, at::kInt);
  STLLM_CHECK_DTYPE(context_lens, at::kInt);
  Geometry g;
  g.num_blocks = k_cache.size(0);
  g.bs = k_cache.size(1);
  g.Hk = k_cache.size(2);
  g.d = k_cache.size(3);
  g.Hq = q.size(1);
  TORCH_CHECK(q.size(2) == g.d, "q head dim ", q.size(2), " != cache head dim ", g.d);
  TORCH_CHECK(g.Hk > 0 && g.Hq % g.Hk == 0, "query heads ", g.Hq, " must be a multiple of kv heads ", g.Hk);
  g.G = g.Hq / g.Hk;
  TORCH_CHECK(block_tables.size(0) == B, "block_tables has ", block_tables.size(0), " rows, expected ", B);
  TORCH_CHECK(context_lens.size(0) == B, "context_lens has ", context_lens.size(0), " entries, expected ", B);
  g.max_blocks = block_tables.size(1);
  g.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(g.d));
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cl[b] >= 0, "context_lens[", b, "] = ", cl[b], " must be >= 0");
    const int64_t nblk = (cl[b] + g.bs - 1) / g.bs;
    TORCH_CHECK(nblk <= g.max_blocks, "context_lens[", b, "] = ", cl[b], " needs ", nblk,
                " blocks but block_tables has ", g.max_blocks, " columns");
    for (int64_t j = 0; j < nblk; ++j) {
      const int32_t blk = bt[b * g.max_blocks + j];
      TORCH_CHECK_INDEX(blk >= 0 && blk < g.num_blocks, "block_tables[", b, ", ", j, "] = ", blk,
                        " out of range [0, ", g.num_blocks, ")");
    }
  }
  return g;
}

template <typename scalar_t>
void run_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens,
                   const std::vector<WorkItem>& work, const std::vector<int64_t>& q_row0,
                   const std::vector<int64_t>& q_len, const Geometry& g, int max_nq, at::Tensor& out) {
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t d = g.d, G = g.G, bs = g.bs, Hk = g.Hk;
  const int64_t tok_stride = Hk * d;  // elements between consecutive tokens of one head in a block
  const int64_t max_rows = static_cast<int64_t>(max_nq) * G;
  const float scale = static_cast<float>(g.scale);
  constexpr bool is_float = std::is_same<scalar_t, float>::value;

  // Dynamic scheduling on torch's thread pool: each thread takes the next work item (ragged
  // batches stay balanced).
  const int64_t num_work = static_cast<int64_t>(work.size());
  std::atomic<int64_t> next{0};
  int64_t kv_reads = 0;  // key rows streamed, summed over work items: small jobs stay on this thread
  for (const WorkItem& it : work) kv_reads += std::max<int64_t>(0, cl[it.b] - q_len[it.b] + it.q0 + it.nq);
  const bool small = kv_reads * d < (int64_t{1} << 16);
  const int64_t num_threads = small ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_work));
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    // Per-thread scratch, reused across work items and blocks.
    std::vector<float> qf(max_rows * d), acc(max_rows * d), m(max_rows), l(max_rows), s(max_rows * bs);
    std::vector<float> kf(is_float ? 0 : bs * d), vf(is_float ? 0 : bs * d);
    std::vector<int64_t> limit(max_rows);
    std::vector<float> ctx_scores;  // [R, ctx] of the two-pass decode kernel, grown on demand
    for (int64_t w = next.fetch_add(1); w < num_work; w = next.fetch_add(1)) {
      const WorkItem& it = work[w];
      const int64_t ctx = cl[it.b], qlen = q_len[it.b];
      const int R = static_cast<int>(it.nq * G);
      for (int64_t i = 0; i < it.nq; ++i) {
        const int64_t row = q_row0[it.b] + it.q0 + i;  // row of q / out
        for (int64_t gq = 0; gq < G; ++gq) {
          const int64_t r = i * G + gq;
          const scalar_t* src = qp + row * qs0 + (it.h * G + gq) * qs1;
          for (int64_t x = 0; x < d; ++x) qf[r * d + x] = static_cast<float>(src[x]) * scale;
          limit[r] = ctx - qlen + it.q0 + i + 1;
        }
      }
      const int64_t visible = std::max<int64_t>(0, ctx - qlen + it.q0 + it.nq);  // largest limit in the tile
      if constexpr (is_float || std::is_same<scalar_t, at::BFloat16>::value) {
        if (it.nq == 1) {  // one position (decode): every row sees the same keys -> two-pass kernel
          if (static_cast<int64_t>(ctx_scores.size()) < R * visible) ctx_scores.resize(R * visible);
          if (visible > 0)
            attend_context(R, static_cast<int>(d), qf.data(), visible, bt + it.b * g.max_blocks, bs, kc, vc,
                           !is_float, tok_stride, it.h * d, ctx_scores.data(), acc.data());
          const int64_t row = q_row0[it.b] + it.q0;
          for (int64_t gq = 0; gq < G; ++gq) {
            scalar_t* dst = op + (row * g.Hq + it.h * G + gq) * d;
            for (int64_t x = 0; x < d; ++x) dst[x] = visible > 0 ? static_cast<scalar_t>(acc[gq * d + x]) : scalar_t(0);
          }
          continue;
        }
      }
      std::fill(acc.begin(), acc.begin() + R * d, 0.f);
      std::fill(m.begin(), m.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + R, 0.f);
      const int64_t nblk = (visible + bs - 1) / bs;
      for (int64_t j = 0; j < nblk; ++j) {
        const int64_t blk = bt[it.b * g.max_blocks + j];
        const int64_t t0 = j * bs;
        const int n = static_cast<int>(std::min(bs, visible - t0));
        const int64_t base = (blk * bs * Hk + it.h) * d;
        if (j + 1 < nblk) {
          const int64_t next_base = (bt[it.b * g.max_blocks + j + 1] * bs * Hk + it.h) * d;
          const int n_next = static_cast<int>(std::min(bs, visible - t0 - bs));
          prefetch_rows(kc + next_base, tok_stride * sizeof(scalar_t), n_next, d * sizeof(scalar_t));
          prefetch_rows(vc + next_base, tok_stride * sizeof(scalar_t), n_next, d * sizeof(scalar_t));
        }
        if constexpr (is_float) {
          attend_block(R, d, qf.data(), limit.data(), t0, n, kc + base, vc + base, tok_stride,
                       s.data(), acc.data(), m.data(), l.data());
        } else if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
          bf16_rows_to_float(reinterpret_cast<const uint16_t*>(kc + base), tok_stride, n, d, kf.data());
          bf16_rows_to_float(reinterpret_cast<const uint16_t*>(vc + base), tok_stride, n, d, vf.data());
          attend_block(R, d, qf.data(), limit.data(), t0, n, kf.data(), vf.data(), d, s.data(),
                       acc.data(), m.data(), l.data());
        } else {
          for (int t = 0; t < n; ++t)
            for (int64_t x = 0; x < d; ++x) {
              kf[t * d + x] = static_cast<float>(kc[base + t * tok_stride + x]);
              vf[t * d + x] = static_cast<float>(vc[base + t * tok_stride + x]);
            }
          attend_block(R, d, qf.data(), limit.data(), t0, n, kf.data(), vf.data(), d, s.data(),
                       acc.data(), m.data(), l.data());
        }
      }
      for (int64_t i = 0; i < it.nq; ++i) {
        const int64_t row = q_row0[it.b] + it.q0 + i;
        for (int64_t gq = 0; gq < G; ++gq) {
          const int64_t r = i * G + gq;
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no visible key -> zeros (as flash-attn)
          scalar_t* dst = op + (row * g.Hq + it.h * G + gq) * d;
          for (int64_t x = 0; x < d; ++x) dst[x] = static_cast<scalar_t>(acc[r * d + x] * inv);
        }
      }
    }
  });
}

void dispatch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& block_tables, const at::Tensor& context_lens,
              const std::vector<WorkItem>& work, const std::vector<int64_t>& q_row0,
              const std::vector<int64_t>& q_len, const Geometry& g, int max_nq, at::Tensor& out) {
  switch (q.scalar_type()) {
    case at::kFloat:
      run_attention<float>(q, k_cache, v_cache, block_tables, context_lens, work, q_row0, q_len, g, max_nq, out);
      break;
    case at::kBFloat16:
      run_attention<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, work, q_row0, q_len, g, max_nq, out);
      break;
    case at::kHalf:
      run_attention<at::Half>(q, k_cache, v_cache, block_tables, context_lens, work, q_row0, q_len, g, max_nq, out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

// q [B, Hq, d]; k_cache, v_cache [num_blocks, block_size, Hk, d]; block_tables [B, max_blocks]
// int32; context_lens [B] int32 (0 -> zero output). Returns [B, Hq, d] in q's dtype.
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, c10::optional<double> scale) {
  const int64_t B = q.dim() == 3 ? q.size(0) : 0;
  const Geometry g = check_cache(q, k_cache, v_cache, block_tables, context_lens, B, scale);
  std::vector<WorkItem> work;
  work.reserve(B * g.Hk);
  std::vector<int64_t> q_row0(B), q_len(B, 1);
  for (int64_t b = 0; b < B; ++b) {
    q_row0[b] = b;
    for (int64_t h = 0; h < g.Hk; ++h) work.push_back({b, h, 0, 1});
  }
  at::Tensor out = at::empty({B, g.Hq, g.d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch(q, k_cache, v_cache, block_tables, context_lens, work, q_row0, q_len, g, 1, out);
  return out;
}

// q [N, Hq, d] (sequence b owns rows cu_seqlens_q[b]..cu_seqlens_q[b+1]); cache as above;
// cu_seqlens_q [B+1] int32; context_lens [B] int32. Causal: query i of a sequence with qlen
// queries sits at position context_len - qlen + i; a query with no visible key gets zeros.
at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                                       c10::optional<double> scale) {
  STLLM_CHECK_INPUT(cu_seqlens_q);  // [B+1] int32
  STLLM_CHECK_DIM(cu_seqlens_q, 1);
  STLLM_CHECK_DTYPE(cu_seqlens_q, at::kInt);
  TORCH_CHECK(cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must have B+1 >= 1 entries");
  const int64_t B = cu_seqlens_q.size(0) - 1;
  const Geometry g = check_cache(q, k_cache, v_cache, block_tables, context_lens, B, scale);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q[0] must be 0, got ", cu[0]);
  TORCH_CHECK(cu[B] == q.size(0), "cu_seqlens_q[-1] = ", cu[B], " != number of query rows ", q.size(0));
  std::vector<WorkItem> work;
  std::vector<int64_t> q_row0(B), q_len(B);
  for (int64_t b = 0; b < B; ++b) {
    q_row0[b] = cu[b];
    q_len[b] = cu[b + 1] - cu[b];
    TORCH_CHECK(q_len[b] >= 0, "cu_seqlens_q must be non-decreasing (at ", b, ")");
    for (int64_t h = 0; h < g.Hk; ++h)
      for (int64_t q0 = 0; q0 < q_len[b]; q0 += kPrefillQueryTile)
        work.push_back({b, h, q0, std::min<int64_t>(kPrefillQueryTile, q_len[b] - q0)});
  }
  at::Tensor out = at::empty({q.size(0), g.Hq, g.d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch(q, k_cache, v_cache, block_tables, context_lens, work, q_row0, q_len, g, kPrefillQueryTile, out);
  return out;
}

void register_paged_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("paged_decode_attention", &paged_decode_attention_cpu, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale") = py::none(),
        "Decode attention over a paged KV cache: q [B, Hq, d] -> [B, Hq, d].");
  m.def("paged_prefill_attention", &paged_prefill_attention_cpu, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("cu_seqlens_q"), py::arg("context_lens"),
        py::arg("scale") = py::none(),
        "Causal attention of the last qlen positions of each context over a paged KV cache: q [N, Hq, d] -> [N, Hq, d].");
}

}  // namespace stllm
