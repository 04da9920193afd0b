// kernels/cpu/weight_matmul_amx.cpp: weight_matmul for bf16 weights stored in AMX tile order
// (WeightLayout::amx_tiles, weight_matmul.h), on Intel AMX tiles.
//
// Glossary as in weight_matmul.h: x (M, K) f32, W (N, K) bf16, y (M, N). A "pair" is two bf16
// in one 32-bit word, the form of a tile product's second operand. KC = K / 32 chunks of k.
//
// The tile product TDPBF16PS C += A B (C R x 16 f32, A R rows of 32 bf16, B 16 rows of 16 pairs)
// multiplies bf16 exactly and accumulates in f32. Here A is x (R = 16 rows of it, or all M < 16
// rows), B is W^T as pairs over k, C holds R rows m x 16 outputs n: y = x W^T directly, each C
// row a piece of a row of y.
//
// W's layout (pack_amx_tiles): rows padded with zeros to a multiple of 32; 32-row block b, chunk
// c holds two B tiles t = 0, 1 (rows 32b + 16t .. + 15) of 16 pairs over k = 32c .. 32c + 31,
// 1 KiB each, and the blocks and chunks follow each other in memory. A block's weights are one
// contiguous stream (2 KiB a chunk), which the kernel prefetches 2.5 KiB ahead, spread over each
// chunk's work (kPrefetchBytes): tile loads from rows K apart (W as stored) ran at ~22 GB/s where
// the vector loads of the AVX-512 path read ~31 (docs/infer.md, "Session 13").
//
// x stays f32 (the contract: a weight-only format does not round activations). Each row of x is
// split into three bf16 parts, x = hi + mid + lo (hi = bf16(x), mid = bf16(x - hi), lo =
// bf16(x - hi - mid); the subtractions are exact), which together carry x's 24 significant bits,
// and C accumulates hi W + mid W + lo W. Every product is exact, so the result is the dot product
// of f32 x with the bf16 weights up to f32 accumulation rounding, as in the AVX-512 path (their
// summation orders differ, so their bits do). Exceptions: the conversion and the tiles treat
// denormals as zero, so a part below 2^-126 counts as 0 (an absolute error under 1e-38 per
// product), and an infinite x gives NaN (inf - inf in the split), where the AVX-512 path gives
// +-inf or NaN.
//
// Batch invariance: output (m, n) is accumulated in one C tile element, k in ascending chunks of
// 32, in each chunk hi then mid then lo, whatever M, the tile's other rows and columns, or the
// thread (threads split the 32-row blocks of W). Bias is added last in f32. So every M >= 2, from
// a batch of two to a prefill of thousands, runs this one kernel and a row's bits do not depend
// on the batch.
//
// One row (M = 1, batch-1 decode) reads the same tile-order weights with vector loads instead
// (row_block), unless the view asks for batch invariance (WeightView::batch_invariant), which
// keeps it on the tiles. A 64-byte row of a B tile is 16 outputs' pairs (w[2r], w[2r + 1]); shifted
// left by 16 bits and masked to the high half, it gives the 16 outputs' weights at k = 2r and at
// k = 2r + 1 as f32 (exact), and each output's sum is the fma chain over k ascending from 0, then
// + bias: the bits of weight_matmul_reference. Why: the tile loads read at most ~0.86-0.88 of the
// probe's bandwidth at M = 1 whatever their prefetch (software prefetch T0 two chunks ahead is
// the best of T0 / T1 / T2 at 2-8 chunks; none gives 0.73), where vector loads with no software
// prefetch (the L2 streamer follows one contiguous run a thread) read 0.92-0.96: batch-1 bf16
// decode of gpt2-124m 114-119 -> 118-124 tokens/s (docs/infer.md, "Session 25"); with a T2
// prefetch one line a line read, 3072 B ahead, batch-1 decode reads ~9% faster (session 26).
// No vector order reproduces TDPBF16PS's bits (session 24), so a row alone and the same row in a
// batch differ in the last bits (both are the f32-accumulated product of f32 x and the bf16
// weights). Vector loads at M >= 2 were slower than the tiles (M = 2: 0.71 of the probe, M = 8:
// 0.39).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/aligned.h"
#include "core/error.h"
#include "kernels/cpu/amx.h"
#include "kernels/cpu/weight_matmul.h"

