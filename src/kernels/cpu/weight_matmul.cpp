// kernels/cpu/weight_matmul.cpp: y (M, N) = x (M, K) @ W^T + bias with W (N, K) in f32, bf16 or
// int8 rows. Implementations of the contract in weight_matmul.h, each with the reference's bits:
// - weight_matmul_reference: one fma chain (int8: one exact integer sum) per (m, n) over
//   ascending k, any layout. Plain and obviously right; the fallback on CPUs without AVX-512
//   and for row-order views.
// - the AVX-512 kernel below for f32 and bf16, on the panel layout, for every M: decode (M =
//   1..8) streams W once and widens it in registers; batches and prefill share each widened
//   weight vector among up to 8 rows of x and run near the FMA peak.
// - the AVX-512 VNNI kernel for int8 (further below): x in its integer form, vpdpbusd on the
//   weight bytes as they are stored, no widening.
//
// Why f32 x with widened weights rather than vdpbf16ps for bf16: vdpbf16ps would round x to bf16,
// changing the numerics for a weight-only format, and decode sizes are memory-bound anyway: the
// widening costs one ALU op per 16 weights (a shift) beside the FMA, shared by every row of x in
// the tile. Where AMX tiles exist, the inference weights store bf16 linears in tile order at load
// and weight_matmul_amx.cpp runs them on tiles at every M >= 2 (x kept exact by splitting it into
// three bf16 parts) and with vector loads at M = 1 (the reference's bits).
#include "kernels/cpu/weight_matmul.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/elementwise.h"

