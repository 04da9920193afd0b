// kernels/cpu/weight_matmul.cpp: y (M, N) = x (M, K) @ W^T + bias with W (N, K) in f32, bf16 or
// int8 rows. Two implementations of the contract in weight_matmul.h:
// - weight_matmul_reference: one dot product per (m, n) in ascending k. Plain and obviously right;
//   the fallback on CPUs without AVX-512.
// - the AVX-512 kernel below, for decode: at M = 1..8 the cost is reading W once, so the kernel
//   streams each weight row once, widens it to f32 in registers and multiplies it into up to 8
//   rows of x (register blocking over M), with several weight rows in flight to give the
//   prefetchers independent streams.
//
// Batch invariance (the contract): every (m, n) dot product is computed by the same instruction
// sequence whatever M, the tile it lands in, or the thread that runs it: one 16-lane accumulator,
// k in ascending 16-blocks, the K % 16 tail as a final zero-padded block, then one fixed
// horizontal-sum tree, then * scale (int8), then + bias. Tiles only decide which dot products
// share a weight load, never the order inside one. Threads split N only.
//
// Why f32 x with widened weights rather than vdpbf16ps for bf16: vdpbf16ps would round x to bf16,
// changing the numerics for a weight-only format, and decode sizes are memory-bound anyway: the
// widening costs one ALU op per 16 weights (shift for bf16, int->float convert for int8) beside
// the FMA, shared by up to 8 rows of x. With L1-resident data one core of the development machine
// (one 512-bit FMA per cycle) widens and multiplies ~25 G int8 or bf16 weights per second, above
// what it can read from DRAM. At M = 8 the kernel is FMA-bound instead (8 FMAs per 16 weights).
// The development machine also lacked AVX512_BF16. Where AMX tiles exist, the inference weights
// store bf16 linears in tile order at load and weight_matmul_amx.cpp runs them at every M (x kept
// exact by splitting it into three bf16 parts): at M = 8 it is ~1.4x this path, at M = 1 equal.
#include "kernels/cpu/weight_matmul.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "core/error.h"

namespace loom::kernels {
namespace {

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
  LOOM_CHECK(w.layout == WeightLayout::rows ||
                 (w.format == WeightFormat::bf16 && K > 0 && K % 32 == 0),
             "{}: a tile-order weight (N={}, K={}) must be bf16 with K a multiple of 32", fn, N, K);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 kernel.

#define LOOM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int kMaxRowsX = 8;  // MR: rows of x per tile (M blocking)
constexpr int kRowsW = 8;     // weight rows per N block (NR of the widest tile)
constexpr size_t kPrefetchMaxTileBytes = 32 << 10;  // see tile()

// 16 consecutive weights of one row from column k, widened to f32. With kTail, only the lanes in
// `mask` are loaded and the others are zero (masked loads do not touch memory past the row).
template <WeightFormat F, bool kTail>
LOOM_AVX512 inline __m512 load_w16(const void* row, int64_t k, __mmask16 mask) {
  if constexpr (F == WeightFormat::f32) {
    const float* p = static_cast<const float*>(row) + k;
    return kTail ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
  } else if constexpr (F == WeightFormat::bf16) {
    // bf16 is the top half of an f32: zero-extend to 32 bits and shift left by 16 (exact).
    const uint16_t* p = static_cast<const uint16_t*>(row) + k;
    __m256i h = kTail ? _mm256_maskz_loadu_epi16(mask, p)
                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const int8_t* p = static_cast<const int8_t*>(row) + k;
    __m128i b = kTail ? _mm_maskz_loadu_epi8(mask, p)
                      : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));  // int8 -> f32 is exact
  }
}

// The sum of the 16 lanes in a fixed tree: lanes i and i+8, then i and i+4, i+2, i+1. (Written
// out so that the order is visible here rather than in a compiler header.)
LOOM_AVX512 inline float sum_lanes(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  // swap 256-bit halves
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // swap 128-bit pairs
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));        // swap 64-bit pairs
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));        // swap neighbours
  return _mm512_cvtss_f32(v);
}