namespace loom::kernels {
namespace {

constexpr int64_t kTileK = 32;     // k per tile product (a chunk)
constexpr int64_t kBlockRows = 32; // weight rows per block: two B tiles of 16
constexpr int64_t kParts = 3;      // hi, mid, lo
constexpr int64_t kChunkElems = kBlockRows * kTileK;  // bf16 per (block, chunk): 2 KiB
// The weights' software prefetch (T0): kPrefetchBytes ahead of the chunk being multiplied, spread
// over the chunk's work in four groups of 8 lines (before its B tile loads, then before each
// part's products) rather than 32 at once. Every prefetch that misses L1 holds one of the core's
// ~16 L1 fill buffers until its line arrives (~95 ns from memory here), and perf showed the tile
// kernel waiting on them: 32 requested in one burst left none for the x parts' loads and the tile
// loads behind them. Measured (session 26, loom bench decode gpt2-124m bf16 batch 8, five
// alternating runs each): 32 at once 2 chunks (4096 B) ahead 578-610 tokens/s (median); spread,
// 2048 B 611-631, 2304-2816 B 622-654, 3072 B 581-615.
constexpr int64_t kPrefetchBytes = 2560;
constexpr int kPrefetchGroup = 8;  // lines per group: 4 groups of a chunk's 32
// One row's vector loads (row_block): T2 prefetch this far ahead, one line for each line read.
// Measured (session 26, loom bench decode gpt2-124m bf16 batch 1, weight read / adjacent probes,
// medians of five alternating runs): none (as in session 25) 0.862; T0 2048 B 0.899, 2560 0.922,
// 2816 0.933, 3072 0.938-0.94, 3328 0.927, 3584 0.914, 4096 0.882, 6144 0.882; T2 3072 0.945 (T0
// 0.924 beside it). Session 25's T2 two chunks ahead was issued 32 lines at once, at 4096 B.
constexpr int64_t kRowPrefetchBytes = 3072;
// Weight blocks whose outputs a thread stages before copying them into y (run_amx_thread): at
// most 16 rows x 32 outputs each, 128 KiB a thread. Flushing every 16 or 64 blocks read the same.
constexpr int64_t kStageBlocks = 64;

// Rows of x per A tile: all of them below 16, else 16 (the last block padded with zero rows).
int64_t a_rows(int64_t M) { return M < 16 ? M : 16; }

// (Not std::min / std::max: no standard-library templates inside LOOM_AMX_BEGIN, amx.h.)
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace

int64_t amx_tiles_elements(int64_t N, int64_t K) {
  return (N + kBlockRows - 1) / kBlockRows * kBlockRows * K;
}

int64_t amx_tiles_index(int64_t n, int64_t k, int64_t K) {
  const int64_t b = n / kBlockRows, t = (n % kBlockRows) / 16, c = k / kTileK;
  const int64_t r = (k % kTileK) / 2, e = k % 2;
  return (b * (K / kTileK) + c) * kChunkElems + t * 512 + r * 32 + (n % 16) * 2 + e;
}

void pack_amx_tiles(bf16* dst, const bf16* W, int64_t N, int64_t K) {
  LOOM_CHECK(N >= 0 && K > 0 && K % kTileK == 0,
             "pack_amx_tiles: K={} must be a positive multiple of {} (N={})", K, kTileK, N);
  const int64_t total = amx_tiles_elements(N, K);
  std::memset(static_cast<void*>(dst), 0, size_t(total) * sizeof(bf16));  // padding rows
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dst[amx_tiles_index(n, k, K)] = W[n * K + k];
}

// Code built for AMX and AVX-512 (kernels/cpu/amx.h, LOOM_AMX_BEGIN).
#if LOOM_AMX_KERNELS
LOOM_AMX_BEGIN
namespace {

// Row m of x (K f32) into its three parts: for each chunk c, part p's 32 bf16 at
// dst + (c * 3 + p) * R * 32 (R rows of the m block, this row's offset already in dst).
void split_row(uint16_t* dst, const float* x, int64_t K, int64_t R) {
  for (int64_t c = 0; c < K / kTileK; ++c)
    for (int half = 0; half < 2; ++half) {
      __m512 r = _mm512_loadu_ps(x + c * kTileK + 16 * half);
      for (int64_t p = 0; p < kParts; ++p) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        r = _mm512_sub_ps(r, hf);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c * kParts + p) * R * 32 + 16 * half),
                            h);
      }
    }
}

