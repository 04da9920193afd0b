// attention/flash_attention_bf16.cpp: native bf16 flash attention, forward and
// backward (flash_attention.h, "Native bf16"), on Intel AMX tiles or, on CPUs
// without them, on AVX512-BF16 instructions (VDPBF16PS) that take the same
// packed operands (dp_gemm; the backend is a template parameter of every
// thread function, so the rest of the code is shared).
//
// Glossary as in flash_attention.cpp: B batch, Tq/Tk query/key length, NH/NKV
// query/kv heads, group = NH/NKV, HD head dim, HDp = HD rounded up to 32 (one
// tile's reduction depth), Tqp/Tkp = lengths rounded up to the 64-row blocks, S
// scores, P probabilities, dP = dO V^T, dS = P (dP - D), lse log-sum-exp. A
// "pair" is two bf16 packed in one 32-bit word (the AMX "VNNI" operand form).
//
// The tile instruction. TDPBF16PS C += A B: C is 16 x 16 f32, A is 16 rows of
// 32 bf16 (row-major, reduction along the row), B is 16 rows of 16 pairs, row
// kp holding (B[2kp][n], B[2kp+1][n]) for the 16 columns n. Each product of two
// bf16 is exact in f32 and the sums accumulate in f32 (with denormals flushed
// to zero). Measured here (a 2-core Xeon with AMX, one core): ~2 TFLOP/s, ~30x
// the f32 FMA peak of the same core (bench/attention's microbenchmark,
// `--peak`).
//
// The algorithm is the f32 kernel's (flash_attention.cpp), in its
// transposed-score form everywhere, so per-query softmax statistics are vector
// lanes and no tile is transposed per step:
//   forward, per (b, head, query block):  S^T = K Q^T;  online softmax;
//   O^T += V^T P^T
//   backward pass 1, per (b, kv head, key block), over the group's
//   heads and visible query blocks:
//       S^T = K Q^T, dP^T = V dO^T;  P^T, dS^T;  dV += P^T dO;  dK += dS^T Q
//   backward pass 2, per (b, head, query block), over visible key blocks:
//       S^T, dP^T as in pass 1 (same operands, same instructions: the same
//       bits);  dQ^T += K^T dS^T
//   or both passes in one (backward_fused, per (b, kv head)): 5 products per
//   tile instead of 7, the same bits.
// Every operand is packed once per call into the layout its tile loads want (K
// and V rows, K^T and V^T, Q^T and dO^T as pairs over d, Q and dO as pairs over
// queries): O(T * heads * HD) bf16 of workspace, read many times, and never a
// Tq x Tk matrix.
//
// Numerics: S and dP are exact products summed in f32, the softmax runs in f32
// (the same exp2 polynomial and masks as the f32 kernel), and P and dS * scale
// are rounded to bf16 (nearest even) before they multiply V, dO, Q and K, as
// FlashAttention does on GPUs. Outputs, lse and the gradients are f32.
// Deterministic: each output element has one writer and a fixed order, so the
// result does not depend on the thread count.
//
// Portability: the kernels are compiled for AMX and AVX-512 whatever the
// build's -march, and run only after amx_bf16_usable() (tile backend) or
// avx512_bf16_usable() (kernels/cpu/amx.h) has checked the CPU, the OS and
// (tiles) Linux's permission; the AVX512-BF16 backend executes no tile
// instruction. Every header is included
// before the target region opens, and the region holds only functions with
// internal linkage and no standard-library templates, so no code built for AMX
// is shared with the rest of the program.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention/flash_attention.h"
#include "attention/flash_tiles.h"
#include "core/error.h"
#include "kernels/cpu/amx.h"

namespace loom::attention {

namespace {

constexpr int64_t kPairK = 32;  // reduction depth of one tile product (32 bf16 per A row)

inline uint16_t bits(bf16 x) { return x.bits; }

// ---------------------------------------------------------------------------------------------
// Packing (plain code, run once per call). Every packed layout is zero-padded,
// so padded rows and columns contribute exact zeros to the tile products.

// dst (rows_total, HDp) bf16 rows: rows [0, n) of the strided src, zero
// elsewhere.
void pack_rows(uint16_t* dst, int64_t rows_total, int64_t HDp, const bf16* src, int64_t stride,
               int64_t n, int64_t HD) {
  for (int64_t r = 0; r < rows_total; ++r) {
    uint16_t* o = dst + r * HDp;
    for (int64_t d = 0; d < HDp; ++d) o[d] = (r < n && d < HD) ? bits(src[r * stride + d]) : 0;
  }
}

// dst (HDp, width) bf16: the transpose of rows [0, n) of src, zero elsewhere.
void pack_transposed(uint16_t* dst, int64_t HDp, int64_t width, const bf16* src, int64_t stride,
                     int64_t n, int64_t HD) {
  std::memset(dst, 0, size_t(HDp * width) * 2);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < HD; ++d) dst[d * width + r] = bits(src[r * stride + d]);
}

// dst (HDp/2, width) pairs over d: dst[dp][r] = (src[r][2dp], src[r][2dp+1]),
// zero past n / HD.
void pack_pairs_over_d(uint32_t* dst, int64_t HDp, int64_t width, const bf16* src, int64_t stride,
                       int64_t n, int64_t HD) {
  std::memset(dst, 0, size_t(HDp / 2 * width) * 4);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < HD; d += 2) {
      const uint32_t lo = bits(src[r * stride + d]);
      const uint32_t hi = d + 1 < HD ? bits(src[r * stride + d + 1]) : 0;
      dst[(d / 2) * width + r] = lo | (hi << 16);
    }
}

