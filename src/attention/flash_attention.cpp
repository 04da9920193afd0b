// attention/flash_attention.cpp: tiled exact attention with online softmax (FlashAttention-2
// style) for CPUs, forward and backward.
//
// Glossary: B batch, Tq/Tk query/key length, NH query heads, NKV kv heads, group = NH/NKV query
// heads per kv head, HD head dim, HDp = HD rounded up to the vector width, BQ/BK query/key tile
// rows (kBlockQ, kBlockK), i query row, j key row, S scores, P probabilities, dP = dO V^T,
// dS = P * (dP - D), lse log-sum-exp (natural log outside, base 2 inside the tiles).
//
// How it is organised:
// - Every tile product is one small GEMM, C (M x N) += A (M x K) B (K x N), done by a register
//   blocked micro-kernel of 4 rows x up to 64 columns written with GCC vector extensions (so the
//   compiler emits AVX-512 under -march=native and narrower code elsewhere). Tiles are copied
//   into padded, vector-aligned buffers first; that copy also widens bf16 to f32, so the bf16
//   forward shares every arithmetic step with the f32 one. oneDNN is not used for the tiles:
//   measured single-threaded at 64 x 64 x 64 this kernel ran at ~55 GFLOP/s and dnnl_sgemm at
//   25-57 GFLOP/s (67 at 1024^3), and this one also reads A transposed for free (P^T, dS^T).
// - Scores are kept in base 2 (S * scale * log2 e) so the exponential is exp2, which a short
//   polynomial plus an exponent-bit shift computes in vector registers.
// - Forward: one task per (b, head, query block) walks the visible key blocks in order (online
//   softmax). It computes the transposed scores S^T = K Q^T: Q^T is transposed once per task,
//   K and V tiles are plain row copies, and the per-query max/sum live in 4 vectors of 16
//   queries. (Computing S = Q K^T instead needs a transposed K tile per (query block, key
//   block) pair; that scalar transpose cost ~25% of the tile's FLOP time.)
// - Backward: two passes, so that every output element has exactly one writer (deterministic,
//   no atomics). Pass 1, one task per (b, kv head, key block): K^T and V^T are transposed once,
//   and the dK and dV tiles accumulate over the group's query heads and all query blocks in
//   order. Pass 2, one task per (b, head, query block): dQ accumulates over key blocks in order,
//   with the transposed formulation of the forward. Pass 2 recomputes S and dP (7 tile products
//   instead of 5, ~40% more backward FLOPs than a single pass with atomic dQ), the price of
//   determinism at any thread count. Each element of S (and dP) is the same FMA chain over
//   d = 0..HD-1 in both passes, so P and dS are bit-identical between them.
// - Causal: tiles entirely above the diagonal are skipped; partially visible tiles are masked by
//   comparing the global positions q_offset+i and k_offset+j.
#include "attention/flash_attention.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/flash_tiles.h"
#include "core/error.h"

// The vector helpers below live in an anonymous namespace and never cross an ABI boundary; GCC
// would otherwise warn that 64-byte vectors change the ABI when AVX-512 is not enabled.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace loom::attention {