// Row m of the padded x into its place in xp (m blocks of R rows, (KC, 3, R, 32) each): split,
// or zero where m >= M.
void split_or_zero(uint16_t* xp, const float* x, int64_t m, int64_t M, int64_t K, int64_t R) {
  uint16_t* dst = xp + (m / R) * (K / kTileK * kParts * R * 32) + (m % R) * 32;
  if (m < M) {
    split_row(dst, x + m * K, K, R);
  } else {
    for (int64_t i = 0; i < K / kTileK * kParts; ++i) std::memset(dst + i * R * 32, 0, 64);
  }
}

// Tiles: tmm0-1 C for m block 0 (n tiles 0, 1), tmm2-3 C for m block 1, tmm4-5 B (the chunk's
// two weight tiles), tmm6-7 A (a part of m block 0, 1).
void configure_tiles(int64_t R) {
  AmxTileConfig cfg = amx_tiles_16x64();
  for (int t : {0, 1, 2, 3, 6, 7}) cfg.rows[t] = uint8_t(R);
  _tile_loadconfig(&cfg);
}

// C (R x 32 f32 per m block, MB = 1 or 2 blocks) for the 32-row weight block wb over all chunks.
// xa: the first m block's parts; the second's follow at xa + a_stride.
template <int MB>
void tile_block(float* c, const uint16_t* wb, int64_t KC, const uint16_t* xa, int64_t a_stride,
                int64_t R, bool prefetch) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  // Group g (0..3) of the lines kPrefetchBytes ahead of chunk b, running on into the next block
  // (the thread's next, usually; past the last block, addresses outside W, which a prefetch
  // never faults on: computed as integers, not pointers).
  // (asm: GCC 12 deleted this loop written with _mm_prefetch, the whole loop, silently.)
  auto prefetch_group = [&](const uint16_t* b, int g) {
    if (!prefetch) return;
    const uintptr_t p = reinterpret_cast<uintptr_t>(b) + kPrefetchBytes + 64 * kPrefetchGroup * g;
    for (int l = 0; l < kPrefetchGroup; ++l)
      __asm__ volatile("prefetcht0 (%0)" : : "r"(p + 64 * uintptr_t(l)));
  };
  static_assert(kPrefetchGroup * (1 + kParts) * 64 == kChunkElems * 2, "4 groups cover a chunk");
  for (int64_t ch = 0; ch < KC; ++ch) {
    const uint16_t* b = wb + ch * kChunkElems;
    prefetch_group(b, 0);
    // The next chunk's parts of x into L1 (from L2 where x's parts outgrow L1, e.g. 8 rows of
    // K = 3072 take 144 KiB): a tile load waiting on L2 stalls the products after it (M = 8,
    // K = 3072: ~3% faster in a microbenchmark; K = 768 unchanged, session 23).
    if (ch + 1 < KC)
      for (int mb = 0; mb < MB; ++mb) {
        const char* pa =
            reinterpret_cast<const char*>(xa + mb * a_stride + (ch + 1) * kParts * R * 32);
        for (int64_t l = 0; l < kParts * R; ++l) _mm_prefetch(pa + 64 * l, _MM_HINT_T0);
      }
    _tile_loadd(4, b, 64);
    _tile_loadd(5, b + 512, 64);
    for (int64_t p = 0; p < kParts; ++p) {
      prefetch_group(b, 1 + int(p));
      const uint16_t* a = xa + (ch * kParts + p) * R * 32;
      _tile_loadd(6, a, 64);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 6, 5);
      if constexpr (MB == 2) {
        _tile_loadd(7, a + a_stride, 64);
        _tile_dpbf16ps(2, 7, 4);
        _tile_dpbf16ps(3, 7, 5);
      }
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if constexpr (MB == 2) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// One row of x (M = 1) against the 32-row weight block wb: c[n] = the fma chain of x[k] * W[n][k]
// over k ascending from 0 (weight_matmul_reference's order). Software prefetch T2: for each 128
// bytes read, two consecutive lines of the stream kRowPrefetchBytes past the chunk's start plus
// 128 r, running on into the next block (past the last block, addresses outside W, computed as
// integers: a prefetch never faults). Unaligned loads: a view's data need not be 64-byte aligned
// (the inference weights are).
void row_block(float* c, const uint16_t* wb, int64_t KC, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // outputs 0-15, 16-31
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t ch = 0; ch < KC; ++ch) {
    const uint16_t* b = wb + ch * kChunkElems;
    const float* xc = x + ch * kTileK;
    const uintptr_t pf = reinterpret_cast<uintptr_t>(b) + kRowPrefetchBytes;
    for (int r = 0; r < 16; ++r) {  // k = 32 ch + 2r, then 2r + 1
      __asm__ volatile("prefetcht2 (%0)" : : "r"(pf + 128 * uintptr_t(r)));
      __asm__ volatile("prefetcht2 (%0)" : : "r"(pf + 128 * uintptr_t(r) + 64));
      const __m512i w0 = _mm512_loadu_si512(b + r * 32), w1 = _mm512_loadu_si512(b + 512 + r * 32);
      const __m512 xe = _mm512_set1_ps(xc[2 * r]), xo = _mm512_set1_ps(xc[2 * r + 1]);
      a0 = _mm512_fmadd_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), a0);
      a1 = _mm512_fmadd_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), a1);
      a0 = _mm512_fmadd_ps(xo, _mm512_castsi512_ps(_mm512_and_si512(w0, high)), a0);
      a1 = _mm512_fmadd_ps(xo, _mm512_castsi512_ps(_mm512_and_si512(w1, high)), a1);
    }
  }
  _mm512_store_ps(c, a0);
  _mm512_store_ps(c + 16, a1);
}