namespace loom::kernels {
namespace {

// Columns of a span of panels (panels_index): 16 (f32: one panel), 128 (bf16), 64 (int8).
constexpr int64_t span_columns(WeightFormat f) {
  return f == WeightFormat::int8_row ? 64 : f == WeightFormat::bf16 ? 128 : 16;
}

void check_args(const char* fn, float* y, int64_t ldy, const float* x, int64_t M,
                const WeightView& w) {
  const int64_t N = w.N, K = w.K;
  LOOM_CHECK(M >= 0 && N >= 0 && K >= 0, "{}: sizes M={} N={} K={} must be >= 0", fn, M, N, K);
  LOOM_CHECK(ldy >= N, "{}: ldy={} must be >= N={} (or 0 for N)", fn, ldy, N);
  if (M == 0 || N == 0) return;
  LOOM_CHECK(y && (x || K == 0) && (w.data || K == 0),
             "{}: null buffer (y={}, x={}, w.data={}) for M={} N={} K={}", fn,
             static_cast<const void*>(y), static_cast<const void*>(x), w.data, M, N, K);
  LOOM_CHECK(w.format != WeightFormat::int8_row || w.scales,
             "{}: int8_row weight (N={}, K={}) needs scales (N)", fn, N, K);
  const int64_t span = span_columns(w.format);
  LOOM_CHECK(w.layout != WeightLayout::panels ? w.col0 == 0
                                              : w.col0 % 16 == 0 && w.col0 >= 0 && w.col0 < span,
             "{}: a view's column offset col0={} must be a multiple of 16 below its span's {} "
             "columns (0 outside panel order)", fn, w.col0, span);
  LOOM_CHECK(w.layout != WeightLayout::amx_tiles ||
                 (w.format == WeightFormat::bf16 && K > 0 && K % 32 == 0),
             "{}: a tile-order weight (N={}, K={}) must be bf16 with K a multiple of 32", fn, N, K);
}

// ldy: y's row stride as given (0: N).
void check_epilogue(const char* fn, const MatmulEpilogue& ep, const float* y, int64_t ldy,
                    int64_t M, int64_t N) {
  LOOM_CHECK(ep.ld_residual == 0 || ep.ld_residual >= N,
             "{}: epilogue ld_residual={} must be >= N={} (or 0 for N)", fn, ep.ld_residual, N);
  if (!ep.residual || M == 0 || N == 0) return;
  // The fused tiles read each residual element before storing its output and the other paths
  // add it after the whole product: with an overlap they would disagree.
  const int64_t ldr = ep.ld_residual ? ep.ld_residual : N, ly = ldy ? ldy : N;
  const float *r0 = ep.residual, *r1 = ep.residual + (M - 1) * ldr + N;
  const float *y0 = y, *y1 = y + (M - 1) * ly + N;
  LOOM_CHECK(r1 <= y0 || y1 <= r0,
             "{}: the epilogue's residual ({} rows of {} floats, stride {}) overlaps y (stride {}); "
             "pass a separate buffer",
             fn, M, N, ldr, ly);
}

// The epilogue on y as computed (the paths without a fused one): + residual, then GELU, row by
// row with the functions the fused tiles use (rows in parallel: each element is computed alone,
// so the threads change no bit).
void apply_epilogue(float* y, int64_t ldy, int64_t M, int64_t N, const MatmulEpilogue& ep) {
  if (!ep.residual && !ep.gelu) return;
  const int64_t ldr = ep.ld_residual ? ep.ld_residual : N;
#pragma omp parallel for schedule(static) if (M > 1 && M * N > (int64_t(1) << 14))
  for (int64_t m = 0; m < M; ++m) {
    float* yr = y + m * ldy;
    if (ep.residual) add_inplace(yr, ep.residual + m * ldr, N);
    if (ep.gelu) gelu_row(ep.gelu_kind, yr, yr, N);
  }
}

// int8 arithmetic (weight_matmul.h): the exponent e of a finite row of x whose largest magnitude
// is amax, so that |x * 2^e| < 2^30 (0 for a zero row).
int int8_row_exponent(float amax) { return amax > 0.f ? 29 - std::ilogb(amax) : 0; }

// A row of x holding a NaN or an infinity: the f32 formula, acc = fma(x[k], q[n][k], acc) over k
// ascending, then * scales[n], then + bias[n] (so NaN and Inf propagate as IEEE arithmetic says).
void int8_float_row(float* y, const float* x, const WeightView& w, const float* bias) {
  const int8_t* q = static_cast<const int8_t*>(w.data);
  for (int64_t n = 0; n < w.N; ++n) {
    float acc = 0.f;
    for (int64_t k = 0; k < w.K; ++k) acc = std::fma(x[k], float(q[weight_element_index(w, n, k)]), acc);
    acc *= w.scales[n];
    y[n] = bias ? acc + bias[n] : acc;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 kernel, on the panel layout (weight_matmul.h): W^T in panels of 16 output columns, each
// panel k-major, so that one 64-byte f32 vector (32 bytes bf16, 16 bytes int8) holds the weights
// of 16 outputs at one k. A tile of MR rows of x and NR panels keeps MR x NR accumulators; per k
// it loads (and widens) NR weight vectors once and, for each row, broadcasts x[m][k] and does NR
// FMAs: acc[m][n] = fma(x[m][k], W[n][k], acc[m][n]) for k ascending from 0, the reference's
// arithmetic exactly. No horizontal sums, no K tail: nothing in a dot product depends on the
// tile, so the bits are the reference's whatever M, the tile shape or the thread.
//
// Why this layout (session 18, replacing row-major weights read as dot products of 16-lane
// vectors): at M = 8 and above the dot-product tiles loaded x twice per FMA pair and ended each
// tile with a 16-vector horizontal sum, and ran at ~45% of the core's FMA peak (53 of 117 GFLOP/s
// on the Zen 4 host, M = 32, N = 4096, K = 256, one thread); this tile reaches 98% (114-117 at
// M = 8 and 32, N 256-4096, K 256-1024; f32, and bf16 and int8 alike in a prototype: the
// widening is shared by MR rows). At M = 1 it streams NR panels,
// each one contiguous run of K vectors, at least as fast as the row tiles with their software
// prefetches (docs/infer.md, "Session 18"). Software prefetches of the next block (into L1, and
// 2 blocks ahead into L2, as the row tiles did) made M = 1 slower in every format (a harness
// alternating with and without them, gpt2-124m's linears laid end to end, six rounds each: int8
// medians 19-28 against 27-35 GB/s, bf16 20-21 against 32-34, f32 24-29 against 32-39), so the
// panel tiles issue none.

#define LOOM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

constexpr int64_t kPanel = 16;       // output columns per panel: one f32 vector
constexpr int64_t kBlockPanels = 8;  // panels per block: the unit the threads share out
// bf16 panels lie in spans of 8 (128 columns), interleaved by k: a span's row at one k holds its
// 8 panels' 16 weights each, so the 8-panel tile of batch-1 decode reads one contiguous stream
// instead of 8 (panels_index). Session 19, gpt2-124m's linears and head at batch 1
// (bench_kernels_weight_matmul): bf16 4.1 ms a step in spans against 4.7-6.9 in separate panels
// with the probe at 53-55 GB/s; the int8 layout's move from four streams to one had raised its
// batch-1 read from 0.6-0.7 to ~1.0 of the probe. f32 keeps one panel a span (the panel-major
// layout): its batch-8 tiles (3 of a span's 8 panels each) read a span's rows in three strided
// passes, and batch-8 decode fell from 11-14 to 23-26 ms a step; bf16's stayed at 10.5-11.5.
template <WeightFormat F>
constexpr int64_t kSpanPanels = span_columns(F) / kPanel;  // bf16 8, f32 1

template <WeightFormat F>
constexpr size_t kElemBytes = F == WeightFormat::f32 ? 4 : 2;  // f32 or bf16

// The 16 weights of one panel at one k, widened to f32 (exact for bf16). int8 has its own
// kernel below.
template <WeightFormat F>
LOOM_AVX512 inline __m512 load_panel_k(const char* p) {
  if constexpr (F == WeightFormat::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (F == WeightFormat::bf16) {
    // bf16 is the top half of an f32: zero-extend to 32 bits and shift left by 16.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// y[0..MR) x [0..16 NR) of the output (columns at or past `cols` are not written: the last
// panel's padding). x: the tile's first row (rows K apart); w: its first panel's weights at k = 0
// (one k to the next is k_bytes: a span's whole row, see kSpanPanels); bias points at the tile's
// first column (or is null).
// The epilogue of a tile (MatmulEpilogue): res points at the tile's first residual element
// (rows ldr apart) or is null; gelu is 0 or 1 + the GeluKind.
template <WeightFormat F, int MR, int NR>
LOOM_AVX512 void panel_tile(float* y, int64_t ldy, const float* x, int64_t K, const char* w,
                            size_t k_bytes, const float* bias, int64_t cols, const float* res,
                            int64_t ldr, int gelu) {
  // The next panel: at once in a span of several (bf16), a whole panel on with one a span (f32).
  constexpr size_t kPanelBytes = kPanel * kElemBytes<F>;  // one panel's weights at one k
  const size_t panel_stride = kSpanPanels<F> > 1 ? kPanelBytes : k_bytes * size_t(K);
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = load_panel_k<F>(w + size_t(k) * k_bytes + j * panel_stride);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * K + k]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const int64_t left = cols - kPanel * j;
    const __mmask16 mask = left >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    __m512 b = _mm512_setzero_ps();
    if (bias) b = _mm512_maskz_loadu_ps(mask, bias + kPanel * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m512 v = acc[i][j];
      if (bias) v = _mm512_add_ps(v, b);
      if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res + i * ldr + kPanel * j));
      _mm512_mask_storeu_ps(y + i * ldy + kPanel * j, mask, v);
    }
  }
  if (gelu) {
    const int64_t width = std::min<int64_t>(cols, kPanel * NR);
    for (int i = 0; i < MR; ++i)
      gelu_row(GeluKind(gelu - 1), y + i * ldy, y + i * ldy, width);
  }
}

using PanelTileFn = void (*)(float*, int64_t, const float*, int64_t, const char*, size_t,
                             const float*, int64_t, const float*, int64_t, int);

// Tile shapes: MR = 1..8 rows, NR panels up to kMaxNr(MR): MR x NR accumulators + NR weight
// vectors + one broadcast x fit the 32 vector registers, and NR below the maximum serves a
// block's last panels. At M = 1 eight panels in flight (eight independent FMA chains, eight
// streams) keep the FMA latency hidden. The M rows of a call are cut into ceil(M / 8) row
// tiles of as equal heights as possible (31 rows: 8, 8, 8, 7), so that every row tile is one
// pass over the block's weights: tiles of 8, 4, 2 and 1 rows made 31 rows six passes (8, 8,
// 8, 4, 2, 1: the 1-row tile reads the weights for a single row, as batch-1 decode does); a
// loaded server's steps rarely have a multiple of 8 rows (session 21, codegeex-small `bench
// decode`: batch 7 0.82 -> 0.71-0.75 ms a step, batch 31 2.60 -> 2.53). Each output's arithmetic
// is the same fma chain whatever the tile (weight_matmul.h), so the cut changes no bit.
constexpr int kMaxMr = 8;
constexpr int kMaxNr(int mr) {
  return mr <= 2 ? 8 : mr == 3 ? 7 : mr == 4 ? 4 : mr == 5 ? 5 : mr == 6 ? 4 : 3;
}

template <WeightFormat F>
struct PanelTiles {
  PanelTileFn fn[kMaxMr][8];  // [MR - 1][NR - 1]
  constexpr PanelTiles() : fn{} {
    fill<1, 1>();
  }
  template <int mr, int nr>
  constexpr void fill() {
    fn[mr - 1][nr - 1] = &panel_tile<F, mr, nr>;
    if constexpr (nr < kMaxNr(mr)) {
      fill<mr, nr + 1>();
    } else if constexpr (mr < kMaxMr) {
      fill<mr + 1, 1>();
    }
  }
};

// The height of row tile t of M rows cut into tiles = ceil(M / kMaxMr) (the first M % tiles
// tiles are one row taller).
inline int row_tile_height(int64_t M, int64_t tiles, int64_t t) {
  return int(M / tiles + (t < M % tiles ? 1 : 0));
}

// Runs fn(b) for every b in [0, n) on the OpenMP threads. Each thread owns one contiguous
// range (its 1/T of [0, n)) and claims it front to back in chunks (of kChunk blocks, fewer when
// n is small, so that the others can still take over part of a range); a thread done with
// its own range then claims the remaining chunks of the others' (on a shared machine one thread
// is often descheduled, and the other takes over its work). Why not schedule(dynamic): its
// chunks interleave the threads through the whole matrix, and on the Zen 4 host two threads
// reading that way got ~30 GB/s whatever the machine's state, where one contiguous stream each
// reaches the read probe's 45-55 GB/s when the machine gives it (bench_kernels_weight_matmul
// --M 1, session 17: int8 44-47 against 28-31 GB/s with the probe at 50-55). The schedule decides
// only who computes a block, never how, so the results do not depend on it.
template <typename Fn>
void for_blocks_owned_first(int64_t n, const Fn& fn) {
  constexpr int64_t kChunk = 4;
  constexpr int kMaxOwners = 64;
  struct alignas(64) Next {
    std::atomic<int64_t> v{0};
  };
  const int threads = std::min(omp_get_max_threads(), kMaxOwners);
  if (threads <= 1 || n <= 1) {
    for (int64_t b = 0; b < n; ++b) fn(b);
    return;
  }
  const int64_t chunk = std::clamp<int64_t>(n / (4 * int64_t(threads)), 1, kChunk);
  Next next[kMaxOwners];
#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), me = omp_get_thread_num();
    for (int v = 0; v < T; ++v) {
      const int r = (me + v) % T;  // own range first, then the others' in turn
      const int64_t lo = n * r / T, hi = n * (r + 1) / T;
      for (;;) {
        const int64_t b0 = lo + next[r].v.fetch_add(chunk, std::memory_order_relaxed);
        if (b0 >= hi) break;
        for (int64_t b = b0; b < std::min(hi, b0 + chunk); ++b) fn(b);
      }
    }
  }
}

template <WeightFormat F>
LOOM_AVX512 void weight_matmul_panels(float* y, int64_t ldy, const float* x, int64_t M,
                                      const WeightView& w, const float* bias,
                                      const MatmulEpilogue& ep) {
  static constexpr PanelTiles<F> kTiles;
  const int64_t N = w.N, K = w.K;
  // Panels counted from the first of the span w.data points at (the view starts at panel a0).
  const int64_t a0 = w.col0 / kPanel, A = a0 + (N + kPanel - 1) / kPanel;
  const size_t k_bytes = size_t(kSpanPanels<F> * kPanel) * kElemBytes<F>;  // a span's row
  const size_t span_bytes = k_bytes * size_t(K);
  const char* wdata = static_cast<const char*>(w.data);
  // Blocks of 8, 4, 2 or 1 panels (so that none crosses a span), fewer than 8 when that leaves a
  // thread without one (small N).
  const int64_t threads = std::max(1, omp_get_max_threads());
  int64_t per_block = kBlockPanels;
  while (per_block > 1 && per_block * threads > A - a0) per_block /= 2;
  const int64_t n_blocks = (A + per_block - 1) / per_block - a0 / per_block;
  // Within a block a thread walks every row of x, so W is read from memory once per call
  // whatever M (the later row tiles find the block's panels in L1/L2). (Walking the K in chunks
  // of 256, every tile of a bf16 span per chunk, was ~5% slower at batch 8: 10.9-11.2 against
  // 10.4-10.5 ms a step of gpt2-124m's linears, session 19.)
  const int64_t ldr = ep.ld_residual ? ep.ld_residual : N;
  const int gelu = ep.gelu ? 1 + int(ep.gelu_kind) : 0;
  auto block = [&](int64_t b) {
    const int64_t first = a0 / per_block + b;  // in blocks from the span's start
    const int64_t a_begin = std::max(a0, first * per_block),
                  a_end = std::min(A, (first + 1) * per_block);
    const int64_t row_tiles = (M + kMaxMr - 1) / kMaxMr;
    for (int64_t t = 0, m0 = 0; t < row_tiles; ++t) {
      const int mr = row_tile_height(M, row_tiles, t);
      for (int64_t a = a_begin; a < a_end;) {
        const int nr = int(std::min<int64_t>(kMaxNr(mr), a_end - a));
        const int64_t c = a * kPanel - w.col0;  // the tile's first column in the view
        kTiles.fn[mr - 1][nr - 1](y + m0 * ldy + c, ldy, x + m0 * K, K,
                                  wdata + size_t(a / kSpanPanels<F>) * span_bytes +
                                      size_t(a % kSpanPanels<F> * kPanel) * kElemBytes<F>,
                                  k_bytes, bias ? bias + c : nullptr, N - c,
                                  ep.residual ? ep.residual + m0 * ldr + c : nullptr, ldr,
                                  gelu);
        a += nr;
      }
      m0 += mr;
    }
  };
  for_blocks_owned_first(n_blocks, block);
}

// ---------------------------------------------------------------------------------------------
// int8 on AVX-512 VNNI. Widening int8 to f32 (sign-extend, int -> float) costs two vector ops per
// 16 weights beside the FMA: on the Zen 4 host that capped batch-1 decode at ~29 GB/s of int8 a
// core with the weights in L1 (1.8 G weight vectors a second, the same rate as bf16's one
// widening op, i.e. half of bf16's bytes), below the machine's read bandwidth. Here the row of x
// is held as integers instead (weight_matmul.h, "int8 arithmetic": X = x * 2^e rounded, |X| <
// 2^30) and split into four signed base-256 digits, so that vpdpbusd multiplies 64 weights by
// one digit plane in one instruction: 4 instructions per 64 weights, 3x fewer than widening,
// and the integer sums are exact, so the order of accumulation (tiles, threads, K) cannot change
// a bit. vpdpbusd takes unsigned bytes on one side: the kernel flips the weights' sign bit in
// registers (u = q + 128) and subtracts 128 * sum_k X[k] at the end. Per (row, column) the four
// digit planes accumulate in int32: |digit| <= 128 and u <= 255, so K <= 65536 keeps them exact
// (a larger K runs the reference loop).
//
// Layout (panels_index, int8): spans of 64 columns (4 panels), k in groups of 4, each group 256
// bytes: column c's weights at k = 4g..4g+3 in bytes 4c..4c+3, so that 64 bytes are one panel's
// vpdpbusd operand. A tile of 4 panels reads one contiguous stream (48 KiB at K = 768), where 16-
// column panels made four streams of a quarter of that: at batch 1, short streams read at 0.6-0.7
// of the read probe (the hardware prefetchers ramp up per stream).

constexpr int64_t kInt8Group = 4;           // k per 32-bit lane
constexpr int64_t kInt8Span = span_columns(WeightFormat::int8_row);  // 4 panels, by group
constexpr int64_t kInt8MaxK = int64_t(1) << 16;  // int32 digit sums exact up to here
// Streams and prefetch (session 22, the 2-core Intel Xeon with AMX, THP-backed weights): a
// tile reads its span's K as four quarters side by side, and prefetches each 2 KiB ahead into
// L2. One stream a thread read gpt2-124m's int8 weights at ~0.55-0.6 of the read probe in
// `loom bench decode --batch 1` (123-125 tokens/s): a single sequential stream per core does
// not keep enough lines in flight on that host (the f32 tiles, eight panels = eight streams,
// read at 1.05-1.1 of it). Four streams: 195-213 tokens/s; four with the prefetch: 210-242
// (0.90-1.05 of the probe); one with a 4-8 KiB prefetch: 180-227 (two or three alternating
// rounds each, docs/infer.md "Session 22"). Not measured on the Zen 4 host of sessions 16-21.
constexpr int64_t kInt8Streams = 4;
constexpr int64_t kInt8PrefetchBytes = 2048;

#define LOOM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define LOOM_AVX512_VNNI_LAMBDA \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline))

// The integer form of rows of x (weight_matmul.h): per row, 2^-e, sum_k X[k], and the four
// digit planes as dwords: plane j, group g holds digit j of X[4g..4g+3] (one byte each).
struct Int8Rows {
  int64_t groups = 0;  // dwords per plane (K rounded up to 16, / 4: whole vectors)
  std::vector<int32_t> planes;  // (M, 4, groups)
  std::vector<int64_t> sum;     // (M)
  std::vector<double> unscale;  // (M): 2^-e
  std::vector<uint8_t> finite;  // (M): 0 where the row holds a NaN or an infinity
};

LOOM_AVX512_VNNI void int8_prepare_row(const float* x, int64_t K, int64_t groups, int32_t* planes,
                                       int64_t* sum, double* unscale, uint8_t* finite) {
  // Pass 1: the largest magnitude, and whether every value is finite.
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1u);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k));
    bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);  // NaN or > max: not finite
    amax = _mm512_max_ps(amax, a);
  }
  if (groups > 0) std::memset(planes, 0, size_t(4 * groups) * sizeof(int32_t));
  if (bad) {  // this row runs the f32 formula (int8_float_row)
    *finite = 0, *sum = 0, *unscale = 1.0;
    return;
  }
  *finite = 1;
  const float top = _mm512_reduce_max_ps(amax);
  const int e = int8_row_exponent(top);
  *unscale = std::ldexp(1.0, -e);
  const __m512 ev = _mm512_set1_ps(float(e));
  __m512i s64 = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1u);
    // x * 2^e is exact (scalef), then rounded to the nearest integer, ties to even (MXCSR's
    // default mode, as std::nearbyint in the reference).
    __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(_mm512_maskz_loadu_ps(m, x + k), ev));
    s64 = _mm512_add_epi64(s64, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(X)));
    s64 = _mm512_add_epi64(s64, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(X, 1)));
    const int64_t g = k / kInt8Group;  // this vector's first group
    for (int j = 0; j < 4; ++j) {
      // Balanced base-256 digits: d = the low byte as a signed value, X = (X - d) / 256 exactly.
      const __m512i d = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + j * groups + g), _mm512_cvtepi32_epi8(d));
      X = _mm512_srai_epi32(_mm512_sub_epi32(X, d), 8);
    }
  }
  *sum = _mm512_reduce_add_epi64(s64);
}