// dst (rows_total/2, HDp) pairs over rows: dst[rp][d] = (src[2rp][d],
// src[2rp+1][d]).
void pack_pairs_over_rows(uint32_t* dst, int64_t rows_total, int64_t HDp, const bf16* src,
                          int64_t stride, int64_t n, int64_t HD) {
  std::memset(dst, 0, size_t(rows_total / 2 * HDp) * 4);
  for (int64_t r = 0; r < n; ++r) {
    const int shift = (r & 1) * 16;
    uint32_t* o = dst + (r / 2) * HDp;
    for (int64_t d = 0; d < HD; ++d) o[d] |= uint32_t(bits(src[r * stride + d])) << shift;
  }
}

// Per-thread scratch (64-byte aligned pieces of one ThreadScratch block).
struct AmxTiles {
  float *s, *dp, *acc0,
      *acc1;           // S^T / P^T, dP^T / dS^T (64 x 64); accumulators (64 x HDp)
  uint16_t *pb, *dsb;  // P^T, dS^T in bf16 rows (64 x 64)
  uint32_t *pairs,
      *qt;  // P^T or dS^T as pairs over keys (32 x 64); Q^T pairs (HDp/2 x 64)
};
class AmxScratch {
 public:
  AmxScratch(int threads, int64_t HDp)
      : HDp_(HDp), mem_(threads, 2 * 4096 + 2 * 64 * HDp + 4096 + 2048 + 32 * HDp) {}
  AmxTiles tiles(int thread) {
    ThreadScratch::Cursor c = mem_.block(thread);
    AmxTiles t;
    t.s = c.take(4096);
    t.dp = c.take(4096);
    t.acc0 = c.take(64 * HDp_);
    t.acc1 = c.take(64 * HDp_);
    t.pb = reinterpret_cast<uint16_t*>(c.take(2048));
    t.dsb = reinterpret_cast<uint16_t*>(c.take(2048));
    t.pairs = reinterpret_cast<uint32_t*>(c.take(2048));
    t.qt = reinterpret_cast<uint32_t*>(c.take(32 * HDp_));
    return t;
  }

 private:
  int64_t HDp_;
  ThreadScratch mem_;
};

}  // namespace