namespace {

// An empty asm statement that takes a vector in a register and gives it back: the compiler can
// no longer see where the value came from, so it keeps it in the register instead of folding
// its load into each use. Only where a Vec is one AVX-512 register (elsewhere it is split over
// narrower ones, which the "v" constraint cannot name): there it does nothing.
#if defined(__AVX512F__)
#define LOOM_IN_REGISTER(x) asm("" : "+v"(x))
#else
#define LOOM_IN_REGISTER(x) ((void)0)
#endif

// C (4 x 16*NV) += A (4 x K) B (K x 16*NV). A(r, kk) is A[r*lda + kk], or A[kk*lda + r] when
// kTransA (used for P^T and dS^T, so those tiles are never transposed in memory).
// noinline: each instance is compiled once, on its own. Inlined into backward_fused, GCC spilled
// two of the B vectors to the stack and reloaded them every iteration (14% of that function's
// time at T = 4096).
template <bool kTransA, int NV, bool kZero>
__attribute__((noinline)) void gemm_4xn(float* C, int64_t ldc, const float* A, int64_t lda,
                                        const float* B, int64_t ldb, int64_t K) {
  // Fully unrolled over the 4 x NV accumulators, so that they live in registers from the loads
  // of C to the stores (rolled, GCC kept a copy of each on the stack: 48 extra moves per call,
  // against 64 iterations of 16 FMAs).
  Vec acc[4][NV];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = kZero ? splat(0.0f) : load(C + r * ldc + c * kLanes);
  for (int64_t kk = 0; kk < K; ++kk) {
    // B's vectors and each broadcast A element are loaded once into registers. The empty asm
    // statements make their values opaque, so GCC cannot fold the loads into the FMAs as
    // memory operands, which it otherwise does: then every FMA loads its B vector again (20
    // loads per 16 FMAs instead of 8), and a core that issues one 64-byte load per cycle (AMD
    // Zen 4) stalls on loads rather than FMAs. The arithmetic is unchanged.
    Vec b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      b[c] = load(B + kk * ldb + c * kLanes);
      LOOM_IN_REGISTER(b[c]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      Vec a = splat(kTransA ? A[kk * lda + r] : A[r * lda + kk]);
      LOOM_IN_REGISTER(a);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) store(C + r * ldc + c * kLanes, acc[r][c]);
}

// C (M x N) += A (M x K) B (K x N), or with kZero C = A B (the same sums: they start from 0
// either way, without a pass that zero-fills C first); M a multiple of 4, N a multiple of 16.
// Every element of C is a sum over kk = 0..K-1 in order, so the result does not depend on how
// tiles are scheduled.
template <bool kTransA, bool kZero = false>
void gemm_acc(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
              int64_t M, int64_t N, int64_t K) {
  for (int64_t i = 0; i < M; i += 4) {
    const float* Ai = kTransA ? A + i : A + i * lda;
    float* Ci = C + i * ldc;
    int64_t n = 0;
    for (; n + 4 * kLanes <= N; n += 4 * kLanes)
      gemm_4xn<kTransA, 4, kZero>(Ci + n, ldc, Ai, lda, B + n, ldb, K);
    switch ((N - n) / kLanes) {
      case 3: gemm_4xn<kTransA, 3, kZero>(Ci + n, ldc, Ai, lda, B + n, ldb, K); break;
      case 2: gemm_4xn<kTransA, 2, kZero>(Ci + n, ldc, Ai, lda, B + n, ldb, K); break;
      case 1: gemm_4xn<kTransA, 1, kZero>(Ci + n, ldc, Ai, lda, B + n, ldb, K); break;
      default: break;
    }
  }
}

inline float widen(float x) { return x; }
inline float widen(bf16 x) { return bf16_to_f32(x); }

// Copies rows [0, n) of a strided (rows, HD) slice into a (rows_total, HDp) tile, zero-filling
// the padding columns and rows [n, rows_total).
template <typename T>
void load_rows(float* dst, int64_t HDp, int64_t rows_total, const T* src, int64_t stride,
               int64_t n, int64_t HD) {
  for (int64_t r = 0; r < rows_total; ++r) {
    float* d = dst + r * HDp;
    if (r < n) {
      const T* s = src + r * stride;
      for (int64_t c = 0; c < HD; ++c) d[c] = widen(s[c]);
      for (int64_t c = HD; c < HDp; ++c) d[c] = 0.0f;
    } else {
      for (int64_t c = 0; c < HDp; ++c) d[c] = 0.0f;
    }
  }
}

// Copies rows [0, n) of a strided (rows, HD) slice transposed into an (HD, width) tile, zero
// in columns [n, width).
template <typename T>
void load_transposed(float* dst, int64_t width, const T* src, int64_t stride, int64_t n,
                     int64_t HD) {
  for (int64_t d = 0; d < HD; ++d)
    for (int64_t c = n; c < width; ++c) dst[d * width + c] = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const T* s = src + c * stride;
    for (int64_t d = 0; d < HD; ++d) dst[d * width + c] = widen(s[d]);
  }
}

// Per-thread scratch, carved from one block allocated before the parallel region (so that an
// allocation failure throws in the calling thread, not inside OpenMP).
struct Tiles {
  float *q, *dout, *kt, *vt, *kv, *s, *dp, *acc0, *acc1, *row0, *row1;
};
int64_t tiles_floats(int64_t HDp) {
  return 4 * kBlockQ * HDp + 3 * kBlockK * HDp + 2 * kBlockQ * kBlockK + 2 * kBlockQ;
}
class Scratch {
 public:
  Scratch(int threads, int64_t HDp) : HDp_(HDp), mem_(threads, tiles_floats(HDp)) {}
  Tiles tiles(int thread) {
    // 64-byte aligned, so tile rows (multiples of 16 floats) never straddle cache lines.
    ThreadScratch::Cursor c = mem_.block(thread);
    Tiles t;
    // Uses in the row-score formulation (dK/dV pass) / the transposed one (forward, dQ pass).
    t.q = c.take(kBlockQ * HDp_);     // Q (BQ, HDp)  / Q^T (HD, BQ)
    t.dout = c.take(kBlockQ * HDp_);  // dO (BQ, HDp) / dO^T (HD, BQ)
    t.kt = c.take(HDp_ * kBlockK);    // K^T (HD, BK) / V (BK, HDp)
    t.vt = c.take(HDp_ * kBlockK);    // V^T (HD, BK)
    t.kv = c.take(kBlockK * HDp_);    // K (BK, HDp)
    t.s = c.take(kBlockQ * kBlockK);  // S then P (BQ, BK) / S^T then P^T (BK, BQ)
    t.dp = c.take(kBlockQ * kBlockK); // dP then dS (BQ, BK) / their transposes (BK, BQ)
    t.acc0 = c.take(kBlockQ * HDp_);  // dK (BK, HDp) / O or dQ (BQ, HDp)
    t.acc1 = c.take(kBlockQ * HDp_);  // dV (BK, HDp)
    t.row0 = c.take(kBlockQ);         // lse in base 2 (BQ)
    t.row1 = c.take(kBlockQ);         // D (BQ)
    return t;
  }

