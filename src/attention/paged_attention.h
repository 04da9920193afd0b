// attention/paged_attention.h: attention of single query rows over keys and values stored in a
// paged (block-allocated) cache, as the KV-cached decoder needs for every new token.
//
// Glossary: NH query heads, NKV kv heads (NKV divides NH; query head h reads kv head
// h / (NH/NKV)), HD head dim, KV = NKV*HD, BT tokens per cache block.
// Cache layout: token j of a query's sequence lives in physical block table[j / BT], slot j % BT;
// its K row (NKV, HD) starts at element k_base + table[j/BT] * block_stride + (j % BT) * KV, its V
// row likewise from v_base. (infer/kv_cache.h lays out its pool this way.) K and V are stored as
// f32 or bf16 (PagedShape::kv_dtype); bf16 elements are widened to f32 (exact) as they are read,
// and every product, sum and the softmax run in f32, so a bf16 cache computes exactly what the
// f32 kernel computes on the bf16-rounded K and V.
//
// Contract
// - out (n_queries, NH*HD) row stride o_stride; q (n_queries, NH*HD) row stride q_stride.
//   Query i attends to keys [0, n_keys_i) of its sequence (causality is the caller's choice of
//   n_keys: a token at position p sees n_keys = p + 1). Overwrites out.
// - Per (query, head) one thread computes, in a fixed order: scores s_j = scale * q.k_j (each
//   dot product in a fixed SIMD order that depends on HD only: for HD = 16, 32, 64, 128 with
//   blocks of <= 16 tokens, the 16-lane partial products summed over the vectors in ascending
//   order, then the lanes by a fixed tree computed for 16 keys at once), m = max s_j, exp(s_j -
//   m) (a polynomial, kernels/cpu/vec_math.h, on the vector path), their sum (vector path: key
//   j into lane j % 16 in ascending j, then the 16 lanes by a fixed pairwise tree; plain
//   loops: ascending j), out = sum_j p_j v_j in ascending j. So a row's result
//   depends only on its own query and keys: independent of the other queries in the call, of
//   the thread count, and of whether its keys were written by a prefill or one token at a time
//   (batch invariant, deterministic).
// - Bad shapes (non-positive sizes, NKV not dividing NH, n_keys < 1, a table shorter than
//   n_keys needs) throw loom::Error before anything is written.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace loom::attention {

struct PagedQuery {
  const int32_t* block_table = nullptr;  // (ceil(n_keys / BT)) physical block ids
  int64_t table_len = 0;                 // entries in block_table
  int64_t n_keys = 0;                    // keys visible to this query (>= 1)
};

struct PagedShape {
  int64_t NH = 0, NKV = 0, HD = 0;
  int64_t block_tokens = 16;           // BT
  int64_t block_stride = 0;            // elements between consecutive physical blocks
  int64_t q_stride = 0, o_stride = 0;  // 0 means NH*HD
  float scale = 0.f;                   // usually 1/sqrt(HD)
  DType kv_dtype = DType::f32;         // element type of k_base / v_base: f32 or bf16
};

void paged_attention_forward(float* out, const float* q, const PagedQuery* queries,
                             int64_t n_queries, const void* k_base, const void* v_base,
                             const PagedShape& s);

}  // namespace loom::attention