// The staged blocks (ids[i]'s M x 32 outputs at stage + i * M * 32) into y: row after row, each
// row's blocks in the order taken (runs of consecutive n), so that each row is written in runs.
void flush_stage(float* y, int64_t ldy, int64_t M, int64_t N, const float* stage,
                 const int64_t* ids, int64_t n) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t n0 = ids[i] * kBlockRows, nn = min64(kBlockRows, N - n0);
      float* dst = y + m * ldy + n0;
      const float* src = stage + (i * M + m) * kBlockRows;
      if (nn == kBlockRows)  // a fixed size: copied inline, not by a library call per block
        std::memcpy(dst, src, kBlockRows * sizeof(float));
      else
        std::memcpy(dst, src, size_t(nn) * sizeof(float));
    }
}

// One thread of run_amx's parallel region (a function of its own so that clang, whose OpenMP
// outlining drops target attributes, compiles the tile code with them). xp: the parts of x,
// m block after m block, (KC, 3, R, 32) bf16 each; unused (null) when `vec` (one row, row_block).
void run_amx_thread(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                    const float* bias, const MatmulEpilogue& ep, uint16_t* xp, float* stage,
                    int64_t chunk, bool vec) {
  const int64_t N = w.N, K = w.K, KC = K / kTileK, R = a_rows(M);
  const int64_t mblocks = (M + R - 1) / R, a_stride = KC * kParts * R * 32;
  // 1. Split x; padding rows of the last block are zero. Up to 16 rows (decode) every thread
  // splits all of x into its own buffer, which costs less than the barrier that sharing one would
  // need; more rows are split once, each thread a share, then a barrier.
  if (vec) {
    // one row, read by row_block straight from x
  } else if (mblocks == 1) {
    xp += a_stride * omp_get_thread_num();
    for (int64_t m = 0; m < R; ++m) split_or_zero(xp, x, m, M, K, R);
  } else {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < mblocks * R; ++m) split_or_zero(xp, x, m, M, K, R);
  }  // (implicit barrier: every part is written before any tile reads it)
  // 2. The products, 32 weight rows at a time.
  if (!vec) configure_tiles(R);
  alignas(64) float c[32 * 32];  // (2 m blocks x 16 rows, 32 n), row stride 32
  const uint16_t* W = static_cast<const uint16_t*>(w.data);
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  const int64_t ldr = ep.ld_residual ? ep.ld_residual : N;  // the epilogue's residual stride
  // Decode-sized calls on the tiles (one m block) write each block's finished outputs to this
  // thread's staging buffer, block after block (M rows of 32, contiguous), and copy them into y
  // after the thread's last block. Written straight into y, 32 outputs of each of M rows ldy
  // apart, the stores cost the weight stream 10-20% (session 26: the same kernel without them
  // read 8-18% faster; with staging, whole-model linears at M = 8 read 3-9% faster); stores to
  // consecutive lines do not. Each output gets the same operations either way (then a copy).
  // (stage: kStageBlocks blocks of this thread, flushed to y when full and at the end.)
  const bool staged = stage != nullptr;
  if (staged) stage += int64_t(omp_get_thread_num()) * kStageBlocks * M * kBlockRows;
  int64_t staged_ids[kStageBlocks];
  int64_t n_staged = 0;