 private:
  int64_t HDp_;
  ThreadScratch mem_;
};

// Query blocks per forward task. The blocks of a task share every K and V tile they load: at
// long sequences a head's K and V (T x HD f32 each: 4 MiB at T = 16K) no longer fit a core's L2,
// and loading them once per query block made the forward read them from L3 64 times over.
// Each block's arithmetic is unchanged (same tiles, same order), so results are bit-identical
// to one block per task.
constexpr int64_t kGroupQ = 8;
// Key blocks per group in the fused backward (backward_fused), for the same reason: they share
// each query block's Q, dO, lse and D.
constexpr int64_t kGroupK = 8;

// Transposed-score formulation, used where one query block meets many key blocks (forward and
// the dQ pass): S^T (BK, BQ) = K (BK, HD) Q^T (HD, BQ). Q^T is transposed once per task; K and V
// tiles are plain row copies; the softmax statistics of the 64 queries sit in 4 vectors.
template <typename T>
void forward_impl(float* out, float* lse, const T* q, const T* k, const T* v,
                  const AttentionShape& s) {
  static_assert(kBlockQ == 4 * kLanes);
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes), group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, nqg = (nqb + kGroupQ - 1) / kGroupQ;
  const int64_t tasks = s.B * s.NH * nqg;
  if (tasks == 0) return;
  const float cs = s.scale * kLog2e;  // scores in base 2
  Scratch scratch(omp_get_max_threads(), HDp);
  // Per thread and member of a task: Q^T (HD, BQ) and the unnormalised O (BQ, HDp); no more
  // members than there are query blocks (short calls, such as a cp ring step's, need few).
  const int64_t member_cap = std::min(kGroupQ, nqb);
  ThreadScratch members(omp_get_max_threads(), member_cap * 2 * kBlockQ * HDp);
  const ColumnIndex col;

#pragma omp parallel
  {
    Tiles t = scratch.tiles(omp_get_thread_num());
    ThreadScratch::Cursor mc = members.block(omp_get_thread_num());
    float* qts[kGroupQ];
    float* os[kGroupQ];
    for (int64_t j = 0; j < member_cap; ++j) {
      qts[j] = mc.take(kBlockQ * HDp);
      os[j] = mc.take(kBlockQ * HDp);
    }
    // Causal work grows with the query block, so hand out the late (heavy) groups first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t gq = nqg - 1 - task % nqg, h = (task / nqg) % s.NH, b = task / (nqg * s.NH);
      const int64_t kvh = h / group, qb0 = gq * kGroupQ;
      const int64_t members_n = std::min(kGroupQ, nqb - qb0);
      float* kc = t.kv;   // K (mk, HDp)
      float* vc = t.kt;   // V (nk, HDp)
      float* st = t.s;    // S^T, then P^T (BK, BQ)
      int64_t i0[kGroupQ], nq[kGroupQ], mq[kGroupQ], nkb[kGroupQ], nkb_max = 0;
      OnlineSoftmax sm[kGroupQ];
      for (int64_t j = 0; j < members_n; ++j) {
        i0[j] = (qb0 + j) * kBlockQ;
        nq[j] = std::min(kBlockQ, s.Tq - i0[j]);
        mq[j] = round_up(nq[j], 4);
        load_transposed(qts[j], kBlockQ, q + (b * s.Tq + i0[j]) * s.q_stride + h * HD, s.q_stride,
                        nq[j], HD);  // Q^T (HD, BQ)
        std::fill(os[j], os[j] + mq[j] * HDp, 0.0f);
        nkb[j] = visible_key_blocks(s, i0[j], nq[j]);
        nkb_max = std::max(nkb_max, nkb[j]);
      }

      for (int64_t kb = 0; kb < nkb_max; ++kb) {
        const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, s.Tk - j0), mk = round_up(nk, 4);
        load_rows(kc, HDp, mk, k + (b * s.Tk + j0) * s.k_stride + kvh * HD, s.k_stride, nk, HD);
        load_rows(vc, HDp, nk, v + (b * s.Tk + j0) * s.v_stride + kvh * HD, s.v_stride, nk, HD);
        for (int64_t j = 0; j < members_n; ++j) {
          if (kb >= nkb[j]) continue;  // causal: this block sees no key of kb
          const TileGeometry g = tile_geometry(s, i0[j], j0);
          float* o = os[j];
          gemm_acc<false, true>(st, kBlockQ, kc, HDp, qts[j], kBlockQ, mk, kBlockQ, HD);  // S^T (mk, BQ)

          Vec alpha_v[4];
          sm[j].step(st, g, col, cs, g.nk, alpha_v);
          float alpha[kBlockQ];
          for (int c = 0; c < 4; ++c) store(alpha + c * kLanes, alpha_v[c]);
          for (int64_t r = 0; r < nq[j]; ++r) {
            if (alpha[r] == 1.0f) continue;
            float* orow = o + r * HDp;
            for (int64_t d = 0; d < HDp; d += kLanes) store(orow + d, load(orow + d) * alpha[r]);
          }
          gemm_acc<true>(o, HDp, st, kBlockQ, vc, HDp, mq[j], HDp, g.nk);  // O += P V
        }
      }