// acc += the 4-byte dot products of a (unsigned bytes) and b (signed bytes) per 32-bit lane. In
// inline assembly because GCC 12 copies the accumulator of the intrinsic through other registers
// (and spills them) when it holds 16 of them: the tile below ran at ~60% of the instruction's
// rate that way.
LOOM_AVX512_VNNI inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
}

// y[0..16 NR) of one row from its digit planes and NR panels. One row a tile: GCC 12 keeps the
// 16 accumulators of a one-row tile in registers, but spilled them to the stack (half the rate)
// in every two- to six-row shape tried; the rows of a batch each walk the block's panels again
// instead, from L2 (a block of 8 panels is 8 * 16 * K bytes: 96 KiB at K = 768).
template <int NR>
LOOM_AVX512_VNNI void int8_tile(float* y, const int32_t* planes, int64_t groups, int64_t sum,
                                double unscale, const char* w, int64_t G,
                                const float* scales, const float* bias, int64_t cols) {
  __m512i acc[NR][4];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) acc[j][p] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(char(0x80));  // q -> q + 128, as unsigned bytes
  // Group g: NR weight vectors (one 256-byte row of the span: each panel's 16 columns at 4 k),
  // each into the four planes' accumulators; and a prefetch kInt8PrefetchBytes further on in
  // the same stream.
  auto group = [&](int64_t g) LOOM_AVX512_VNNI_LAMBDA {
    const char* wg = w + size_t(g) * kInt8Span * kInt8Group;
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) _mm_prefetch(wg + kInt8PrefetchBytes + j * 64, _MM_HINT_T1);
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_xor_si512(_mm512_loadu_si512(wg + j * 64), flip);
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i xb = _mm512_set1_epi32(planes[p * groups + g]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) dpbusd(acc[j][p], wv[j], xb);
    }
  };
  // The span's K in kInt8Streams quarters read side by side: the sums are exact, so their order
  // changes no bit.
  const int64_t Gq = (G + kInt8Streams - 1) / kInt8Streams;
  for (int64_t g = 0; g < Gq; ++g) {
#pragma GCC unroll 4
    for (int64_t q = 0; q < kInt8Streams; ++q)
      if (q == 0 || g + q * Gq < G) group(g + q * Gq);
  }
  // I = sum_p acc_p * 256^p - 128 * sum_k X (int64, exact); y = f32(f64(I) * (s * 2^-e)) + bias.
  const __m512d u = _mm512_set1_pd(unscale);
  const __m512i offset = _mm512_set1_epi64(-128 * sum);
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const int64_t left = cols - kPanel * j;
    const __mmask16 mask = left >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scales + kPanel * j);
    const __m512d s_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(s));
    const __m512d s_hi =
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    __m512i lo = offset, hi = offset;
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      lo = _mm512_add_epi64(
          lo, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[j][p])), 8 * p));
      hi = _mm512_add_epi64(
          hi, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[j][p], 1)),
                                8 * p));
    }
    const __m256 y_lo =
        _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi64_pd(lo), _mm512_mul_pd(s_lo, u)));
    const __m256 y_hi =
        _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi64_pd(hi), _mm512_mul_pd(s_hi, u)));
    __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(y_lo), y_hi, 1);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + kPanel * j));
    _mm512_mask_storeu_ps(y + kPanel * j, mask, v);
  }
}