#pragma omp for schedule(dynamic, chunk) nowait
  for (int64_t nb = 0; nb < nblocks; ++nb) {
    const uint16_t* wb = W + nb * KC * kChunkElems;
    const int64_t n0 = nb * kBlockRows, nn = min64(kBlockRows, N - n0);
    float* slot = nullptr;  // this block's M x 32 outputs in the staging buffer
    if (staged) {
      if (n_staged == kStageBlocks) {
        flush_stage(y, ldy, M, N, stage, staged_ids, n_staged);
        n_staged = 0;
      }
      slot = stage + n_staged * M * kBlockRows;
      staged_ids[n_staged++] = nb;
    }
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const bool pair = mb + 1 < mblocks;
      const uint16_t* xa = xp + mb * a_stride;
      if (vec) row_block(c, wb, KC, x);
      else if (pair) tile_block<2>(c, wb, KC, xa, a_stride, R, mb == 0);
      else tile_block<1>(c, wb, KC, xa, a_stride, R, mb == 0);
      const int64_t m_end = min64(M, (mb + (pair ? 2 : 1)) * R);
      // Each row's 32 outputs of the block, + bias, then the epilogue (MatmulEpilogue) while
      // they are in L1: the same per-element operations as the separate passes (add_inplace,
      // then gelu_row on the segment), so the same bits, without a pass over y of its own.
      for (int64_t m = mb * R; m < m_end; ++m) {
        const float* cr = c + (m - mb * R) * 32;
        float* yr = staged ? slot + m * kBlockRows : y + m * ldy + n0;
        if (bias) {
          for (int64_t n = 0; n < nn; ++n) yr[n] = cr[n] + bias[n0 + n];
        } else {
          std::memcpy(yr, cr, size_t(nn) * sizeof(float));
        }
        if (ep.residual) {
          const float* r = ep.residual + m * ldr + n0;
          for (int64_t n = 0; n < nn; ++n) yr[n] += r[n];
        }
        if (ep.gelu) gelu_row(ep.gelu_kind, yr, yr, nn);
      }
    }
  }
  if (staged) flush_stage(y, ldy, M, N, stage, staged_ids, n_staged);
  if (!vec) _tile_release();
}