      for (int64_t j = 0; j < members_n; ++j)
        sm[j].finish(out, lse, s, b, h, i0[j], nq[j], os[j], HDp, 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Per-task inputs of one query block: Q and dO tiles, lse in base 2 and D.
void load_query_block(Tiles& t, const AttentionShape& s, const float* q, const float* dout,
                      const float* lse, const float* D, int64_t b, int64_t h, int64_t i0,
                      int64_t nq, int64_t mq) {
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes);
  load_rows(t.q, HDp, mq, q + (b * s.Tq + i0) * s.q_stride + h * HD, s.q_stride, nq, HD);
  load_rows(t.dout, HDp, mq, dout + (b * s.Tq + i0) * s.o_stride + h * HD, s.o_stride, nq, HD);
  const float* lse_row = lse + (b * s.NH + h) * s.Tq + i0;
  const float* D_row = D + (b * s.NH + h) * s.Tq + i0;
  for (int64_t r = 0; r < nq; ++r) {
    t.row0[r] = lse_row[r] * kLog2e;
    t.row1[r] = D_row[r];
  }
}

// From t.q, t.dout, t.kt, t.vt: t.s = P and t.dp = dS * scale for one tile (rows >= nq and
// masked entries are 0). Both passes call this with the same inputs, so dS is bit-identical.
void probabilities_and_dscores(Tiles& t, const TileGeometry& g, const AttentionShape& s,
                               const ColumnIndex& col, int64_t mq) {
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes);
  const float cs = s.scale * kLog2e;
  gemm_acc<false, true>(t.s, kBlockK, t.q, HDp, t.kt, kBlockK, mq, kBlockK, HD);      // S (mq, BK)
  gemm_acc<false, true>(t.dp, kBlockK, t.dout, HDp, t.vt, kBlockK, mq, kBlockK, HD);  // dP (mq, BK)
  for (int64_t r = 0; r < mq; ++r) {
    float* srow = t.s + r * kBlockK;
    float* dprow = t.dp + r * kBlockK;
    const int64_t last = r < g.nq ? g.last_column(r) : -1;
    // lse = -inf: the row sees no key in the full attention, so it has no gradient.
    if (last < 0 || t.row0[r] == kNegInf) {
      std::fill(srow, srow + kBlockK, 0.0f);
      std::fill(dprow, dprow + kBlockK, 0.0f);
      continue;
    }
    const Vec lim = splat(float(last));
    const float lse2 = t.row0[r], Dr = t.row1[r];
    const bool all_visible = g.all_visible();
    for (int c = 0; c < 4; ++c) {
      Vec p = exp2v(fmav(load(srow + c * kLanes), splat(cs), splat(-lse2)));
      if (!all_visible) p = col.v[c] <= lim ? p : splat(0.0f);
      store(srow + c * kLanes, p);
      store(dprow + c * kLanes, p * (load(dprow + c * kLanes) - Dr) * s.scale);
    }
  }
}