// sum_lanes of each of `n` (<= 16) vectors at once: out[a] = sum_lanes(v[a]), bit for bit. The
// same butterfly as sum_lanes (lanes i and i+8, then i+4, i+2, i+1, each add with the same
// operands), but each level's shuffles bring two vectors' halves together, so one add serves
// both: 15 adds and 30 shuffles for 16 sums instead of 64 and 64. Every output lane depends on
// one input vector only, so the missing vectors of n < 16 are zeros that reach no result.
template <int n>
LOOM_AVX512 inline void sum_lanes16(const __m512* v, float* out) {
  static_assert(n >= 1 && n <= 16);
  __m512 x[16];
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) x[a] = a < n ? v[a] : _mm512_setzero_ps();
  __m512 c[8], e[4], g[2];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)  // lanes 0-7: x[2p]'s i + (i+8); lanes 8-15: x[2p+1]'s
    c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0xEE));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)  // 128-bit block b: x[4q + b]'s i + (i+4), i < 4
    e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
#pragma GCC unroll 2
  for (int r = 0; r < 2; ++r)  // block b, lanes 0-1: x[8r + b]'s i + (i+2); lanes 2-3: x[8r+4+b]'s
    g[r] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0x44),
                         _mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0xEE));
  // Block b, lane j: the sum of x[4j + b].
  const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88),
                                 _mm512_shuffle_ps(g[0], g[1], 0xDD));
  alignas(64) float t[16];
  _mm512_store_ps(t, h);
#pragma GCC unroll 16
  for (int a = 0; a < n; ++a) out[a] = t[4 * (a % 4) + a / 4];
}

// One k-block of 16 for an (MR x NR) tile: NR weight vectors, each used by MR rows of x.
template <WeightFormat F, int MR, int NR, bool kTail>
LOOM_AVX512 inline void tile_step(__m512 (&acc)[MR][NR], const float* x, int64_t K,
                                  const char* w, size_t row_bytes, int64_t k, __mmask16 mask) {
  __m512 wv[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) wv[j] = load_w16<F, kTail>(w + size_t(j) * row_bytes, k, mask);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const float* xp = x + i * K + k;
    __m512 xv = kTail ? _mm512_maskz_loadu_ps(mask, xp) : _mm512_loadu_ps(xp);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
  }
}

// y[0..MR) x [n0..n0+NR) of the output. x points at the tile's first row (rows K apart), w at
// weight row n0 (rows row_bytes apart), y at (row 0, column n0). With `prefetch`, the tile also
// prefetches the NR rows that follow its own (the next tile's weights, contiguous in memory) at
// the rate it consumes its own, so the next tile finds them in cache. The tile reads NR short
// interleaved streams (a row of K = 768 int8 is 12 cache lines), which the hardware prefetchers
// follow poorly; one linear stream a tile ahead raised one core's int8 rate from DRAM by ~60%.
// Tiles over 32 KiB (long rows: f32 or bf16 with K = 3072) skip it: their rows are streams the
// hardware follows well, and a whole tile ahead no longer fits L1 (measured: 10-15% slower).
template <WeightFormat F, int MR, int NR>
LOOM_AVX512 void tile(float* y, int64_t ldy, const float* x, int64_t K, const char* w,
                      size_t row_bytes, const float* scales, const float* bias, bool prefetch) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t k_full = K / 16 * 16;
  // Bytes of the tile consumed per k-step, and the cache lines ahead to prefetch per step.
  constexpr size_t kStepBytes = size_t(NR) * 16 * (F == WeightFormat::f32    ? 4
                                                   : F == WeightFormat::bf16 ? 2
                                                                             : 1);
  constexpr int kLinesPerStep = kStepBytes < 64 ? 1 : int(kStepBytes / 64);
  // The last tile's "next" lies past the end of W: an address only (integer arithmetic, never
  // dereferenced); prefetches of unmapped addresses are dropped, they do not fault.
  const uintptr_t next = reinterpret_cast<uintptr_t>(w) + size_t(NR) * row_bytes;
  // Besides the next tile into L1, the one after it into L2 (kFarTiles tiles ahead), where the
  // tile holds few weight rows (NR = 2 at MR = 8: two streams in flight) or narrow ones (bf16,
  // int8). Measured with bench_kernels_weight_matmul (GPT-2 124M's linears from a 1 GiB arena, 2
  // threads, 3 runs each): f32 M = 8 23.6-25.1 -> 20.0-21.3 ms a step; bf16 and int8 M = 1 about
  // 6% faster, their M = 8 unchanged (compute-bound); f32 M = 1 slightly slower, so not there.
  // Further ahead was slower (4 tiles 21.0, 8 22.3, 16 25.9 ms at f32 M = 8), and so were extra
  // prefetches into L1.
  constexpr int kFarTiles = (MR > 4 || F != WeightFormat::f32) ? 2 : 0;
  const uintptr_t far = reinterpret_cast<uintptr_t>(w) + size_t(kFarTiles) * size_t(NR) * row_bytes;
  prefetch = prefetch && size_t(NR) * row_bytes <= kPrefetchMaxTileBytes;
  for (int64_t k = 0; k < k_full; k += 16) {
    if (prefetch) {
      const uintptr_t p = next + size_t(k / 16) * kStepBytes;
#pragma GCC unroll 8
      for (int l = 0; l < kLinesPerStep; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(p + 64 * size_t(l)), _MM_HINT_T0);
      if constexpr (kFarTiles > 0) {
        const uintptr_t q = far + size_t(k / 16) * kStepBytes;
#pragma GCC unroll 8
        for (int l = 0; l < kLinesPerStep; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(q + 64 * size_t(l)), _MM_HINT_T1);
      }
    }
    tile_step<F, MR, NR, false>(acc, x, K, w, row_bytes, k, 0xFFFF);
  }
  if (k_full < K)
    tile_step<F, MR, NR, true>(acc, x, K, w, row_bytes, k_full,
                               __mmask16((1u << (K - k_full)) - 1u));
  float sums[MR * NR];
  if constexpr (MR * NR >= 8) {
    sum_lanes16<MR * NR>(&acc[0][0], sums);
  } else {
#pragma GCC unroll 8
    for (int a = 0; a < MR * NR; ++a) sums[a] = sum_lanes((&acc[0][0])[a]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      float s = sums[i * NR + j];
      if constexpr (F == WeightFormat::int8_row) s *= scales[j];
      y[i * ldy + j] = bias ? s + bias[j] : s;
    }
}