void run_amx(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
             const float* bias, const MatmulEpilogue& ep, uint16_t* xp, float* stage, bool vec) {
  // Contiguous runs of blocks keep each thread's weights one prefetched stream; about four runs
  // per thread still let one thread take over the other's when the machine deschedules it. One
  // row (vector loads; no software prefetch when this was measured) takes one run per thread:
  // each run starts the L2 streamer afresh, and whole-model linears at M = 1 read 0.96 of the
  // probe so, 0.92 in four (bench_kernels_weight_matmul, three alternating runs; batch-1 decode
  // 0.92 against 0.91, session 25). The tiles read the same in one, two or four (M = 8; session
  // 26, with the spread prefetch and staged outputs: one run +1% in decode, within the noise).
  const int64_t nblocks = (w.N + kBlockRows - 1) / kBlockRows;
  const int64_t threads = int64_t(omp_get_max_threads());
  const int64_t chunk =
      vec ? (nblocks + threads - 1) / threads : max64(1, nblocks / (4 * threads));
#pragma omp parallel
  run_amx_thread(y, ldy, x, M, w, bias, ep, xp, stage, chunk, vec);
}

}  // namespace
LOOM_AMX_END
#endif  // LOOM_AMX_KERNELS

namespace detail {

bool weight_matmul_amx(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                       const float* bias, const MatmulEpilogue& ep) {
  if (!(w.layout == WeightLayout::amx_tiles && w.format == WeightFormat::bf16 && w.K > 0 &&
        w.K % kTileK == 0 && amx_bf16_usable()))
    return false;
  if (ldy == 0) ldy = w.N;  // as weight_matmul
  if (M == 0 || w.N == 0) return true;
  if (M == 1 && !w.batch_invariant) {  // one row: vector loads (row_block), no parts of x
#if LOOM_AMX_KERNELS
    run_amx(y, ldy, x, M, w, bias, ep, nullptr, nullptr, true);
#endif
    return true;
  }
  const int64_t R = a_rows(M), mblocks = (M + R - 1) / R;
  // One m block: a private copy per thread (run_amx_thread).
  const int64_t copies = mblocks == 1 ? int64_t(omp_get_max_threads()) : 1;
  // The parts of x: 6 bytes per element of the padded x. Decode-sized calls (~50 a step) reuse
  // one small buffer per calling thread; larger ones (prefill) allocate their own, so that no
  // buffer of a one-off long prompt stays behind.
  constexpr size_t kKeptElems = size_t(1) << 20;  // 2 MiB: 16 rows of K = 3072 for 7 threads
  // 64-byte aligned: each 64-byte row of an A tile in one cache line (a row across two made M = 8
  // ~19% and M = 16 ~27% slower, session 22).
  thread_local AlignedVector<uint16_t> kept;
  AlignedVector<uint16_t> own;
  const size_t need = size_t(copies * mblocks * R * w.K * kParts);
  AlignedVector<uint16_t>& xp = need <= kKeptElems ? kept : own;
  if (xp.size() < need) xp.resize(need);
  // One m block: each thread's staging buffer for its finished outputs (run_amx_thread). Kept
  // per calling thread like `kept`; at most threads x 128 KiB (M <= 16), so never freed.
  thread_local AlignedVector<float> stage;
  if (mblocks == 1) {
    const size_t stage_need = size_t(copies * kStageBlocks * M * kBlockRows);
    if (stage.size() < stage_need) stage.resize(stage_need);
  }
#if LOOM_AMX_KERNELS  // else amx_bf16_usable() was false above
  run_amx(y, ldy, x, M, w, bias, ep, xp.data(), mblocks == 1 ? stage.data() : nullptr, false);
#else
  (void)y;
  (void)x;
  (void)bias;
#endif
  return true;
}

}  // namespace detail

bool weight_matmul_uses_amx(const WeightView& w) {
  return w.layout == WeightLayout::amx_tiles && w.format == WeightFormat::bf16 && w.K > 0 &&
         w.K % kTileK == 0 && amx_bf16_usable();
}

bool amx_tiles_available(int64_t K) {
  static const bool allowed = [] {
    const char* env = std::getenv("LOOM_AMX_WEIGHTS");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return allowed && K > 0 && K % kTileK == 0 && amx_bf16_usable();
}

}  // namespace loom::kernels