using Int8TileFn = void (*)(float*, const int32_t*, int64_t, int64_t, double, const char*,
                            int64_t, const float*, const float*, int64_t);

// One span (up to four panels) a tile: 16 int32 accumulators (16 independent chains), 4 weight
// vectors, one broadcast.
constexpr int kInt8MaxNr = 4;
constexpr Int8TileFn kInt8Tiles[kInt8MaxNr] = {&int8_tile<1>, &int8_tile<2>, &int8_tile<3>,
                                               &int8_tile<4>};

LOOM_AVX512_VNNI void weight_matmul_int8_vnni(float* y, int64_t ldy, const float* x, int64_t M,
                                              const WeightView& w, const float* bias) {
  const int64_t N = w.N, K = w.K;
  const int64_t G = (K + kInt8Group - 1) / kInt8Group;  // groups
  const int64_t col0 = w.col0;  // the view's first column within its first span
  const int64_t S = (col0 + N + kInt8Span - 1) / kInt8Span;  // spans
  const size_t span_bytes = size_t(kInt8Span * G * kInt8Group);
  thread_local Int8Rows rows;  // reused across calls: decode calls this per linear per token
  rows.groups = (K + 15) / 16 * 4;
  const int64_t groups = rows.groups, stride = 4 * groups;
  rows.planes.resize(size_t(M * stride));
  rows.sum.resize(size_t(M));
  rows.unscale.resize(size_t(M));
  rows.finite.resize(size_t(M));
  int32_t* planes = rows.planes.data();  // this thread's buffers, for the workers below
  int64_t* sums = rows.sum.data();
  double* unscales = rows.unscale.data();
  uint8_t* finite = rows.finite.data();
#pragma omp parallel for schedule(static) if (M >= 16)
  for (int64_t m = 0; m < M; ++m)
    int8_prepare_row(x + m * K, K, groups, planes + m * stride, sums + m, unscales + m,
                     finite + m);
  const char* wdata = static_cast<const char*>(w.data);
  const int64_t threads = std::max(1, omp_get_max_threads());
  // Blocks of up to 2 spans (8 panels, as the f32 and bf16 kernel's), fewer when that leaves a
  // thread without one.
  const int64_t per_block = std::clamp<int64_t>((S + threads - 1) / threads, 1, 2);
  const int64_t n_blocks = (S + per_block - 1) / per_block;
  auto block = [&](int64_t b) {
    const int64_t s_begin = b * per_block, s_end = std::min(S, s_begin + per_block);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t sp = s_begin; sp < s_end; ++sp) {
        const int64_t j0 = sp == 0 ? col0 / kPanel : 0;      // the span's first panel in the view
        const int64_t c0 = sp * kInt8Span + j0 * kPanel - col0;  // its first column in the view
        const int nr = int(std::min<int64_t>(kInt8MaxNr - j0, (N - c0 + kPanel - 1) / kPanel));
        kInt8Tiles[nr - 1](y + m * ldy + c0, planes + m * stride, groups, sums[m], unscales[m],
                           wdata + size_t(sp) * span_bytes + size_t(j0) * 64, G, w.scales + c0,
                           bias ? bias + c0 : nullptr, N - c0);
      }
  };
  for_blocks_owned_first(n_blocks, block);
  for (int64_t m = 0; m < M; ++m)  // rows holding NaN or Inf: the f32 formula
    if (!finite[m]) int8_float_row(y + m * ldy, x + m * K, w, bias);
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