void backward_dkdv(float* dk, float* dv, const float* dout, const float* q, const float* k,
                   const float* v, const float* lse, const float* D, const AttentionShape& s) {
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes), group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, nkb = (s.Tk + kBlockK - 1) / kBlockK;
  const int64_t tasks = s.B * s.NKV * nkb;
  if (tasks == 0 || nqb == 0) return;
  Scratch scratch(omp_get_max_threads(), HDp);
  const ColumnIndex col;

#pragma omp parallel
  {
    Tiles t = scratch.tiles(omp_get_thread_num());
    // Causal: early key blocks are seen by more queries, so they go first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t kb = task % nkb, kvh = (task / nkb) % s.NKV, b = task / (nkb * s.NKV);
      const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, s.Tk - j0), mk = round_up(nk, 4);
      load_transposed(t.kt, kBlockK, k + (b * s.Tk + j0) * s.k_stride + kvh * HD, s.k_stride, nk,
                      HD);
      load_transposed(t.vt, kBlockK, v + (b * s.Tk + j0) * s.v_stride + kvh * HD, s.v_stride, nk,
                      HD);
      float* dK = t.acc0;  // (mk, HDp)
      float* dV = t.acc1;  // (mk, HDp)
      std::fill(dK, dK + mk * HDp, 0.0f);
      std::fill(dV, dV + mk * HDp, 0.0f);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t qb = first_visible_query_block(s, j0); qb < nqb; ++qb) {
          const TileGeometry g = tile_geometry(s, qb * kBlockQ, j0);
          const int64_t mq = round_up(g.nq, 4);
          load_query_block(t, s, q, dout, lse, D, b, h, g.i0, g.nq, mq);
          probabilities_and_dscores(t, g, s, col, mq);
          gemm_acc<true>(dV, HDp, t.s, kBlockK, t.dout, HDp, mk, HDp, g.nq);  // dV += P^T dO
          gemm_acc<true>(dK, HDp, t.dp, kBlockK, t.q, HDp, mk, HDp, g.nq);    // dK += dS^T Q
        }
      for (int64_t c = 0; c < nk; ++c) {
        float* dk_dst = dk + (b * s.Tk + j0 + c) * s.k_stride + kvh * HD;
        float* dv_dst = dv + (b * s.Tk + j0 + c) * s.v_stride + kvh * HD;
        for (int64_t d = 0; d < HD; ++d) {
          dk_dst[d] += dK[c * HDp + d];
          dv_dst[d] += dV[c * HDp + d];
        }
      }
    }
  }
}

void backward_dq(float* dq, const float* dout, const float* q, const float* k, const float* v,
                 const float* lse, const float* D, const AttentionShape& s) {
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes), group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = s.B * s.NH * nqb;
  if (tasks == 0) return;
  const float cs = s.scale * kLog2e;
  Scratch scratch(omp_get_max_threads(), HDp);
  const ColumnIndex col;

