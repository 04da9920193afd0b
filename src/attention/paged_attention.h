// attention/paged_attention.h: attention of single query rows over keys and values stored in a
// paged (block-allocated) cache, as the KV-cached decoder needs for every new token.
//
// Glossary: NH query heads, NKV kv heads (NKV divides NH; query head h reads kv head
// h / (NH/NKV)), HD head dim, KV = NKV*HD, BT tokens per cache block.
// Cache layout: a block holds BT tokens' K (resp. V) head-major, (NKV, BT, HD): token j of a
// query's sequence lives in physical block table[j / BT], slot j % BT, and its kv head kh's K
// starts at element k_base + table[j/BT] * block_stride + kh * BT * HD + (j % BT) * HD (V
// likewise from v_base), so one head's keys of a block are one contiguous run that the kernel
// reads from start to end (infer/kv_cache.h lays out its pool this way). K and V are stored as
// f32 or bf16 (PagedShape::kv_dtype); bf16 elements are widened to f32 (exact) as they are read,
// and every product, sum and the softmax run in f32, so a bf16 cache computes exactly what the
// f32 kernel computes on the bf16-rounded K and V.
// bf16 heads are stored in the kernel's order, not the model's (kv_row_store / kv_row_load
// convert a token's (NKV, HD) row): where HD is a multiple of 32, elements 32g + l and 32g + 16 +
// l (l < 16) of a head sit side by side at 32g + 2l and 32g + 2l + 1 ("paired"), so that one
// 64-byte load widens into the two 16-lane vectors the kernel multiplies (a shift and a mask)
// instead of two zero-extending shuffles; f32 heads, and bf16 heads of other head dims, are
// stored as they are. (bench_paged_attention, batch 8, context 192, bf16, 12 layers: 2.70 ms
// with token-major rows and plain bf16, 2.54 ms so; 1.35 -> 1.18 ms with K/V in cache.)
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

// Whether a bf16 cache row of head dim HD is stored paired (HD a positive multiple of 32).
inline bool kv_bf16_paired(int64_t HD) { return HD > 0 && HD % 32 == 0; }
// One token's K or V row (NKV*HD floats, model order) into the cache's storage, kv head kh's HD
// elements at dst + kh * head_stride elements (BT * HD in a block; dtype f32: a copy; bf16:
// rounded to nearest even as f32_to_bf16, paired where kv_bf16_paired(HD)); kv_row_load is its
// inverse (widened to f32, exact). Throws loom::Error on a dtype other than f32 or bf16 or on
// sizes that are not positive or head_stride < HD.
void kv_row_store(const float* src, void* dst, int64_t NKV, int64_t HD, int64_t head_stride,
                  DType dtype);
void kv_row_load(const void* src, float* dst, int64_t NKV, int64_t HD, int64_t head_stride,
                 DType dtype);

void paged_attention_forward(float* out, const float* q, const PagedQuery* queries,
                             int64_t n_queries, const void* k_base, const void* v_base,
                             const PagedShape& s);

}  // namespace loom::attention