namespace {

struct Packed {
  const uint16_t *kr, *vr, *kt,
      *vt;                              // per (b, kv head): rows (Tkp, HDp); transposes (HDp, Tkp)
  const uint32_t *qt, *dot, *qr, *dor;  // per (b, head): pairs over d (HDp/2,
                                        // Tqp); over queries (Tqp/2, HDp)
  int64_t HDp, Tqp, Tkp;
  int64_t kv(int64_t b, int64_t kvh, int64_t NKV) const { return (b * NKV + kvh) * Tkp * HDp; }
  int64_t qh(int64_t b, int64_t h, int64_t NH) const { return (b * NH + h) * Tqp * HDp / 2; }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Code built for AMX and AVX-512 (internal linkage only; see the file comment).
#if LOOM_AMX_KERNELS
LOOM_AMX_BEGIN

namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// dk and dv rows [j0, j0 + nk) of (b, kv head) += the dK and dV tiles (64 x HDp).
void add_kv_tiles(float* dk, float* dv, const float* dK, const float* dV, const AttentionShape& s,
                  int64_t b, int64_t kvh, int64_t j0, int64_t nk, int64_t HDp) {
  for (int64_t c = 0; c < nk; ++c) {
    float* dk_dst = dk + (b * s.Tk + j0 + c) * s.k_stride + kvh * s.HD;
    float* dv_dst = dv + (b * s.Tk + j0 + c) * s.v_stride + kvh * s.HD;
    for (int64_t d = 0; d < s.HD; ++d) {
      dk_dst[d] += dK[c * HDp + d];
      dv_dst[d] += dV[c * HDp + d];
    }
  }
}

// dq rows [i0, i0 + nq) of (b, head h) += the transposed dQ^T tile (HDp x 64).
void add_dq_tile(float* dq, const float* dqt, const AttentionShape& s, int64_t b, int64_t h,
                 int64_t i0, int64_t nq) {
  for (int64_t r = 0; r < nq; ++r) {
    float* dst = dq + (b * s.Tq + i0 + r) * s.q_stride + h * s.HD;
    for (int64_t d = 0; d < s.HD; ++d) dst[d] += dqt[d * kBlockQ + r];
  }
}

// Every tile is 16 rows x 64 bytes: tmm0-3 the 2 x 2 block of C, tmm4-5 two A
// row blocks, tmm6-7 two B column blocks.
void configure_tiles() {
  const kernels::AmxTileConfig cfg = kernels::amx_tiles_16x64();
  _tile_loadconfig(&cfg);
}

// C (M x N f32, row stride ldc) = [C +] A (M x K bf16 rows, stride lda) B,
// where B is given as pairs: B2 (K/2 x N words, stride ldb), B2[kp][n] =
// (B[2kp][n], B[2kp+1][n]). M, N and K are multiples of 32. Each element of C
// sums its K products in the same order whatever M and N.
void tile_gemm(float* C, int64_t ldc, const uint16_t* A, int64_t lda, const uint32_t* B2,
               int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate) {
  const int64_t cs = ldc * 4, as = lda * 2, bs = ldb * 4;
  for (int64_t i = 0; i < M; i += 32)
    for (int64_t j = 0; j < N; j += 32) {
      float* c = C + i * ldc + j;
      if (accumulate) {
        _tile_loadd(0, c, cs);
        _tile_loadd(1, c + 16, cs);
        _tile_loadd(2, c + 16 * ldc, cs);
        _tile_loadd(3, c + 16 * ldc + 16, cs);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < K; k += kPairK) {
        _tile_loadd(4, A + i * lda + k, as);
        _tile_loadd(5, A + (i + 16) * lda + k, as);
        _tile_loadd(6, B2 + (k / 2) * ldb + j, bs);
        _tile_loadd(7, B2 + (k / 2) * ldb + j + 16, bs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, cs);
      _tile_stored(1, c + 16, cs);
      _tile_stored(2, c + 16 * ldc, cs);
      _tile_stored(3, c + 16 * ldc + 16, cs);
    }
}

// C (4 x 16*NV) [+]= A (4 x K) B for the AVX512-BF16 path: VDPBF16PS adds to each f32 lane
// a[2kp+1] b[2kp+1] + a[2kp] b[2kp] (products exact, each sum rounded to f32; denormals flushed,
// as on the tiles), with the pair (A[r][2kp], A[r][2kp+1]) broadcast to every lane. The 4 x NV
// accumulators stay in registers for the whole reduction.
template <int NV>
inline void dp_block(float* c, int64_t ldc, const uint16_t* a, int64_t lda, const uint32_t* b2,
                     int64_t ldb, int64_t K, bool accumulate) {
  __m512 acc[4][NV];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(b2 + kp * ldb + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, 4);
      const __m512i av = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)b[v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// tile_gemm's contract (M, N, K multiples of 32) on AVX512-BF16 instructions: the same products
// and f32 sums, in pairs along K in ascending order, so each element of C is the same chain
// whatever M and N (the bits differ from the tiles', whose order within 32 is their own).
void dp_gemm(float* C, int64_t ldc, const uint16_t* A, int64_t lda, const uint32_t* B2,
             int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate) {
  for (int64_t i = 0; i < M; i += 4) {
    int64_t j = 0;
    for (; j + 64 <= N; j += 64)
      dp_block<4>(C + i * ldc + j, ldc, A + i * lda, lda, B2 + j, ldb, K, accumulate);
    if (j < N)  // N is a multiple of 32
      dp_block<2>(C + i * ldc + j, ldc, A + i * lda, lda, B2 + j, ldb, K, accumulate);
  }
}

// The product of the backend kAmx names (tiles, or AVX512-BF16 instructions).
template <bool kAmx>
inline void gemm(float* C, int64_t ldc, const uint16_t* A, int64_t lda, const uint32_t* B2,
                 int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate) {
  if constexpr (kAmx)
    tile_gemm(C, ldc, A, lda, B2, ldb, M, N, K, accumulate);
  else
    dp_gemm(C, ldc, A, lda, B2, ldb, M, N, K, accumulate);
}

template <bool kAmx>
struct TileState {  // the tile configuration of a thread on the AMX backend, released at exit
  TileState() {
    if constexpr (kAmx) configure_tiles();
  }
  ~TileState() {
    if constexpr (kAmx) _tile_release();
  }
};

inline __m512i to_bf16_lanes(Vec v) {  // 16 floats -> 16 bf16 (nearest even) in 32-bit lanes
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
}

// (64 x 64) f32 rows -> bf16 rows.
void rows_to_bf16(uint16_t* dst, const float* src) {
  for (int64_t r = 0; r < 64; ++r)
    for (int c = 0; c < 4; ++c) {
      __m512 x = _mm512_loadu_ps(src + r * 64 + c * kLanes);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * 64 + c * kLanes),
                          (__m256i)_mm512_cvtneps_pbh(x));
    }
}

// (64 x 64) f32 rows -> (32 x 64) pairs over rows: dst[rp][n] = (src[2rp][n],
// src[2rp+1][n]).
void rows_to_pairs(uint32_t* dst, const float* src) {
  for (int64_t rp = 0; rp < 32; ++rp)
    for (int c = 0; c < 4; ++c) {
      const __m512i lo = to_bf16_lanes(load(src + 2 * rp * 64 + c * kLanes));
      const __m512i hi = to_bf16_lanes(load(src + (2 * rp + 1) * 64 + c * kLanes));
      _mm512_storeu_si512(dst + rp * 64 + c * kLanes,
                          _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

// P^T and scale * dS^T of one tile from S^T (t.s) and dP^T (t.dp), in place;
// key rows past nk, masked entries and queries without a visible key are 0.
// Both backward passes call this with the same tiles, so P and dS are
// bit-identical between them. noinline: one compiled copy, so both passes run
// the very same instructions (no per-call-site FMA contraction choices).
__attribute__((noinline)) void probabilities_and_dscores_t(const AmxTiles& t, const TileGeometry& g,
                                                           const ColumnIndex& col,
                                                           const Vec lse2[4], const Vec Dv[4],
                                                           float cs, float scale) {
  // Tiles with every entry visible, for queries that all see some key, skip the mask.
  const bool unmasked = g.all_visible() && all_lanes_finite(lse2);
  for (int64_t j = 0; j < kBlockK; ++j) {
    float* srow = t.s + j * kBlockQ;
    float* drow = t.dp + j * kBlockQ;
    if (j >= g.nk) {
      std::memset(srow, 0, kBlockQ * 4);
      std::memset(drow, 0, kBlockQ * 4);
      continue;
    }
    if (unmasked) {
      for (int c = 0; c < 4; ++c) {
        const Vec p = exp2v(fmav(load(srow + c * kLanes), splat(cs), -lse2[c]));
        store(srow + c * kLanes, p);
        store(drow + c * kLanes, p * (load(drow + c * kLanes) - Dv[c]) * scale);
      }
      continue;
    }
    const QueryLaneMask vis(col, g, j);
    for (int c = 0; c < 4; ++c) {
      const IVec ok = vis.m[c] & (lse2[c] != splat(kNegInf));
      Vec p = exp2v(fmav(load(srow + c * kLanes), splat(cs), -lse2[c]));
      p = ok ? p : splat(0.0f);
      store(srow + c * kLanes, p);
      store(drow + c * kLanes, p * (load(drow + c * kLanes) - Dv[c]) * scale);
    }
  }
}


// One thread of forward's parallel region (a function of its own so that
// clang, whose OpenMP outlining drops target attributes, compiles the tile code
// with them).
template <bool kAmx>
void forward_thread(float* out, float* lse, const bf16* q, const Packed& pk,
                        const AttentionShape& s, AmxScratch& scratch) {
  const int64_t HD = s.HD, HDp = pk.HDp, group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, tasks = s.B * s.NH * nqb;
  const float cs = s.scale * kLog2e;
  const ColumnIndex col;
  TileState<kAmx> tile_state;
  AmxTiles t = scratch.tiles(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t qb = nqb - 1 - task % nqb, h = (task / nqb) % s.NH, b = task / (nqb * s.NH);
    const int64_t kvh = h / group, i0 = qb * kBlockQ, nq = min64(kBlockQ, s.Tq - i0);
    const uint16_t* kr = pk.kr + pk.kv(b, kvh, s.NKV);
    const uint16_t* vt = pk.vt + pk.kv(b, kvh, s.NKV);
    pack_pairs_over_d(t.qt, HDp, kBlockQ, q + (b * s.Tq + i0) * s.q_stride + h * HD, s.q_stride, nq,
                      HD);
    float* ot = t.acc0;  // O^T (HDp, 64), unnormalised
    std::memset(ot, 0, size_t(HDp * kBlockQ) * 4);
    OnlineSoftmax sm;
    const int64_t nkb = visible_key_blocks(s, i0, nq);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const TileGeometry g = tile_geometry(s, i0, kb * kBlockK);
      gemm<kAmx>(t.s, kBlockQ, kr + g.j0 * HDp, HDp, t.qt, kBlockQ, kBlockK, kBlockQ, HDp,
                false);  // S^T (64 keys, 64 queries)
      Vec alpha[4];
      sm.step(t.s, g, col, cs, kBlockK, alpha);
      for (int64_t d = 0; d < HDp; ++d)
        for (int c = 0; c < 4; ++c)
          store(ot + d * kBlockQ + c * kLanes, load(ot + d * kBlockQ + c * kLanes) * alpha[c]);
      rows_to_pairs(t.pairs, t.s);  // P^T as pairs over keys
      gemm<kAmx>(ot, kBlockQ, vt + g.j0, pk.Tkp, t.pairs, kBlockQ, HDp, kBlockQ, kBlockK,
                true);  // O^T += V^T P^T
    }
    sm.finish(out, lse, s, b, h, i0, nq, ot, 1, kBlockQ);
  }
}

template <bool kAmx>
void forward(float* out, float* lse, const bf16* q, const Packed& pk, const AttentionShape& s,
                 AmxScratch& scratch) {
#pragma omp parallel
  forward_thread<kAmx>(out, lse, q, pk, s, scratch);
}

// One thread of backward_dkdv's parallel region (a function of its own so
// that clang, whose OpenMP outlining drops target attributes, compiles the tile
// code with them).
template <bool kAmx>
void backward_dkdv_thread(float* dk, float* dv, const float* lse, const float* D,
                              const Packed& pk, const AttentionShape& s, AmxScratch& scratch) {
  const int64_t HDp = pk.HDp, group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, nkb = (s.Tk + kBlockK - 1) / kBlockK;
  const int64_t tasks = s.B * s.NKV * nkb;
  const float cs = s.scale * kLog2e;
  const ColumnIndex col;
  TileState<kAmx> tile_state;
  AmxTiles t = scratch.tiles(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t kb = task % nkb, kvh = (task / nkb) % s.NKV, b = task / (nkb * s.NKV);
    const int64_t j0 = kb * kBlockK, nk = min64(kBlockK, s.Tk - j0);
    const uint16_t* kr = pk.kr + pk.kv(b, kvh, s.NKV) + j0 * HDp;
    const uint16_t* vr = pk.vr + pk.kv(b, kvh, s.NKV) + j0 * HDp;
    float* dK = t.acc0;  // (64, HDp)
    float* dV = t.acc1;
    std::memset(dK, 0, size_t(kBlockK * HDp) * 4);
    std::memset(dV, 0, size_t(kBlockK * HDp) * 4);
    for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
      const int64_t qo = pk.qh(b, h, s.NH);
      for (int64_t qb = first_visible_query_block(s, j0); qb < nqb; ++qb) {
        const TileGeometry g = tile_geometry(s, qb * kBlockQ, j0);
        Vec lse2[4], Dv[4];
        query_stats(lse2, Dv, lse, D, s, b, h, g.i0, g.nq);
        gemm<kAmx>(t.s, kBlockQ, kr, HDp, pk.qt + qo + g.i0, pk.Tqp, kBlockK, kBlockQ, HDp, false);
        gemm<kAmx>(t.dp, kBlockQ, vr, HDp, pk.dot + qo + g.i0, pk.Tqp, kBlockK, kBlockQ, HDp,
                   false);
        probabilities_and_dscores_t(t, g, col, lse2, Dv, cs, s.scale);
        rows_to_bf16(t.pb, t.s);
        rows_to_bf16(t.dsb, t.dp);
        const int64_t ro = qo + (g.i0 / 2) * HDp;
        gemm<kAmx>(dV, HDp, t.pb, kBlockQ, pk.dor + ro, HDp, kBlockK, HDp, kBlockQ, true);
        gemm<kAmx>(dK, HDp, t.dsb, kBlockQ, pk.qr + ro, HDp, kBlockK, HDp, kBlockQ, true);
      }
    }
    add_kv_tiles(dk, dv, dK, dV, s, b, kvh, j0, nk, HDp);
  }
}

template <bool kAmx>
void backward_dkdv(float* dk, float* dv, const float* lse, const float* D, const Packed& pk,
                       const AttentionShape& s, AmxScratch& scratch) {
#pragma omp parallel
  backward_dkdv_thread<kAmx>(dk, dv, lse, D, pk, s, scratch);
}

// One thread of backward_dq's parallel region (a function of its own so
// that clang, whose OpenMP outlining drops target attributes, compiles the tile
// code with them).
template <bool kAmx>
void backward_dq_thread(float* dq, const float* lse, const float* D, const Packed& pk,
                            const AttentionShape& s, AmxScratch& scratch) {
  const int64_t HDp = pk.HDp, group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, tasks = s.B * s.NH * nqb;
  const float cs = s.scale * kLog2e;
  const ColumnIndex col;
  TileState<kAmx> tile_state;
  AmxTiles t = scratch.tiles(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t qb = nqb - 1 - task % nqb, h = (task / nqb) % s.NH, b = task / (nqb * s.NH);
    const int64_t kvh = h / group, i0 = qb * kBlockQ, nq = min64(kBlockQ, s.Tq - i0);
    const int64_t qo = pk.qh(b, h, s.NH), ko = pk.kv(b, kvh, s.NKV);
    Vec lse2[4], Dv[4];
    query_stats(lse2, Dv, lse, D, s, b, h, i0, nq);
    float* dqt = t.acc0;  // dQ^T (HDp, 64)
    std::memset(dqt, 0, size_t(HDp * kBlockQ) * 4);
    const int64_t nkb = visible_key_blocks(s, i0, nq);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const TileGeometry g = tile_geometry(s, i0, kb * kBlockK);
      gemm<kAmx>(t.s, kBlockQ, pk.kr + ko + g.j0 * HDp, HDp, pk.qt + qo + i0, pk.Tqp, kBlockK,
                kBlockQ, HDp, false);
      gemm<kAmx>(t.dp, kBlockQ, pk.vr + ko + g.j0 * HDp, HDp, pk.dot + qo + i0, pk.Tqp, kBlockK,
                kBlockQ, HDp, false);
      probabilities_and_dscores_t(t, g, col, lse2, Dv, cs, s.scale);
      rows_to_pairs(t.pairs, t.dp);  // dS^T as pairs over keys
      gemm<kAmx>(dqt, kBlockQ, pk.kt + ko + g.j0, pk.Tkp, t.pairs, kBlockQ, HDp, kBlockQ, kBlockK,
                true);  // dQ^T += K^T dS^T
    }
    add_dq_tile(dq, dqt, s, b, h, i0, nq);
  }
}

template <bool kAmx>
void backward_dq(float* dq, const float* lse, const float* D, const Packed& pk,
                     const AttentionShape& s, AmxScratch& scratch) {
#pragma omp parallel
  backward_dq_thread<kAmx>(dq, lse, D, pk, s, scratch);
}

// Key blocks per group in the fused backward, as flash_attention.cpp's kGroupK: the query side's
// packed operands and dQ^T tile of a (head, query block) are used by every key block of a group
// in turn while they are in cache.
constexpr int64_t kGroupKB = 8;

// The backward in one pass, one task per (b, kv head): key blocks in groups of kGroupKB and, for
// each group, the heads and visible query blocks in order. dK and dV of a key block accumulate
// over (head, query block) ascending, as in backward_dkdv; dQ^T of a query block over key blocks
// ascending, as in backward_dq, in a per-thread (group, nqb, HDp x 64) buffer; S^T and dP^T are
// the same products of the same operands. So the result is bit-identical to the two passes, with
// 5 products per tile instead of 7. Used when B * NKV gives every thread two tasks.
template <bool kAmx>
void backward_fused_thread(float* dq, float* dk, float* dv, const float* lse, const float* D,
                           const Packed& pk, const AttentionShape& s, AmxScratch& scratch,
                           ThreadScratch& members, ThreadScratch& dq_acc) {
  const int64_t HDp = pk.HDp, group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, nkb = (s.Tk + kBlockK - 1) / kBlockK;
  const int64_t tasks = s.B * s.NKV, tile = HDp * kBlockQ;
  const float cs = s.scale * kLog2e;
  const ColumnIndex col;
  TileState<kAmx> tile_state;
  const int thread = omp_get_thread_num();
  AmxTiles t = scratch.tiles(thread);
  ThreadScratch::Cursor mc = members.block(thread);
  const int64_t member_cap = min64(kGroupKB, nkb);
  float* dKm[kGroupKB];
  float* dVm[kGroupKB];
  for (int64_t m = 0; m < member_cap; ++m) {
    dKm[m] = mc.take(kBlockK * HDp);
    dVm[m] = mc.take(kBlockK * HDp);
  }
  float* dQ = dq_acc.block(thread).p;  // dQ^T tiles (group, nqb, HDp, 64)
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t kvh = task % s.NKV, b = task / s.NKV, ko = pk.kv(b, kvh, s.NKV);
    std::memset(dQ, 0, size_t(group * nqb * tile) * 4);
    for (int64_t kg = 0; kg < nkb; kg += kGroupKB) {
      const int64_t n_m = min64(kGroupKB, nkb - kg);
      int64_t qfirst[kGroupKB], qmin = nqb;
      for (int64_t m = 0; m < n_m; ++m) {
        std::memset(dKm[m], 0, size_t(kBlockK * HDp) * 4);
        std::memset(dVm[m], 0, size_t(kBlockK * HDp) * 4);
        qfirst[m] = first_visible_query_block(s, (kg + m) * kBlockK);
        qmin = min64(qmin, qfirst[m]);
      }
      for (int64_t hg = 0; hg < group; ++hg) {
        const int64_t h = kvh * group + hg, qo = pk.qh(b, h, s.NH);
        for (int64_t qb = qmin; qb < nqb; ++qb) {
          Vec lse2[4], Dv[4];
          bool stats = false;
          for (int64_t m = 0; m < n_m; ++m) {
            if (qb < qfirst[m]) continue;
            const int64_t j0 = (kg + m) * kBlockK;
            const TileGeometry g = tile_geometry(s, qb * kBlockQ, j0);
            if (!stats) {
              query_stats(lse2, Dv, lse, D, s, b, h, g.i0, g.nq);
              stats = true;
            }
            gemm<kAmx>(t.s, kBlockQ, pk.kr + ko + j0 * HDp, HDp, pk.qt + qo + g.i0, pk.Tqp,
                       kBlockK, kBlockQ, HDp, false);  // S^T
            gemm<kAmx>(t.dp, kBlockQ, pk.vr + ko + j0 * HDp, HDp, pk.dot + qo + g.i0, pk.Tqp,
                       kBlockK, kBlockQ, HDp, false);  // dP^T
            probabilities_and_dscores_t(t, g, col, lse2, Dv, cs, s.scale);
            rows_to_bf16(t.pb, t.s);
            rows_to_bf16(t.dsb, t.dp);
            const int64_t ro = qo + (g.i0 / 2) * HDp;
            gemm<kAmx>(dVm[m], HDp, t.pb, kBlockQ, pk.dor + ro, HDp, kBlockK, HDp, kBlockQ,
                       true);  // dV += P^T dO
            gemm<kAmx>(dKm[m], HDp, t.dsb, kBlockQ, pk.qr + ro, HDp, kBlockK, HDp, kBlockQ,
                       true);  // dK += dS^T Q
            rows_to_pairs(t.pairs, t.dp);  // dS^T as pairs over keys
            gemm<kAmx>(dQ + (hg * nqb + qb) * tile, kBlockQ, pk.kt + ko + j0, pk.Tkp, t.pairs,
                       kBlockQ, HDp, kBlockQ, kBlockK, true);  // dQ^T += K^T dS^T
          }
        }
      }
      for (int64_t m = 0; m < n_m; ++m) {
        const int64_t j0 = (kg + m) * kBlockK;
        add_kv_tiles(dk, dv, dKm[m], dVm[m], s, b, kvh, j0, min64(kBlockK, s.Tk - j0), HDp);
      }
    }
    for (int64_t hg = 0; hg < group; ++hg) {
      const int64_t h = kvh * group + hg;
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * kBlockQ;
        add_dq_tile(dq, dQ + (hg * nqb + qb) * tile, s, b, h, i0, min64(kBlockQ, s.Tq - i0));
      }
    }
  }
}

