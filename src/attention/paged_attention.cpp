// attention/paged_attention.cpp: single-query attention over a paged KV cache (see the header).
// Plain two-pass softmax per (query, head) over a scratch row of scores: the decode step reads
// each key and value once, which is what bounds it; no tiling is needed for one query row.
#include "attention/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's AVX-512 headers leave the pass-through operand of unmasked conversions undefined on
// purpose, which -Wmaybe-uninitialized reports at every inlined use (as in src/kernels, whose
// CMakeLists turns the same warnings off).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "attention/vec16.h"
#include "core/error.h"
#include "kernels/cpu/vec_math.h"

// The vector helpers live in an anonymous namespace and never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace loom::attention {

namespace {

using namespace vec16;  // Vec, kLanes, load, store, splat

constexpr int64_t kMaxGroup = 32;  // heads one task of the vector path computes, at most

// Sum 16 vectors' lanes at once: after the four folds lane l holds the total of one input
// vector (which one: Reduce16::key). Each fold adds two halves of lane groups, so every total
// is one fixed tree over its 16 lanes, whatever the other inputs hold.
inline Vec fold8(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
inline Vec fold4(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline Vec fold2(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline Vec fold1(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline Vec reduce16(const Vec (&v)[kLanes]) {
  Vec f[8], g[4], h[2];
  for (int i = 0; i < 8; ++i) f[i] = fold8(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) g[i] = fold4(f[2 * i], f[2 * i + 1]);
  for (int i = 0; i < 2; ++i) h[i] = fold2(g[2 * i], g[2 * i + 1]);
  return fold1(h[0], h[1]);
}
// Which input vector's total lands in lane l (found once by reducing vectors of known sums).
struct Reduce16 {
  int key[kLanes];
  Reduce16() {
    Vec v[kLanes];
    for (int t = 0; t < kLanes; ++t) v[t] = splat(float(t));
    const Vec r = reduce16(v);
    for (int l = 0; l < kLanes; ++l) key[l] = int(r[l] / float(kLanes) + 0.5f);
    // in_key_order below hard-codes this permutation (lane l holds l's 4 bits reversed).
    for (int l = 0; l < kLanes; ++l)
      LOOM_ASSERT(key[l] == ((l & 1) << 3 | (l & 2) << 1 | (l & 4) >> 1 | (l & 8) >> 3),
                  "paged attention: reduce16's lane order changed");
  }
};

// reduce16's totals put in input order: the folds leave vector t's total in the lane whose
// index is t's 4 bits reversed, a permutation that is its own inverse (checked when
// Reduce16 is built).
inline Vec in_key_order(Vec r) {
  return __builtin_shufflevector(r, r, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// The 16 lanes of v added by a fixed tree: lane l + lane l+8, then +4, +2, +1 (each a pairwise
// f32 add), so the total depends only on v.
inline float sum_lanes(Vec v) {
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// std::max per lane ((a < b) ? b : a): a NaN in b never replaces a, as the scalar running
// maximum the vector one replaced.
inline Vec vmax(Vec a, Vec b) { return a < b ? b : a; }

// 16 consecutive K or V elements from `p` as f32: f32 as they are, bf16 widened exactly
// (the bits shifted into the high half of a float).
typedef uint16_t HVec __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t UVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
template <bool kBf16>
inline Vec load_kv(const std::byte* p) {
  if constexpr (!kBf16) {
    return load(reinterpret_cast<const float*>(p));
  } else {
#if defined(__AVX512F__)
    // One zero-extending load and one shift (GCC splits the generic form below into halves,
    // extracts and inserts: five shuffles per 16 elements, which bound the decode step).
    const __m512i u = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
    Vec v;
    std::memcpy(&v, &u, sizeof v);
    return v;
#else
    HVec h;
    std::memcpy(&h, p, sizeof h);
    const UVec u = __builtin_convertvector(h, UVec) << 16;
    Vec v;
    std::memcpy(&v, &u, sizeof v);
    return v;
#endif
  }
}

// Two vectors of a paired bf16 row (see the header) from one 64-byte load at p: the elements at
// even positions (the low halves of the 32-bit words, shifted up) into lo, those at odd positions
// (the high halves, masked) into hi: model elements 32g + l and 32g + 16 + l, widened exactly.
inline void load_kv_pair(const std::byte* p, Vec& lo, Vec& hi) {
  UVec u;
  std::memcpy(&u, p, sizeof u);
  const UVec a = u << 16, b = u & 0xFFFF0000u;
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, &b, sizeof hi);
}

// One head's NV vectors (HD = 16 * NV model elements, in model order) of a K or V row at p.
template <int NV, bool kBf16>
inline void load_head(const std::byte* p, Vec (&v)[NV]) {
  if constexpr (kBf16 && NV % 2 == 0) {  // paired (kv_bf16_paired: HD a multiple of 32)
    for (int c = 0; c < NV; c += 2) load_kv_pair(p + c * kLanes * 2, v[c], v[c + 1]);
  } else {
    constexpr int64_t es = kBf16 ? 2 : 4;
    for (int c = 0; c < NV; ++c) v[c] = load_kv<kBf16>(p + c * kLanes * es);
  }
}

// Software prefetch, into L2, of the cache lines holding bytes [p, p + bytes). The cache's blocks
// are scattered over the pool, and DRAM latency times the core's miss buffers capped the demand
// loads (and L1 prefetches) of batch-8 decode at ~12 GB/s (session 22). heads_vec requests the
// next block's lines while it computes the current one, one kv head's slice before each head's
// work: requested all at once, the block's ~400 lines queued ahead of the current block's own
// loads (bench_paged_attention, batch 8, context 192, bf16: 1-4% slower, session 23).
inline void prefetch_span(const std::byte* p, int64_t bytes) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(p), a1 = a0 + uintptr_t(bytes);
  for (uintptr_t a = a0 & ~uintptr_t(63); a < a1; a += 64) {
#if defined(__x86_64__)
    // (GCC 12 deletes __builtin_prefetch from a loop nest like this one, whose body does
    // nothing else; the asm stays.)
    __asm__ volatile("prefetcht2 (%0)" : : "r"(a));
#else
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 1);
#endif
  }
}

// Heads [h0, h0 + G) of one query (q and o: the query's rows), HD = 16 * NV, reading the cache
// in place: row(base, block, t) is the byte address of token t's kv head 0 in a block of the K
// (kb) or V (vb) cache, kv head kh's at + kh * BT * HD elements (head-major blocks). The task's
// heads take their slices of a block one after the other, so the block is read as one ascending
// stream; each head's arithmetic is the same whatever G or h0: scores, per
// key, the NV products q_c * k_c summed in ascending c into one vector, then its lanes by the
// fixed reduce16 tree (16 keys of a block at once); m = max; exp by the polynomial of
// kernels/cpu/vec_math.h; their sum by lanes then a fixed tree; the output accumulated in
// ascending key order (in registers within a block, in o between blocks: f32 either way).
// score: (G, max_keys) scratch.
template <int NV, bool kBf16, typename Row>
void heads_vec(float* o, const float* q, int64_t h0, int64_t G, int64_t group,
               const PagedQuery& pq, int64_t BT, float scale, float* score, int64_t max_keys,
               const std::byte* kb, const std::byte* vb, const Row& row) {
  static const Reduce16 kTree;
  constexpr int64_t HD = NV * kLanes;
  constexpr int64_t es = kBf16 ? 2 : 4;
  const int64_t nk = pq.n_keys;
  // A kv head's slice of a block: BT rows of HD elements (the first n of them in use).
  const int64_t head_bytes = BT * HD * es;
  // Before head g's work on a block: the next block's rows of kv head (h0 + g) / group, if g
  // is the task's first head of that kv head.
  auto prefetch_next = [&](int64_t g, const std::byte* base, int32_t block, int64_t n) {
    const int64_t h = h0 + g;
    if (n > 0 && (g == 0 || h % group == 0))
      prefetch_span(row(base, block, 0) + h / group * head_bytes, n * HD * es);
  };
  Vec m[kMaxGroup];  // per head, lane-wise running maxima of the scores
  for (int64_t g = 0; g < G; ++g) {
    m[g] = splat(-INFINITY);
    prefetch_next(g, kb, pq.block_table[0], std::min(BT, nk));
  }
  for (int64_t j0 = 0; j0 < nk; j0 += BT) {
    const int64_t n = std::min(BT, nk - j0);
    const int32_t block = pq.block_table[j0 / BT];
    // The next block's keys, or during the last one the first block's values.
    const bool more = j0 + BT < nk;
    const std::byte* pbase = more ? kb : vb;
    const int32_t pblock = pq.block_table[more ? j0 / BT + 1 : 0];
    const int64_t pn = more ? std::min(BT, nk - j0 - BT) : std::min(BT, nk);
    for (int64_t g = 0; g < G; ++g) {
      prefetch_next(g, pbase, pblock, pn);
      const int64_t h = h0 + g, koff = h / group * head_bytes;
      Vec qv[NV];
      for (int c = 0; c < NV; ++c) qv[c] = load(q + h * HD + c * kLanes);
      Vec acc[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        acc[t] = splat(0.f);
        if (t >= n) continue;
        Vec kv[NV];
        load_head<NV, kBf16>(row(kb, block, t) + koff, kv);
        Vec a = qv[0] * kv[0];
        for (int c = 1; c < NV; ++c) a += qv[c] * kv[c];
        acc[t] = a;
      }
      // Lane l of r holds key kTree.key[l]'s dot product: put key t in lane t, scale, store
      // the n valid ones in key order and fold them into the running maximum (max is exact in
      // any order; the lanes past n are -inf there).
      const Vec r = in_key_order(reduce16(acc));
      const Vec sc = r * splat(scale);
      float* sg = score + g * max_keys;
      if (n == kLanes) {
        store(sg + j0, sc);
        m[g] = vmax(m[g], sc);
      } else {
        Vec sm = splat(-INFINITY);
        for (int t = 0; t < n; ++t) {
          sg[j0 + t] = sc[t];
          sm[t] = sc[t];
        }
        m[g] = vmax(m[g], sm);
      }
    }
  }
  float inv[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = score + g * max_keys;
    float mg = -INFINITY;
    for (int l = 0; l < kLanes; ++l) mg = std::max(mg, m[g][l]);
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) sg[j] = kernels::vec::exp_f32(sg[j] - mg);
    // Their sum: key j into lane j % 16 in ascending j, then the lanes by sum_lanes' tree (a
    // serial sum in ascending j was a latency-bound chain of nk adds: ~30% of the kernel).
    Vec acc = splat(0.f);
    int64_t j = 0;
    for (; j + kLanes <= nk; j += kLanes) acc += load(sg + j);
    if (j < nk) {
      Vec t = splat(0.f);
      for (int64_t l = 0; j + l < nk; ++l) t[l] = sg[j + l];
      acc += t;
    }
    inv[g] = 1.f / sum_lanes(acc);
  }
  for (int64_t j0 = 0; j0 < nk; j0 += BT) {
    const int64_t n = std::min(BT, nk - j0);
    const int32_t block = pq.block_table[j0 / BT];
    const int64_t pn = j0 + BT < nk ? std::min(BT, nk - j0 - BT) : 0;  // the next values
    const int32_t pblock = pn ? pq.block_table[j0 / BT + 1] : 0;
    for (int64_t g = 0; g < G; ++g) {
      prefetch_next(g, vb, pblock, pn);
      const int64_t h = h0 + g, voff = h / group * head_bytes;
      const float* sg = score + g * max_keys;
      float* oh = o + h * HD;
      Vec ov[NV];
      for (int c = 0; c < NV; ++c) ov[c] = j0 == 0 ? splat(0.f) : load(oh + c * kLanes);
      for (int64_t t = 0; t < n; ++t) {
        const Vec p = splat(sg[j0 + t] * inv[g]);
        Vec vv[NV];
        load_head<NV, kBf16>(row(vb, block, t) + voff, vv);
        for (int c = 0; c < NV; ++c) ov[c] += p * vv[c];
      }
      for (int c = 0; c < NV; ++c) store(oh + c * kLanes, ov[c]);
    }
  }
}

// Where model element d of a head sits in a paired bf16 row (the header's order).
inline int64_t paired_pos(int64_t d) { return (d & ~int64_t(31)) + 2 * (d & 15) + ((d >> 4) & 1); }

// kv_row_store / kv_row_load's arguments (the header's contract).
void check_kv_row(const char* fn, int64_t NKV, int64_t HD, int64_t head_stride, DType dtype) {
  LOOM_CHECK(NKV > 0 && HD > 0 && head_stride >= HD,
             "{}: NKV={} HD={} head_stride={} must be positive, head_stride >= HD", fn, NKV, HD,
             head_stride);
  LOOM_CHECK(dtype == DType::f32 || dtype == DType::bf16,
             "{}: K/V dtype {} is not supported; f32 or bf16", fn, dtype_name(dtype));
}

}  // namespace

void kv_row_store(const float* src, void* dst, int64_t NKV, int64_t HD, int64_t head_stride,
                  DType dtype) {
  check_kv_row("kv_row_store", NKV, HD, head_stride, dtype);
  for (int64_t kh = 0; kh < NKV; ++kh) {
    const float* x = src + kh * HD;
    if (dtype == DType::f32) {
      std::memcpy(static_cast<float*>(dst) + kh * head_stride, x, size_t(HD) * 4);
      continue;
    }
    bf16* d = static_cast<bf16*>(dst) + kh * head_stride;
    if (!kv_bf16_paired(HD)) {
      convert_f32_to_bf16(x, d, size_t(HD));
      continue;
    }
    // Each group of 32: word l = bf16(x[32g + l]) | bf16(x[32g + 16 + l]) << 16, rounded as
    // f32_to_bf16 rounds (nearest even; a NaN stays a quiet NaN), 16 words a vector.
    for (int64_t g = 0; g < HD; g += 32) {
      UVec u[2];
      std::memcpy(&u[0], x + g, sizeof(UVec));
      std::memcpy(&u[1], x + g + 16, sizeof(UVec));
      for (UVec& v : u) {
        const UVec nan = (UVec)((v & 0x7fffffffu) > 0x7f800000u);  // all ones in NaN lanes
        const UVec rounded = (v + 0x7fffu + ((v >> 16) & 1u)) >> 16;
        v = (nan & ((v >> 16) | 0x40u)) | (~nan & rounded);
      }
      const UVec w = u[0] | (u[1] << 16);
      std::memcpy(static_cast<void*>(d + g), &w, sizeof w);
    }
  }
}

void kv_row_load(const void* src, float* dst, int64_t NKV, int64_t HD, int64_t head_stride,
                 DType dtype) {
  check_kv_row("kv_row_load", NKV, HD, head_stride, dtype);
  for (int64_t kh = 0; kh < NKV; ++kh) {
    float* x = dst + kh * HD;
    if (dtype == DType::f32) {
      std::memcpy(x, static_cast<const float*>(src) + kh * head_stride, size_t(HD) * 4);
      continue;
    }
    const bf16* h = static_cast<const bf16*>(src) + kh * head_stride;
    for (int64_t d = 0; d < HD; ++d)
      x[d] = bf16_to_f32(h[kv_bf16_paired(HD) ? paired_pos(d) : d]);
  }
}

void paged_attention_forward(float* out, const float* q, const PagedQuery* queries,
                             int64_t n_queries, const void* k_base, const void* v_base,
                             const PagedShape& s) {
  const int64_t NH = s.NH, NKV = s.NKV, HD = s.HD, BT = s.block_tokens;
  LOOM_CHECK(NH > 0 && NKV > 0 && HD > 0 && BT > 0 && NH % NKV == 0,
             "paged attention: NH={} NKV={} HD={} BT={} must be positive with NKV dividing NH", NH,
             NKV, HD, BT);
  LOOM_CHECK(std::isfinite(s.scale) && s.scale > 0.f,
             "paged attention: scale {} must be finite > 0", s.scale);
  LOOM_CHECK(s.kv_dtype == DType::f32 || s.kv_dtype == DType::bf16,
             "paged attention: K/V dtype {} is not supported; f32 or bf16",
             dtype_name(s.kv_dtype));
  const int64_t KV = NKV * HD;
  LOOM_CHECK(s.block_stride >= BT * KV,
             "paged attention: block_stride {} is narrower than a block of {} tokens x {} elements",
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
  // The vector path: head dims of 16, 32, 64 or 128 and blocks of at most 16 tokens (the
  // KV cache's); the plain loops below otherwise.
  const bool vec_path = BT <= kLanes && (HD == 16 || HD == 32 || HD == 64 || HD == 128);
  const bool wide = s.kv_dtype == DType::f32;
  const std::byte* kb = static_cast<const std::byte*>(k_base);
  const std::byte* vb = static_cast<const std::byte*>(v_base);
  const size_t es = dtype_size(s.kv_dtype);
  // Rows [0, n) of head kh in block `block` of a K or V base, copied (f32) or widened exactly
  // (bf16) into buf (BT, HD), 64-byte aligned. Both dtypes then run the very same f32 loops on
  // buf, so a bf16 cache gives bitwise what the f32 kernel gives on the bf16-rounded K and V, and
  // the loops see the same alignment whatever the pool's address. The copy also helps f32: the
  // block's 16 rows are fetched as independent loads before the dependent per-key dot products
  // (measured ~10% faster than reading the pool in place at context 192, 12 heads of 64).
  auto rows = [&](const std::byte* base, int32_t block, int64_t kh, int64_t n, float* buf) {
    const std::byte* p = base + (int64_t(block) * s.block_stride + kh * BT * HD) * int64_t(es);
    if (wide) {
      std::memcpy(buf, p, size_t(n * HD) * 4);
    } else {
      const bf16* h = reinterpret_cast<const bf16*>(p);
      const bool paired = kv_bf16_paired(HD);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < HD; ++d)
          buf[t * HD + d] = bf16_to_f32(h[t * HD + (paired ? paired_pos(d) : d)]);
    }
  };
  // Heads per task on the vector path: the largest divisor of NH (up to kMaxGroup) that still
  // leaves two tasks per thread, so that a batch's tasks stream whole rows of a block and a
  // single query still spreads over the threads. (A head's arithmetic does not depend on it.)
  int64_t G = 1;
  if (vec_path) {
    const int64_t want = 2 * int64_t(omp_get_max_threads());
    for (int64_t g = std::min<int64_t>(NH, kMaxGroup); g > 1; --g)
      if (NH % g == 0 && n_queries * (NH / g) >= want) {
        G = g;
        break;
      }
  }
  const int64_t groups = NH / G;
#pragma omp parallel
  {
    // (G, max_keys) scaled scores, then weights
    std::vector<float> score(static_cast<size_t>(G * max_keys));
    // (BT, HD) one head's rows of a block, from a 64-byte boundary of wbuf
    std::vector<float> wbuf(static_cast<size_t>(BT * HD + 16));
    float* blk = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 63) &
                                          ~uintptr_t(63));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_queries * groups; ++task) {
      const int64_t i = task / groups, h0 = task % groups * G;
      const PagedQuery& pq = queries[i];
      if (vec_path) {
        auto row = [&](const std::byte* base, int32_t block, int64_t t) {
          return base + (int64_t(block) * s.block_stride + t * HD) * int64_t(es);
        };
        const float* qi = q + i * qs;
        float* oi = out + i * os;
        float* sc = score.data();
#define LOOM_HEADS(NV, BF) \
  heads_vec<NV, BF>(oi, qi, h0, G, group, pq, BT, s.scale, sc, max_keys, kb, vb, row)
        switch ((wide ? 0 : 16) + HD / kLanes) {
          case 1: LOOM_HEADS(1, false); break;
          case 2: LOOM_HEADS(2, false); break;
          case 4: LOOM_HEADS(4, false); break;
          case 8: LOOM_HEADS(8, false); break;
          case 17: LOOM_HEADS(1, true); break;
          case 18: LOOM_HEADS(2, true); break;
          case 20: LOOM_HEADS(4, true); break;
          case 24: LOOM_HEADS(8, true); break;
        }
#undef LOOM_HEADS
        continue;
      }
      const int64_t h = h0, kh = h / group;  // G = 1 off the vector path
      const float* qh = q + i * qs + h * HD;  // (HD)
      float* oh = out + i * os + h * HD;      // (HD)
      float m = -INFINITY;
      for (int64_t j = 0; j < pq.n_keys; ++j) {
        if (j % BT == 0) rows(kb, pq.block_table[j / BT], kh, std::min(BT, pq.n_keys - j), blk);
        const float* kj = blk + (j % BT) * HD;
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
        if (j % BT == 0) rows(vb, pq.block_table[j / BT], kh, std::min(BT, pq.n_keys - j), blk);
        const float* vj = blk + (j % BT) * HD;
        const float p = score[size_t(j)] * inv;
        for (int64_t d = 0; d < HD; ++d) oh[d] += p * vj[d];
      }
    }
  }
}

}  // namespace loom::attention