#pragma omp parallel
  {
    Tiles t = scratch.tiles(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = nqb - 1 - task % nqb, h = (task / nqb) % s.NH, b = task / (nqb * s.NH);
      const int64_t kvh = h / group, i0 = qb * kBlockQ, nq = std::min(kBlockQ, s.Tq - i0);
      const int64_t mq = round_up(nq, 4);
      // Transposed-score formulation as in the forward: S^T = K Q^T, dP^T = V dO^T.
      float* qt = t.q;      // Q^T (HD, BQ)
      float* dot = t.dout;  // dO^T (HD, BQ)
      float* kc = t.kv;     // K (mk, HDp)
      float* vc = t.kt;     // V (mk, HDp)
      float* st = t.s;      // S^T, then P^T (BK, BQ)
      float* dpt = t.dp;    // dP^T, then scale * dS^T (BK, BQ)
      float* dQ = t.acc0;   // (mq, HDp)
      load_transposed(qt, kBlockQ, q + (b * s.Tq + i0) * s.q_stride + h * HD, s.q_stride, nq, HD);
      load_transposed(dot, kBlockQ, dout + (b * s.Tq + i0) * s.o_stride + h * HD, s.o_stride, nq,
                      HD);
      Vec lse2[4], Dv[4];  // per query: lse in base 2 (-inf: no gradient) and D
      query_stats(lse2, Dv, lse, D, s, b, h, i0, nq);
      const bool all_lse_finite = all_lanes_finite(lse2);
      std::fill(dQ, dQ + mq * HDp, 0.0f);
      const int64_t nkb = visible_key_blocks(s, i0, nq);
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const TileGeometry g = tile_geometry(s, i0, kb * kBlockK);
        const int64_t mk = round_up(g.nk, 4);
        load_rows(kc, HDp, mk, k + (b * s.Tk + g.j0) * s.k_stride + kvh * HD, s.k_stride, g.nk, HD);
        load_rows(vc, HDp, mk, v + (b * s.Tk + g.j0) * s.v_stride + kvh * HD, s.v_stride, g.nk, HD);
        gemm_acc<false, true>(st, kBlockQ, kc, HDp, qt, kBlockQ, mk, kBlockQ, HD);    // S^T (mk, BQ)
        gemm_acc<false, true>(dpt, kBlockQ, vc, HDp, dot, kBlockQ, mk, kBlockQ, HD);  // dP^T (mk, BQ)
        // The same arithmetic as probabilities_and_dscores, element for element (bit-identical
        // dS); tiles with every entry visible, for queries that all see some key, skip the mask.
        const bool unmasked = g.all_visible() && all_lse_finite;
        for (int64_t j = 0; j < g.nk; ++j) {
          float* srow = st + j * kBlockQ;
          float* drow = dpt + j * kBlockQ;
          if (unmasked) {
            for (int c = 0; c < 4; ++c) {
              const Vec p = exp2v(fmav(load(srow + c * kLanes), splat(cs), -lse2[c]));
              store(drow + c * kLanes, p * (load(drow + c * kLanes) - Dv[c]) * s.scale);
            }
            continue;
          }
          const QueryLaneMask vis(col, g, j);
          for (int c = 0; c < 4; ++c) {
            const IVec ok = vis.m[c] & (lse2[c] != splat(kNegInf));
            Vec p = exp2v(fmav(load(srow + c * kLanes), splat(cs), -lse2[c]));
            p = ok ? p : splat(0.0f);
            store(drow + c * kLanes, p * (load(drow + c * kLanes) - Dv[c]) * s.scale);
          }
        }
        gemm_acc<true>(dQ, HDp, dpt, kBlockQ, kc, HDp, mq, HDp, g.nk);  // dQ += dS K
      }
      for (int64_t r = 0; r < nq; ++r) {
        float* dst = dq + (b * s.Tq + i0 + r) * s.q_stride + h * HD;
        for (int64_t d = 0; d < HD; ++d) dst[d] += dQ[r * HDp + d];
      }
    }
  }
}