template <bool kAmx>
void backward_fused(float* dq, float* dk, float* dv, const float* lse, const float* D,
                    const Packed& pk, const AttentionShape& s, AmxScratch& scratch,
                    ThreadScratch& members, ThreadScratch& dq_acc) {
#pragma omp parallel
  backward_fused_thread<kAmx>(dq, dk, dv, lse, D, pk, s, scratch, members, dq_acc);
}

}  // namespace

LOOM_AMX_END
#endif  // LOOM_AMX_KERNELS

// ---------------------------------------------------------------------------------------------
// Entry points (base target): checks, packing, dispatch.

namespace {

// The backend a call runs on (throws, naming what is missing, when it cannot run).
bool use_amx(Bf16Backend want, const char* fn) {
  const bool amx = amx_bf16_usable(), avx = kernels::avx512_bf16_usable();
  switch (want) {
    case Bf16Backend::amx:
      LOOM_CHECK(amx,
                 "{}: backend amx asked for, but this CPU or OS cannot run AMX-BF16 tiles (CPUID "
                 "AMX-TILE/AMX-BF16, XCR0 tile state and Linux's arch_prctl permission are all "
                 "needed, and LOOM_AMX must not be 0); use Bf16Backend::best",
                 fn);
      return true;
    case Bf16Backend::avx512:
      LOOM_CHECK(avx,
                 "{}: backend avx512 asked for, but this CPU or OS has no AVX512-BF16 (CPUID "
                 "AVX-512 F/BW/VL/DQ/BF16 and XCR0's AVX-512 state are needed, and "
                 "LOOM_AVX512_BF16 must not be 0); use Bf16Backend::best",
                 fn);
      return false;
    case Bf16Backend::best:
      break;
  }
  LOOM_CHECK(amx || avx,
             "{}: this CPU or OS has neither AMX-BF16 tiles nor AVX512-BF16 instructions (or "
             "LOOM_AMX / LOOM_AVX512_BF16 turned them off); use flash_attention_forward_bf16 "
             "(bf16 widened to f32), which runs everywhere",
             fn);
  return amx;
}

// The packed operands of one call, carved from one workspace (flash_attention.h,
// flash_attention_native_workspace_bytes): forward K rows and V^T; backward K rows, V rows, K^T and
// Q^T, dO^T, Q, dO as pairs. Each array starts on a 64-byte boundary.
struct PackSizes {
  int64_t HDp, Tkp, Tqp, kv_elems, q_words;  // uint16 per kv array, uint32 per q array
  explicit PackSizes(const AttentionShape& s)
      : HDp(round_up(s.HD, kPairK)),
        Tkp(round_up(s.Tk, kBlockK)),
        Tqp(round_up(s.Tq, kBlockQ)),
        kv_elems(s.B * s.NKV * Tkp * HDp),
        q_words(s.B * s.NH * Tqp * HDp / 2) {}
  static int64_t aligned(int64_t bytes) { return round_up(bytes, 64); }
  int64_t bytes(bool backward) const {
    return backward ? 3 * aligned(kv_elems * 2) + 4 * aligned(q_words * 4)
                    : 2 * aligned(kv_elems * 2);
  }
};

// Bump allocation from the workspace (64-byte aligned pieces).
struct Carve {
  std::byte* at;
  template <typename T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(at);
    at += PackSizes::aligned(n * int64_t(sizeof(T)));
    return p;
  }
};