bool cpu_has_avx512_vnni() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

}  // namespace

namespace {
size_t kElemBytesOf(WeightFormat f) { return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 2 : 1; }
}  // namespace

int64_t panels_elements(WeightFormat format, int64_t N, int64_t K) {
  if (format == WeightFormat::int8_row)
    return (N + kInt8Span - 1) / kInt8Span * kInt8Span * ((K + kInt8Group - 1) / kInt8Group * kInt8Group);
  const int64_t span = span_columns(format);
  return (N + span - 1) / span * span * K;
}

int64_t panels_index(WeightFormat format, int64_t n, int64_t k, int64_t K) {
  if (format == WeightFormat::int8_row) {
    const int64_t K4 = (K + kInt8Group - 1) / kInt8Group * kInt8Group;
    return n / kInt8Span * kInt8Span * K4 + k / kInt8Group * (kInt8Span * kInt8Group) +
           n % kInt8Span * kInt8Group + k % kInt8Group;
  }
  const int64_t span = span_columns(format);
  return n / span * span * K + k * span + n % span;
}

WeightView panels_view_rows(const WeightView& w, int64_t r0, int64_t n) {
  LOOM_CHECK(w.layout == WeightLayout::panels && r0 >= 0 && n >= 0 && r0 + n <= w.N &&
                 r0 % kPanel == 0,
             "panels_view_rows: rows [{}, {}) of a panel-order weight with {} rows: need whole "
             "16-column panels", r0, r0 + n, w.N);
  WeightView v = w;
  v.N = n;
  const int64_t first = w.col0 + r0;  // in the layout w.data starts
  const int64_t unit = span_columns(w.format);
  v.col0 = first % unit;
  v.data = static_cast<const char*>(w.data) +
           size_t(panels_index(w.format, first - v.col0, 0, w.K)) * kElemBytesOf(w.format);
  if (w.scales) v.scales = w.scales + r0;
  return v;
}