// Single pass, one task per (b, kv head): key blocks in order, and for each the group's query
// heads and visible query blocks in order. dK/dV tiles accumulate exactly as in backward_dkdv;
// dQ accumulates into a per-task (group, Tq, HDp) buffer, adding key blocks in increasing order
// as backward_dq does, and S/dP are the same FMA chains, so the result is bit-identical to the
// two-pass path with 5 tile products instead of 7. Used when B*NKV gives every thread work.
void backward_fused(float* dq, float* dk, float* dv, const float* dout, const float* q,
                    const float* k, const float* v, const float* lse, const float* D,
                    const AttentionShape& s) {
  const int64_t HD = s.HD, HDp = round_up(HD, kLanes), group = s.NH / s.NKV;
  const int64_t nqb = (s.Tq + kBlockQ - 1) / kBlockQ, nkb = (s.Tk + kBlockK - 1) / kBlockK;
  const int64_t tasks = s.B * s.NKV;
  const int threads = omp_get_max_threads();
  Scratch scratch(threads, HDp);
  // Per thread and key block of a group (kGroupK; no more than there are key blocks): K^T, V^T,
  // K, dK, dV tiles.
  const int64_t member_cap = std::min(kGroupK, nkb);
  ThreadScratch members(threads, member_cap * 5 * kBlockK * HDp);
  const int64_t dq_floats = group * nqb * kBlockQ * HDp;  // (group, nqb*BQ, HDp) per thread
  // 64-byte aligned like every tile (a std::vector's large block starts 16 bytes into a page,
  // and then every vector load and store of a dQ row straddles two cache lines).
  ThreadScratch dq_acc(threads, dq_floats);
  const ColumnIndex col;

#pragma omp parallel
  {
    const int thread = omp_get_thread_num();
    Tiles t = scratch.tiles(thread);
    ThreadScratch::Cursor mc = members.block(thread);
    float *kt[kGroupK], *vt[kGroupK], *kv[kGroupK], *dK[kGroupK], *dV[kGroupK];
    for (int64_t m = 0; m < member_cap; ++m) {
      kt[m] = mc.take(HDp * kBlockK);  // K^T (HD, BK)
      vt[m] = mc.take(HDp * kBlockK);  // V^T (HD, BK)
      kv[m] = mc.take(kBlockK * HDp);  // K (nk, HDp) for dQ += dS K
      dK[m] = mc.take(kBlockK * HDp);  // (mk, HDp)
      dV[m] = mc.take(kBlockK * HDp);  // (mk, HDp)
    }
    float* dQ = dq_acc.block(thread).p;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t kvh = task % s.NKV, b = task / s.NKV;
      std::fill(dQ, dQ + dq_floats, 0.0f);
      // Key blocks in groups of kGroupK: each query block's Q, dO, lse and D are loaded once for
      // the group (at long sequences they come from L3 otherwise, once per key block). Every
      // accumulation keeps its order: dK / dV of a key block over (head, query block) ascending,
      // dQ of a query block over key blocks ascending.
      for (int64_t kg = 0; kg < nkb; kg += kGroupK) {
        const int64_t n_m = std::min(kGroupK, nkb - kg);
        int64_t j0[kGroupK], nk[kGroupK], mk[kGroupK], qfirst[kGroupK], qmin = nqb;
        for (int64_t m = 0; m < n_m; ++m) {
          j0[m] = (kg + m) * kBlockK;
          nk[m] = std::min(kBlockK, s.Tk - j0[m]);
          mk[m] = round_up(nk[m], 4);
          const float* ksrc = k + (b * s.Tk + j0[m]) * s.k_stride + kvh * HD;
          load_transposed(kt[m], kBlockK, ksrc, s.k_stride, nk[m], HD);
          load_transposed(vt[m], kBlockK, v + (b * s.Tk + j0[m]) * s.v_stride + kvh * HD,
                          s.v_stride, nk[m], HD);
          load_rows(kv[m], HDp, nk[m], ksrc, s.k_stride, nk[m], HD);
          std::fill(dK[m], dK[m] + mk[m] * HDp, 0.0f);
          std::fill(dV[m], dV[m] + mk[m] * HDp, 0.0f);
          qfirst[m] = first_visible_query_block(s, j0[m]);
          qmin = std::min(qmin, qfirst[m]);
        }
        for (int64_t hg = 0; hg < group; ++hg)
          for (int64_t qb = qmin; qb < nqb; ++qb) {
            const int64_t h = kvh * group + hg;
            bool loaded = false;
            for (int64_t m = 0; m < n_m; ++m) {
              if (qb < qfirst[m]) continue;
              const TileGeometry g = tile_geometry(s, qb * kBlockQ, j0[m]);
              const int64_t mq = round_up(g.nq, 4);
              if (!loaded) {
                load_query_block(t, s, q, dout, lse, D, b, h, g.i0, g.nq, mq);
                loaded = true;
              }
              Tiles tm = t;  // this key block's K^T and V^T
              tm.kt = kt[m];
              tm.vt = vt[m];
              probabilities_and_dscores(tm, g, s, col, mq);
              gemm_acc<true>(dV[m], HDp, t.s, kBlockK, t.dout, HDp, mk[m], HDp, g.nq);  // dV += P^T dO
              gemm_acc<true>(dK[m], HDp, t.dp, kBlockK, t.q, HDp, mk[m], HDp, g.nq);    // dK += dS^T Q
              float* dQ_tile = dQ + (hg * nqb + qb) * kBlockQ * HDp;
              gemm_acc<false>(dQ_tile, HDp, t.dp, kBlockK, kv[m], HDp, mq, HDp, nk[m]);  // dQ += dS K
            }
          }
        for (int64_t m = 0; m < n_m; ++m)
          for (int64_t c = 0; c < nk[m]; ++c) {
            float* dk_dst = dk + (b * s.Tk + j0[m] + c) * s.k_stride + kvh * HD;
            float* dv_dst = dv + (b * s.Tk + j0[m] + c) * s.v_stride + kvh * HD;
            for (int64_t d = 0; d < HD; ++d) {
              dk_dst[d] += dK[m][c * HDp + d];
              dv_dst[d] += dV[m][c * HDp + d];
            }
          }
      }
      for (int64_t hg = 0; hg < group; ++hg)
        for (int64_t i = 0; i < s.Tq; ++i) {
          float* dst = dq + (b * s.Tq + i) * s.q_stride + (kvh * group + hg) * HD;
          const float* src = dQ + (hg * nqb * kBlockQ + i) * HDp;
          for (int64_t d = 0; d < HD; ++d) dst[d] += src[d];
        }
    }
  }
}

}  // namespace