using TileFn = void (*)(float*, int64_t, const float*, int64_t, const char*, size_t,
                        const float*, const float*, bool);

// Tile functions by [MR - 1][log2 NR]. MR * NR accumulators plus NR weight vectors and one x
// vector must fit the 32 vector registers: NR = 8 for MR <= 2, 4 for MR <= 4, else 2. At M = 1
// eight weight rows in flight beat four by ~12% on int8 (more independent FMA chains and
// streams, half the tiles' fixed cost).
template <WeightFormat F, int MR>
constexpr TileFn tile_for(int nr_log2) {
  if (nr_log2 == 0) return &tile<F, MR, 1>;
  if (nr_log2 == 1) return &tile<F, MR, 2>;
  if constexpr (MR <= 4) {
    if (nr_log2 == 2) return &tile<F, MR, 4>;
  }
  if constexpr (MR <= 2) return &tile<F, MR, 8>;
  return nullptr;  // never chosen: weight_matmul_avx512 caps NR at 2 for MR > 4
}

template <WeightFormat F>
struct TileTable {
  TileFn fn[kMaxRowsX][4];
  constexpr TileTable() : fn{} {
    fill<1>();
  }
  template <int MR>
  constexpr void fill() {
    for (int l = 0; l < 4; ++l) fn[MR - 1][l] = tile_for<F, MR>(l);
    if constexpr (MR < kMaxRowsX) fill<MR + 1>();
  }
};

// Runs fn(b) for every b in [0, n) on the OpenMP threads. Each thread owns one contiguous
// range (its 1/T of [0, n)) and claims it front to back in chunks of kChunk; a thread done with
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
  if (threads <= 1 || n <= kChunk) {
    for (int64_t b = 0; b < n; ++b) fn(b);
    return;
  }
  Next next[kMaxOwners];
#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), me = omp_get_thread_num();
    for (int v = 0; v < T; ++v) {
      const int r = (me + v) % T;  // own range first, then the others' in turn
      const int64_t lo = n * r / T, hi = n * (r + 1) / T;
      for (;;) {
        const int64_t b0 = lo + next[r].v.fetch_add(kChunk, std::memory_order_relaxed);
        if (b0 >= hi) break;
        for (int64_t b = b0; b < std::min(hi, b0 + kChunk); ++b) fn(b);
      }
    }
  }
}