int64_t weight_element_index(const WeightView& w, int64_t n, int64_t k) {
  switch (w.layout) {
    case WeightLayout::rows: return n * w.K + k;
    case WeightLayout::amx_tiles: return amx_tiles_index(n, k, w.K);
    case WeightLayout::panels: return panels_index(w.format, n + w.col0, k, w.K);
  }
  LOOM_ASSERT(false, "unknown WeightLayout {}", int(w.layout));
}

namespace {
template <typename T>  // float, bf16 or int8_t: element (n, k) to panels_index(format, n, k, K)
void pack_panels_as(T* dst, const T* W, WeightFormat format, int64_t N, int64_t K) {
  const int64_t R = span_columns(format);  // a span's columns
  const int64_t units = (N + R - 1) / R;
  const int64_t unit = panels_elements(format, R, K);  // elements of one unit
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < units; ++p) {
    T* d = dst + p * unit;  // this unit
    std::memset(static_cast<void*>(d), 0, size_t(unit) * sizeof(T));  // padding: zeros
    for (int64_t n = p * R; n < std::min(N, (p + 1) * R); ++n)
      for (int64_t k = 0; k < K; ++k) d[panels_index(format, n % R, k, K)] = W[n * K + k];
  }
}
}  // namespace

void pack_panels(void* dst, const void* W, WeightFormat format, int64_t N, int64_t K) {
  LOOM_CHECK(N >= 0 && K >= 0, "pack_panels: sizes N={} K={} must be >= 0", N, K);
  switch (format) {
    case WeightFormat::f32:
      return pack_panels_as(static_cast<float*>(dst), static_cast<const float*>(W), format, N, K);
    case WeightFormat::bf16:
      return pack_panels_as(static_cast<bf16*>(dst), static_cast<const bf16*>(W), format, N, K);
    case WeightFormat::int8_row:
      return pack_panels_as(static_cast<int8_t*>(dst), static_cast<const int8_t*>(W), format, N,
                            K);
  }
}