void flash_attention_forward(float* out, float* lse, const float* q, const float* k,
                             const float* v, const AttentionShape& s) {
  check_shape(s, "flash_attention_forward");
  if (s.B * s.Tq == 0) return;
  check_pointers(out && lse && q && (s.Tk == 0 || (k && v)), "flash_attention_forward", s);
  forward_impl(out, lse, q, k, v, s);
}

void flash_attention_forward_bf16(float* out, float* lse, const bf16* q, const bf16* k,
                                  const bf16* v, const AttentionShape& s) {
  check_shape(s, "flash_attention_forward_bf16");
  if (s.B * s.Tq == 0) return;
  check_pointers(out && lse && q && (s.Tk == 0 || (k && v)), "flash_attention_forward_bf16", s);
  forward_impl(out, lse, q, k, v, s);
}

namespace {
template <typename T>
void backward_preprocess_impl(float* D, const T* dout, const float* out, const AttentionShape& s) {
  check_shape(s, "attention_backward_preprocess");
  if (s.B * s.Tq == 0) return;
  check_pointers(D && dout && out, "attention_backward_preprocess", s);
  const int64_t rows = s.B * s.Tq;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / s.Tq, i = row % s.Tq;
    for (int64_t h = 0; h < s.NH; ++h) {
      const float* o = out + row * s.o_stride + h * s.HD;
      const T* g = dout + row * s.o_stride + h * s.HD;
      float acc = 0.0f;
      for (int64_t d = 0; d < s.HD; ++d) acc += widen(g[d]) * o[d];
      D[(b * s.NH + h) * s.Tq + i] = acc;
    }
  }
}
}  // namespace

void attention_backward_preprocess(float* D, const float* dout, const float* out,
                                   const AttentionShape& s) {
  backward_preprocess_impl(D, dout, out, s);
}

void attention_backward_preprocess(float* D, const bf16* dout, const float* out,
                                   const AttentionShape& s) {
  backward_preprocess_impl(D, dout, out, s);
}

void flash_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                              const float* q, const float* k, const float* v, const float* lse,
                              const float* D, const AttentionShape& s) {
  check_shape(s, "flash_attention_backward");
  if (s.B * s.Tq == 0 || s.Tk == 0) return;  // no query or no key: every gradient is 0
  check_pointers(dq && dk && dv && dout && q && k && v && lse && D, "flash_attention_backward",
                 s);
  // Both paths give bit-identical results; the choice only affects speed and memory.
  if (s.B * s.NKV >= 2 * int64_t(omp_get_max_threads())) {
    backward_fused(dq, dk, dv, dout, q, k, v, lse, D, s);
  } else {
    backward_dkdv(dk, dv, dout, q, k, v, lse, D, s);
    backward_dq(dq, dout, q, k, v, lse, D, s);
  }
}

}  // namespace loom::attention