// The caller's workspace, or (null) one of the call's own, 64-byte aligned.
struct Workspace {
  std::vector<std::byte> own;
  std::byte* base;
  Workspace(void* given, int64_t bytes) {
    if (given) {
      LOOM_CHECK(reinterpret_cast<uintptr_t>(given) % 64 == 0,
                 "flash attention (native bf16): the workspace must be 64-byte aligned");
      base = static_cast<std::byte*>(given);
    } else {
      own.resize(size_t(bytes + 64));
      base = reinterpret_cast<std::byte*>(
          (reinterpret_cast<uintptr_t>(own.data()) + 63) & ~uintptr_t(63));
    }
  }
};

// Packs the kv side: rows of K (and V, for dP^T) and the transposes asked for (null: not).
void pack_kv(uint16_t* kr, uint16_t* vr, uint16_t* kt, uint16_t* vt, const bf16* k, const bf16* v,
             const AttentionShape& s, int64_t HDp, int64_t Tkp) {
  const int64_t per = Tkp * HDp, n = s.B * s.NKV;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / s.NKV, kvh = i % s.NKV;
    const bf16* ks = k + b * s.Tk * s.k_stride + kvh * s.HD;
    const bf16* vs = v + b * s.Tk * s.v_stride + kvh * s.HD;
    pack_rows(kr + i * per, Tkp, HDp, ks, s.k_stride, s.Tk, s.HD);
    if (vr) pack_rows(vr + i * per, Tkp, HDp, vs, s.v_stride, s.Tk, s.HD);
    if (kt) pack_transposed(kt + i * per, HDp, Tkp, ks, s.k_stride, s.Tk, s.HD);
    if (vt) pack_transposed(vt + i * per, HDp, Tkp, vs, s.v_stride, s.Tk, s.HD);
  }
}

}  // namespace

