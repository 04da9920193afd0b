// attention/paged_attention.cpp: single-query attention over a paged KV cache (see the header).
// Plain two-pass softmax per (query, head) over a scratch row of scores: the decode step reads
// each key and value once, which is what bounds it; no tiling is needed for one query row.
#include "attention/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace loom::attention {

void paged_attention_forward(float* out, const float* q, const PagedQuery* queries,
                             int64_t n_queries, const float* k_base, const float* v_base,
                             const PagedShape& s) {
  const int64_t NH = s.NH, NKV = s.NKV, HD = s.HD, BT = s.block_tokens;
  LOOM_CHECK(NH > 0 && NKV > 0 && HD > 0 && BT > 0 && NH % NKV == 0,
             "paged attention: NH={} NKV={} HD={} BT={} must be positive with NKV dividing NH", NH,
             NKV, HD, BT);
  LOOM_CHECK(std::isfinite(s.scale) && s.scale > 0.f,
             "paged attention: scale {} must be finite > 0", s.scale);
  const int64_t KV = NKV * HD;
  LOOM_CHECK(s.block_stride >= BT * KV,
             "paged attention: block_stride {} is narrower than a block of {} tokens x {} floats",
             s.block_stride, BT, KV);
  const int64_t qs = s.q_stride ? s.q_stride : NH * HD, os = s.o_stride ? s.o_stride : NH * HD;
  LOOM_CHECK(qs >= NH * HD && os >= NH * HD, "paged attention: strides q={} out={} < NH*HD={}", qs,
             os, NH * HD);
  if (n_queries == 0) return;
  LOOM_CHECK(out && q && queries && k_base && v_base, "paged attention: null buffer");
  int64_t max_keys = 0;
  for (int64_t i = 0; i < n_queries; ++i) {
    const PagedQuery& pq = queries[i];
    LOOM_CHECK(pq.n_keys >= 1 && pq.block_table && pq.table_len * BT >= pq.n_keys,
               "paged attention: query {} has n_keys={} but a block table of {} blocks of {} "
               "tokens",
               i, pq.n_keys, pq.table_len, BT);
    max_keys = std::max(max_keys, pq.n_keys);
  }
  const int64_t group = NH / NKV;
#pragma omp parallel
  {
    std::vector<float> score(
        static_cast<size_t>(max_keys));  // (n_keys) scaled scores, then weights
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_queries * NH; ++task) {
      const int64_t i = task / NH, h = task % NH, kh = h / group;
      const PagedQuery& pq = queries[i];
      const float* qh = q + i * qs + h * HD;  // (HD)
      float* oh = out + i * os + h * HD;      // (HD)
      float m = -INFINITY;
      for (int64_t j = 0; j < pq.n_keys; ++j) {
        const float* kj =
            k_base + int64_t(pq.block_table[j / BT]) * s.block_stride + (j % BT) * KV + kh * HD;
        // simd partial sums: a fixed order for a given HD, the same for every row and call.
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < HD; ++d) dot += qh[d] * kj[d];
        score[size_t(j)] = dot * s.scale;
        m = std::max(m, score[size_t(j)]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < pq.n_keys; ++j)
        sum += (score[size_t(j)] = std::exp(score[size_t(j)] - m));
      const float inv = 1.f / sum;
      std::fill(oh, oh + HD, 0.f);
      for (int64_t j = 0; j < pq.n_keys; ++j) {
        const float* vj =
            v_base + int64_t(pq.block_table[j / BT]) * s.block_stride + (j % BT) * KV + kh * HD;
        const float p = score[size_t(j)] * inv;
        for (int64_t d = 0; d < HD; ++d) oh[d] += p * vj[d];
      }
    }
  }
}

}  // namespace loom::attention