template <WeightFormat F>
LOOM_AVX512 void weight_matmul_avx512(float* y, int64_t ldy, const float* x, int64_t M,
                                      const WeightView& w, const float* bias) {
  static constexpr TileTable<F> kTiles;
  const int64_t N = w.N, K = w.K;
  const size_t elem = F == WeightFormat::f32 ? 4 : F == WeightFormat::bf16 ? 2 : 1;
  const size_t row_bytes = size_t(K) * elem;
  const char* wdata = static_cast<const char*>(w.data);
  const int64_t n_blocks = (N + kRowsW - 1) / kRowsW;
  // Within a block of kRowsW weight rows a thread walks every row of x, so W is read from memory
  // once per call whatever M (for M > 8 the later tiles find the block's rows in L1/L2).
  auto block = [&](int64_t b) {
    const int64_t n_begin = b * kRowsW, n_end = std::min(N, n_begin + kRowsW);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsX) {
      const int mr = int(std::min<int64_t>(kMaxRowsX, M - m0));
      const int nr_max_log2 = mr <= 2 ? 3 : mr <= 4 ? 2 : 1;
      for (int64_t n0 = n_begin; n0 < n_end;) {
        int l = nr_max_log2;
        while ((int64_t(1) << l) > n_end - n0) --l;
        kTiles.fn[mr - 1][l](y + m0 * ldy + n0, ldy, x + m0 * K, K, wdata + size_t(n0) * row_bytes,
                             row_bytes, w.scales ? w.scales + n0 : nullptr,
                             bias ? bias + n0 : nullptr, /*prefetch=*/m0 == 0);
        n0 += int64_t(1) << l;
      }
    }
  };
  for_blocks_owned_first(n_blocks, block);
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace

void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias) {
  const int64_t N = w.N, K = w.K;
  if (ldy == 0) ldy = N;
  check_args("weight_matmul_reference", y, ldy, x, M, w);
  if (M == 0 || N == 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;  // (K)
      float acc = 0.f;
      switch (w.format) {
        case WeightFormat::f32: {
          const float* wr = static_cast<const float*>(w.data) + n * K;  // (K)
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * wr[k];
          break;
        }
        case WeightFormat::bf16: {
          const bf16* wd = static_cast<const bf16*>(w.data);
          if (w.layout == WeightLayout::amx_tiles) {
            for (int64_t k = 0; k < K; ++k)
              acc += xr[k] * bf16_to_f32(wd[amx_tiles_index(n, k, K)]);
          } else {
            const bf16* wr = wd + n * K;  // (K)
            for (int64_t k = 0; k < K; ++k) acc += xr[k] * bf16_to_f32(wr[k]);
          }
          break;
        }
        case WeightFormat::int8_row: {
          const int8_t* wr = static_cast<const int8_t*>(w.data) + n * K;  // (K)
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * float(wr[k]);
          acc *= w.scales[n];
          break;
        }
      }
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias) {
  const int64_t N = w.N;
  if (ldy == 0) ldy = N;
  check_args("weight_matmul", y, ldy, x, M, w);
  if (M == 0 || N == 0) return;
  if (w.layout == WeightLayout::amx_tiles) {  // only the AMX kernel reads tile order fast
    if (detail::weight_matmul_amx(y, ldy, x, M, w, bias)) return;
    return weight_matmul_reference(y, ldy, x, M, w, bias);
  }
  if (!weight_matmul_uses_avx512()) return weight_matmul_reference(y, ldy, x, M, w, bias);
  switch (w.format) {
    case WeightFormat::f32: return weight_matmul_avx512<WeightFormat::f32>(y, ldy, x, M, w, bias);
    case WeightFormat::bf16: return weight_matmul_avx512<WeightFormat::bf16>(y, ldy, x, M, w, bias);
    case WeightFormat::int8_row:
      return weight_matmul_avx512<WeightFormat::int8_row>(y, ldy, x, M, w, bias);
  }
  LOOM_ASSERT(false, "weight_matmul: unknown WeightFormat {}", int(w.format));
}

bool weight_matmul_uses_avx512() {
  static const bool kAvx512 = cpu_has_avx512();  // a property of the CPU, fixed for the process
  return kAvx512;
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