bool native_bf16_attention_usable(Bf16Backend backend) {
  switch (backend) {
    case Bf16Backend::amx: return amx_bf16_usable();
    case Bf16Backend::avx512: return kernels::avx512_bf16_usable();
    case Bf16Backend::best: break;
  }
  return amx_bf16_usable() || kernels::avx512_bf16_usable();
}

const char* native_bf16_attention_backend() {
  return amx_bf16_usable() ? "amx" : kernels::avx512_bf16_usable() ? "avx512_bf16" : "none";
}

int64_t flash_attention_native_workspace_bytes(bool backward, const AttentionShape& s) {
  check_shape(s, "flash_attention_native_workspace_bytes");
  if (s.B * s.Tq == 0 || s.Tk == 0) return 0;
  return PackSizes(s).bytes(backward);
}

void flash_attention_forward_bf16_native(float* out, float* lse, const bf16* q, const bf16* k,
                                         const bf16* v, const AttentionShape& s, void* workspace,
                                         Bf16Backend backend) {
  const char* fn = "flash_attention_forward_bf16_native";
  check_shape(s, fn);
  if (s.B * s.Tq == 0) return;
  check_pointers(out && lse && q && (s.Tk == 0 || (k && v)), fn, s);
  const bool amx = use_amx(backend, fn);
  if (s.Tk == 0) {  // no key: every query row sees nothing
    for (int64_t row = 0; row < s.B * s.Tq; ++row)
      for (int64_t h = 0; h < s.NH; ++h)
        std::fill(out + row * s.o_stride + h * s.HD, out + row * s.o_stride + (h + 1) * s.HD, 0.0f);
    std::fill(lse, lse + s.B * s.NH * s.Tq, kNegInf);
    return;
  }
  const PackSizes z(s);
  Workspace ws(workspace, z.bytes(false));
  Carve cut{ws.base};
  uint16_t* kr = cut.take<uint16_t>(z.kv_elems);
  uint16_t* vt = cut.take<uint16_t>(z.kv_elems);
  pack_kv(kr, nullptr, nullptr, vt, k, v, s, z.HDp, z.Tkp);
  Packed pk{kr, nullptr, nullptr, vt, nullptr, nullptr, nullptr, nullptr, z.HDp, z.Tqp, z.Tkp};
  AmxScratch scratch(omp_get_max_threads(), z.HDp);
#if LOOM_AMX_KERNELS  // else use_amx threw
  if (amx)
    forward<true>(out, lse, q, pk, s, scratch);
  else
    forward<false>(out, lse, q, pk, s, scratch);
#else
  (void)amx;
  (void)pk;
  (void)scratch;
#endif
}