namespace {
// weight_matmul_reference for int8: the integer arithmetic of weight_matmul.h written out.
void int8_reference(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                    const float* bias) {
  const int64_t N = w.N, K = w.K;
  const int8_t* q = static_cast<const int8_t*>(w.data);
  std::vector<int32_t> X(size_t(M * K));  // (M, K): x as integers
  std::vector<int> e(static_cast<size_t>(M));  // (M): the exponent e of each row
  std::vector<uint8_t> finite(size_t(M), 1);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      if (!std::isfinite(xr[k])) finite[size_t(m)] = 0;
      amax = std::fmax(amax, std::fabs(xr[k]));
    }
    if (!finite[size_t(m)]) {
      int8_float_row(y + m * ldy, xr, w, bias);
      continue;
    }
    e[size_t(m)] = int8_row_exponent(amax);
    for (int64_t k = 0; k < K; ++k)
      X[size_t(m * K + k)] = int32_t(std::nearbyint(std::ldexp(xr[k], e[size_t(m)])));
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      if (!finite[size_t(m)]) continue;
      const int32_t* xr = X.data() + m * K;
      int64_t acc = 0;
      if (w.layout == WeightLayout::rows) {
        // Where the int8 rows are not in panels (no AVX-512 VNNI: they stay in rows, and this
        // loop is the kernel): contiguous, and an exact sum, so any order (the compiler's
        // vectors) gives the same integer.
        const int8_t* qr = q + n * K;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += int64_t(xr[k]) * qr[k];
      } else {
        for (int64_t k = 0; k < K; ++k) acc += int64_t(xr[k]) * q[weight_element_index(w, n, k)];
      }
      const float v = float(double(acc) * std::ldexp(double(w.scales[n]), -e[size_t(m)]));
      y[m * ldy + n] = bias ? v + bias[n] : v;
    }
}
}  // namespace

