// attention/flash_tiles.h: the tile geometry, masks, softmax exponential and shape checks shared
// by the CPU flash-attention kernels (flash_attention.cpp: f32 and widened bf16;
// flash_attention_bf16.cpp: native bf16 on AMX tiles or AVX512-BF16). Internal to those .cpp
// files: everything here has internal linkage (an anonymous namespace), so a file compiled for a
// wider instruction set gets its own copy and never lends it to code built for the base target.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention/flash_attention.h"
#include "attention/vec16.h"
#include "core/error.h"

namespace loom::attention {
namespace {

using namespace vec16;  // Vec, IVec, kLanes, load, store, splat
constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 64;   // key rows per tile; the softmax code assumes 4 vectors
static_assert(kBlockK == 4 * kLanes && kBlockQ == kBlockK);  // tiles share buffers
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

// 2^x for x <= 0 (x = -inf gives 0). x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by a
// degree-6 polynomial fitted for least maximum relative error on [-1/2, 1/2] (1.9e-9, below f32
// rounding; evaluated in f32 it is within 9.3e-8 of 2^f, as the degree-7 Taylor polynomial used
// before was within 7.9e-8: the roundings of the evaluation dominate both), and 2^n by adding
// n + 127 into the exponent bits: x + 1.5 * 2^23 rounds x to an integer n held in the low bits
// of its own pattern (0x4B400000 + n), so the exponent field is that pattern plus a constant,
// shifted. Arguments below -127 flush to 0 (never a denormal, whose products run slowly):
// probabilities under 1e-38 of the row maximum.
inline Vec exp2v(Vec x) {
  const Vec lo = splat(-127.0f);
  x = x < lo ? lo : x;
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23
  const Vec shifted = x + magic;
  const Vec f = x - (shifted - magic);
  Vec p = splat(1.5345800784416497e-04f);
  p = p * f + 1.3399930903688073e-03f;
  p = p * f + 9.618489071726799e-03f;
  p = p * f + 5.550328642129898e-02f;
  p = p * f + 2.4022646248340607e-01f;
  p = p * f + 6.931471824645996e-01f;
  p = p * f + 1.0f;
  // (0x4B400000 + n + 127 - 0x4B400000) << 23, in wrapping 32-bit arithmetic; n = -127 gives
  // an exponent field of 0, so 2^n = 0.
  const IVec bits = (std::bit_cast<IVec>(shifted) + (127 - 0x4B400000)) << 23;
  return p * std::bit_cast<Vec>(bits);
}

// Lane indices 0..63 of one tile row, as floats, for the causal/length mask.
struct ColumnIndex {
  Vec v[4];
  ColumnIndex() {
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < kLanes; ++l) v[c][l] = float(c * kLanes + l);
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch: one allocation made before the parallel region (so an allocation failure
// throws in the calling thread, not inside OpenMP), carved into 64-byte aligned per-thread
// blocks of `floats_per_thread` (rounded up to 16) and handed out piece by piece.
class ThreadScratch {
 public:
  ThreadScratch(int threads, int64_t floats_per_thread)
      : per_thread_(round_up(floats_per_thread, 16)), buf_(size_t(per_thread_ * threads + 16)) {}
  // A cursor over `thread`'s block: take(n) returns the next n floats.
  struct Cursor {
    float* p;
    float* take(int64_t n) {
      float* r = p;
      p += n;
      return r;
    }
  };
  Cursor block(int thread) {
    auto addr = reinterpret_cast<uintptr_t>(buf_.data());
    return Cursor{buf_.data() + (round_up(int64_t(addr), 64) - int64_t(addr)) / 4 +
                  per_thread_ * thread};
  }

 private:
  int64_t per_thread_;
  std::vector<float> buf_;
};

inline void check_shape(const AttentionShape& s, const char* fn) {
  LOOM_CHECK(s.B >= 0 && s.Tq >= 0 && s.Tk >= 0, "{}: B={} Tq={} Tk={} must be >= 0", fn, s.B,
             s.Tq, s.Tk);
  LOOM_CHECK(s.NH > 0 && s.NKV > 0 && s.HD > 0, "{}: NH={} NKV={} HD={} must be > 0", fn, s.NH,
             s.NKV, s.HD);
  LOOM_CHECK(s.NH % s.NKV == 0,
             "{}: NKV={} must divide NH={} (each kv head serves NH/NKV query heads)", fn, s.NKV,
             s.NH);
  LOOM_CHECK(s.q_stride >= s.NH * s.HD && s.o_stride >= s.NH * s.HD,
             "{}: q_stride={} and o_stride={} must be >= NH*HD={}", fn, s.q_stride, s.o_stride,
             s.NH * s.HD);
  LOOM_CHECK(s.k_stride >= s.NKV * s.HD && s.v_stride >= s.NKV * s.HD,
             "{}: k_stride={} and v_stride={} must be >= NKV*HD={}", fn, s.k_stride, s.v_stride,
             s.NKV * s.HD);
  LOOM_CHECK(std::isfinite(s.scale) && s.scale > 0.0f,
             "{}: scale={} must be finite and > 0 (usually 1/sqrt(HD) = {})", fn, s.scale,
             1.0 / std::sqrt(double(s.HD)));
}

// Geometry of one (query block, key block) tile: the last visible column of each row.
struct TileGeometry {
  int64_t i0, nq, j0, nk;
  int64_t diag;  // row r may see columns c <= r + diag (causal), before the nk limit
  bool causal;
  int64_t last_column(int64_t r) const {
    return causal ? std::min(nk - 1, r + diag) : nk - 1;
  }
  // Every (row, column) of the full 64 x 64 tile is visible: no mask to apply (at long
  // sequences almost every tile).
  bool all_visible() const {
    return nq == kBlockQ && nk == kBlockK && (!causal || diag >= nk - 1);
  }
};
inline TileGeometry tile_geometry(const AttentionShape& s, int64_t i0, int64_t j0) {
  TileGeometry g;
  g.i0 = i0;
  g.nq = std::min(kBlockQ, s.Tq - i0);
  g.j0 = j0;
  g.nk = std::min(kBlockK, s.Tk - j0);
  g.diag = (s.q_offset + i0) - (s.k_offset + j0);
  g.causal = s.causal;
  return g;
}

// Number of key blocks visible to queries [i0, i0+nq): in the causal case the last query sees
// keys up to q_offset+i0+nq-1-k_offset.
inline int64_t visible_key_blocks(const AttentionShape& s, int64_t i0, int64_t nq) {
  const int64_t nkb = (s.Tk + kBlockK - 1) / kBlockK;
  if (!s.causal) return nkb;
  const int64_t last_key = s.q_offset + i0 + nq - 1 - s.k_offset;
  if (last_key < 0) return 0;
  return std::min(nkb, last_key / kBlockK + 1);
}

// First query block that sees key j0 (and so any key of its block), or the number of query
// blocks when none does. Exact, so the (query block, key block) tiles visited from the key side
// are the tiles visible_key_blocks visits from the query side.
inline int64_t first_visible_query_block(const AttentionShape& s, int64_t j0) {
  if (!s.causal) return 0;
  const int64_t first_query = s.k_offset + j0 - s.q_offset;
  if (first_query >= s.Tq) return (s.Tq + kBlockQ - 1) / kBlockQ;
  return first_query <= 0 ? 0 : first_query / kBlockQ;
}

// ---------------------------------------------------------------------------------------------
// Forward

// Query lanes of key row j of a transposed tile that may see key j: i < nq and, when causal,
// i >= j - diag (key j0+j is visible to query i0+i iff k_offset+j0+j <= q_offset+i0+i).
struct QueryLaneMask {
  IVec m[4];
  QueryLaneMask(const ColumnIndex& col, const TileGeometry& g, int64_t j) {
    const Vec nq = splat(float(g.nq));
    const Vec lo = splat(g.causal ? float(j - g.diag) : -1.0f);
    for (int c = 0; c < 4; ++c) m[c] = (col.v[c] < nq) & (col.v[c] >= lo);
  }
};

// Online softmax over the key blocks of one task's 64 queries (the forward of both kernels),
// statistics in base 2, one lane per query: m the running max, l the running sum of 2^(x - m).
struct OnlineSoftmax {
  Vec m[4], l[4];
  OnlineSoftmax() {
    for (int c = 0; c < 4; ++c) {
      m[c] = splat(kNegInf);
      l[c] = splat(0.0f);
    }
  }
  // st: the tile's transposed scores S^T (one row of 64 queries per key), unscaled. Rows
  // [0, g.nk) are replaced by P^T = 2^(x cs - max), masked entries by 0; rows [g.nk, rows) are
  // set to 0. alpha gets each query's rescale factor for what it accumulated so far (0 on its
  // first visible tile). Rows are summed in order: deterministic. The running max is kept in
  // base 2: cs > 0 and rounding is monotone, so round(cs * max x) is the max of the rounded
  // scaled scores; the exponent's argument is one FMA, x cs - max.
  void step(float* st, const TileGeometry& g, const ColumnIndex& col, float cs, int64_t rows,
            Vec alpha[4]) {
    Vec mx[4];
    for (int c = 0; c < 4; ++c) mx[c] = splat(kNegInf);
    if (g.all_visible()) {  // no mask: one max per vector, nothing stored
      for (int64_t j = 0; j < g.nk; ++j) {
        const float* row = st + j * kBlockQ;
        for (int c = 0; c < 4; ++c) mx[c] = vmax(mx[c], load(row + c * kLanes));
      }
    } else {
      for (int64_t j = 0; j < g.nk; ++j) {
        const QueryLaneMask vis(col, g, j);
        float* row = st + j * kBlockQ;
        for (int c = 0; c < 4; ++c) {
          Vec x = load(row + c * kLanes);
          x = vis.m[c] ? x : splat(kNegInf);
          store(row + c * kLanes, x);
          mx[c] = vmax(mx[c], x);
        }
      }
    }
    Vec m_use[4];
    for (int c = 0; c < 4; ++c) {
      const Vec m_new = vmax(m[c], mx[c] * cs);
      // A query with no visible key so far keeps m = -inf; subtracting 0 instead keeps
      // 2^(-inf - m) at 0 rather than NaN.
      m_use[c] = m_new == splat(kNegInf) ? splat(0.0f) : m_new;
      alpha[c] = exp2v(m[c] - m_use[c]);
      m[c] = m_new;
    }
    Vec sum[4];
    for (int c = 0; c < 4; ++c) sum[c] = splat(0.0f);
    for (int64_t j = 0; j < g.nk; ++j) {
      float* row = st + j * kBlockQ;
      for (int c = 0; c < 4; ++c) {
        const Vec p = exp2v(fmav(load(row + c * kLanes), splat(cs), -m_use[c]));
        store(row + c * kLanes, p);
        sum[c] += p;
      }
    }
    for (int64_t j = g.nk; j < rows; ++j)
      for (int c = 0; c < 4; ++c) store(st + j * kBlockQ + c * kLanes, splat(0.0f));
    for (int c = 0; c < 4; ++c) l[c] = l[c] * alpha[c] + sum[c];
  }
  // out and lse of queries [i0, i0 + nq) of (b, h) from the unnormalised O, whose element
  // (query r, d) is o[r * row_stride + d * col_stride]; a query with no visible key gets 0 and
  // lse = -inf.
  void finish(float* out, float* lse, const AttentionShape& s, int64_t b, int64_t h, int64_t i0,
              int64_t nq, const float* o, int64_t row_stride, int64_t col_stride) const {
    float m_row[kBlockQ], l_row[kBlockQ];
    for (int c = 0; c < 4; ++c) {
      store(m_row + c * kLanes, m[c]);
      store(l_row + c * kLanes, l[c]);
    }
    for (int64_t r = 0; r < nq; ++r) {
      float* dst = out + (b * s.Tq + i0 + r) * s.o_stride + h * s.HD;
      float* lse_dst = lse + (b * s.NH + h) * s.Tq + i0 + r;
      if (l_row[r] > 0.0f) {
        const float inv = 1.0f / l_row[r];
        for (int64_t d = 0; d < s.HD; ++d) dst[d] = o[r * row_stride + d * col_stride] * inv;
        *lse_dst = (m_row[r] + std::log2(l_row[r])) * kLn2;
      } else {  // no visible key
        for (int64_t d = 0; d < s.HD; ++d) dst[d] = 0.0f;
        *lse_dst = kNegInf;
      }
    }
  }
};

// Row r of (b, head)'s lse (in base 2; -inf past Tq: no gradient) and D, as 4 lane vectors for
// the 64 queries of block i0.
inline void query_stats(Vec lse2[4], Vec Dv[4], const float* lse, const float* D,
                 const AttentionShape& s, int64_t b, int64_t h, int64_t i0, int64_t nq) {
  float lrow[kBlockQ], drow[kBlockQ];
  for (int64_t r = 0; r < kBlockQ; ++r) {
    lrow[r] = r < nq ? lse[(b * s.NH + h) * s.Tq + i0 + r] * kLog2e : kNegInf;
    drow[r] = r < nq ? D[(b * s.NH + h) * s.Tq + i0 + r] : 0.0f;
  }
  for (int c = 0; c < 4; ++c) {
    lse2[c] = load(lrow + c * kLanes);
    Dv[c] = load(drow + c * kLanes);
  }
}

// Every query of the block sees some key (no lse is -inf): with all_visible(), no mask applies.
inline bool all_lanes_finite(const Vec lse2[4]) {
  bool ok = true;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < kLanes; ++l) ok = ok && lse2[c][l] != kNegInf;
  return ok;
}

inline void check_pointers(bool ok, const char* fn, const AttentionShape& s) {
  LOOM_CHECK(ok, "{}: a null buffer was passed for B={} Tq={} Tk={}", fn, s.B, s.Tq, s.Tk);
}

}  // namespace
}  // namespace loom::attention