void flash_attention_backward_bf16_native(float* dq, float* dk, float* dv, const bf16* dout,
                                          const bf16* q, const bf16* k, const bf16* v,
                                          const float* lse, const float* D,
                                          const AttentionShape& s, void* workspace,
                                          Bf16Backend backend, bool fused) {
  const char* fn = "flash_attention_backward_bf16_native";
  check_shape(s, fn);
  if (s.B * s.Tq == 0 || s.Tk == 0) return;
  check_pointers(dq && dk && dv && dout && q && k && v && lse && D, fn, s);
  const bool amx = use_amx(backend, fn);
  const PackSizes z(s);
  Workspace ws(workspace, z.bytes(true));
  Carve cut{ws.base};
  uint16_t* kr = cut.take<uint16_t>(z.kv_elems);
  uint16_t* vr = cut.take<uint16_t>(z.kv_elems);
  uint16_t* kt = cut.take<uint16_t>(z.kv_elems);
  uint32_t* qt = cut.take<uint32_t>(z.q_words);
  uint32_t* dot = cut.take<uint32_t>(z.q_words);
  uint32_t* qr = cut.take<uint32_t>(z.q_words);
  uint32_t* dor = cut.take<uint32_t>(z.q_words);
  pack_kv(kr, vr, kt, nullptr, k, v, s, z.HDp, z.Tkp);
  const int64_t per = z.Tqp * z.HDp / 2, n = s.B * s.NH, HDp = z.HDp, Tqp = z.Tqp;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / s.NH, h = i % s.NH;
    const bf16* qs = q + b * s.Tq * s.q_stride + h * s.HD;
    const bf16* gs = dout + b * s.Tq * s.o_stride + h * s.HD;
    pack_pairs_over_d(qt + i * per, HDp, Tqp, qs, s.q_stride, s.Tq, s.HD);
    pack_pairs_over_d(dot + i * per, HDp, Tqp, gs, s.o_stride, s.Tq, s.HD);
    pack_pairs_over_rows(qr + i * per, Tqp, HDp, qs, s.q_stride, s.Tq, s.HD);
    pack_pairs_over_rows(dor + i * per, Tqp, HDp, gs, s.o_stride, s.Tq, s.HD);
  }
  Packed pk{kr, vr, kt, nullptr, qt, dot, qr, dor, HDp, Tqp, z.Tkp};
  AmxScratch scratch(omp_get_max_threads(), HDp);