void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias, const MatmulEpilogue& ep) {
  check_epilogue("weight_matmul_reference", ep, y, ldy, M, w.N);
  weight_matmul_reference(y, ldy, x, M, w, bias);
  apply_epilogue(y, ldy ? ldy : w.N, M, w.N, ep);
}

void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias) {
  const int64_t N = w.N, K = w.K;
  if (ldy == 0) ldy = N;
  check_args("weight_matmul_reference", y, ldy, x, M, w);
  if (M == 0 || N == 0) return;
  if (w.format == WeightFormat::int8_row) return int8_reference(y, ldy, x, M, w, bias);
  // The weight at (n, k) as f32, in any layout (exact: bf16 widens without rounding).
  auto weight = [&w](int64_t n, int64_t k) -> float {
    const int64_t i = weight_element_index(w, n, k);
    return w.format == WeightFormat::f32 ? static_cast<const float*>(w.data)[i]
                                         : bf16_to_f32(static_cast<const bf16*>(w.data)[i]);
  };
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;  // (K)
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(xr[k], weight(n, k), acc);
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
    }
  }
}

void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias) {
  weight_matmul(y, ldy, x, M, w, bias, MatmulEpilogue{});
}

void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias, const MatmulEpilogue& ep) {
  const int64_t N = w.N;
  if (ldy == 0) ldy = N;
  check_args("weight_matmul", y, ldy, x, M, w);
  check_epilogue("weight_matmul", ep, y, ldy, M, N);
  if (M == 0 || N == 0) return;
  if (w.layout == WeightLayout::amx_tiles) {  // only the AMX kernel reads tile order fast
    if (detail::weight_matmul_amx(y, ldy, x, M, w, bias, ep)) return;
    return weight_matmul_reference(y, ldy, x, M, w, bias, ep);
  }
  if (w.layout != WeightLayout::panels || !weight_matmul_panels_fast(w.format) ||
      (w.format == WeightFormat::int8_row && w.K > kInt8MaxK))
    return weight_matmul_reference(y, ldy, x, M, w, bias, ep);
  switch (w.format) {
    case WeightFormat::f32:
      return weight_matmul_panels<WeightFormat::f32>(y, ldy, x, M, w, bias, ep);
    case WeightFormat::bf16:
      return weight_matmul_panels<WeightFormat::bf16>(y, ldy, x, M, w, bias, ep);
    case WeightFormat::int8_row:
      weight_matmul_int8_vnni(y, ldy, x, M, w, bias);
      return apply_epilogue(y, ldy, M, N, ep);
  }
  LOOM_ASSERT(false, "weight_matmul: unknown WeightFormat {}", int(w.format));
}

bool weight_matmul_uses_avx512() {
  static const bool kAvx512 = cpu_has_avx512();  // a property of the CPU, fixed for the process
  return kAvx512;
}

bool weight_matmul_panels_fast(WeightFormat format) {
  static const bool kVnni = cpu_has_avx512_vnni();
  return format == WeightFormat::int8_row ? kVnni : weight_matmul_uses_avx512();
}

void quantize_rows_int8(int8_t* q, float* scales, const float* W, int64_t N, int64_t K) {
  LOOM_CHECK(N >= 0 && K >= 0, "quantize_rows_int8: sizes N={} K={} must be >= 0", N, K);
  LOOM_CHECK(N == 0 || (scales && ((q && W) || K == 0)),
             "quantize_rows_int8: null buffer (q={}, scales={}, W={}) for N={} K={}",
             static_cast<const void*>(q), static_cast<const void*>(scales),
             static_cast<const void*>(W), N, K);
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = W + n * K;  // (K)
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      LOOM_CHECK(std::isfinite(wr[k]), "quantize_rows_int8: weight row {} column {} is {}", n, k,
                 wr[k]);
      amax = std::fmax(amax, std::fabs(wr[k]));
    }
    const float s = amax / 127.f;
    scales[n] = s;
    for (int64_t k = 0; k < K; ++k)
      q[n * K + k] =
          s == 0.f ? int8_t(0)
                   : int8_t(std::lrint(std::fmin(127.f, std::fmax(-127.f, wr[k] / s))));
  }
}

}  // namespace loom::kernels