#if LOOM_AMX_KERNELS  // else use_amx threw
  const int threads = omp_get_max_threads();
  if (fused && s.B * s.NKV >= 2 * int64_t(threads)) {
    // Per thread: dK and dV of a group's key blocks, and dQ^T of every query block of a task.
    const int64_t nkb = (s.Tk + kBlockK - 1) / kBlockK, nqb = (s.Tq + kBlockQ - 1) / kBlockQ;
    ThreadScratch members(threads, std::min(kGroupKB, nkb) * 2 * kBlockK * HDp);
    ThreadScratch dq_acc(threads, (s.NH / s.NKV) * nqb * HDp * kBlockQ);
    if (amx)
      backward_fused<true>(dq, dk, dv, lse, D, pk, s, scratch, members, dq_acc);
    else
      backward_fused<false>(dq, dk, dv, lse, D, pk, s, scratch, members, dq_acc);
  } else if (amx) {
    backward_dkdv<true>(dk, dv, lse, D, pk, s, scratch);
    backward_dq<true>(dq, lse, D, pk, s, scratch);
  } else {
    backward_dkdv<false>(dk, dv, lse, D, pk, s, scratch);
    backward_dq<false>(dq, lse, D, pk, s, scratch);
  }
#else
  (void)amx;
  (void)fused;
  (void)pk;
  (void)scratch;
#endif
}

}  // namespace loom::attention
