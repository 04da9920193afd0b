// kernels/cpu/weight_matmul.cpp: y (M, N) = x (M, K) @ W^T + bias with W (N, K) in f32, bf16 or
// int8 rows. Two implementations of the contract in weight_matmul.h, with the same bits:
// - weight_matmul_reference: one fma chain per (m, n) over ascending k, any layout. Plain and
//   obviously right; the fallback on CPUs without AVX-512 and for row-order views.
// - the AVX-512 kernel below, on the panel layout, for every M: decode (M = 1..8) streams W once
//   and widens it in registers; batches and prefill share each widened weight vector among up to
//   8 rows of x and run near the FMA peak.
//
// Why f32 x with widened weights rather than vdpbf16ps for bf16: vdpbf16ps would round x to bf16,
// changing the numerics for a weight-only format, and decode sizes are memory-bound anyway: the
// widening costs one or two ALU ops per 16 weights (shift for bf16, int->float convert for int8)
// beside the FMA, shared by every row of x in the tile. Where AMX tiles exist, the inference
// weights store bf16 linears in tile order at load and weight_matmul_amx.cpp runs them at every M
// (x kept exact by splitting it into three bf16 parts).
#include "kernels/cpu/weight_matmul.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

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
  LOOM_CHECK(w.layout != WeightLayout::amx_tiles ||
                 (w.format == WeightFormat::bf16 && K > 0 && K % 32 == 0),
             "{}: a tile-order weight (N={}, K={}) must be bf16 with K a multiple of 32", fn, N, K);
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

template <WeightFormat F>
constexpr size_t kElemBytes = F == WeightFormat::f32 ? 4 : F == WeightFormat::bf16 ? 2 : 1;

// The 16 weights of one panel at one k, widened to f32 (exact for bf16 and int8).
template <WeightFormat F>
LOOM_AVX512 inline __m512 load_panel_k(const char* p) {
  if constexpr (F == WeightFormat::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (F == WeightFormat::bf16) {
    // bf16 is the top half of an f32: zero-extend to 32 bits and shift left by 16.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
}

// y[0..MR) x [0..16 NR) of the output (columns at or past `cols` are not written: the last
// panel's padding). x: the tile's first row (rows K apart); w: its first panel (panels
// panel_bytes apart); scales and bias point at the tile's first column (or are null).
template <WeightFormat F, int MR, int NR>
LOOM_AVX512 void panel_tile(float* y, int64_t ldy, const float* x, int64_t K, const char* w,
                            size_t panel_bytes, const float* scales, const float* bias,
                            int64_t cols) {
  constexpr size_t kStep = kPanel * kElemBytes<F>;  // bytes of one panel per k
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = load_panel_k<F>(w + size_t(j) * panel_bytes + size_t(k) * kStep);
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
    __m512 s = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    if constexpr (F == WeightFormat::int8_row) s = _mm512_maskz_loadu_ps(mask, scales + kPanel * j);
    if (bias) b = _mm512_maskz_loadu_ps(mask, bias + kPanel * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m512 v = acc[i][j];
      if constexpr (F == WeightFormat::int8_row) v = _mm512_mul_ps(v, s);
      if (bias) v = _mm512_add_ps(v, b);
      _mm512_mask_storeu_ps(y + i * ldy + kPanel * j, mask, v);
    }
  }
}

using PanelTileFn = void (*)(float*, int64_t, const float*, int64_t, const char*, size_t,
                             const float*, const float*, int64_t);

// Tile shapes: MR in {1, 2, 4, 8} (other M are split into these), NR panels up to kMaxNr(MR):
// MR x NR accumulators + NR weight vectors + one broadcast x fit the 32 vector registers, and NR
// below the maximum serves a block's last panels. At M = 1 eight panels in flight (eight
// independent FMA chains, eight streams) keep the FMA latency hidden.
constexpr int kMrSizes[] = {1, 2, 4, 8};
constexpr int kMaxNr(int mr) { return mr <= 2 ? 8 : mr == 4 ? 4 : 3; }

template <WeightFormat F>
struct PanelTiles {
  PanelTileFn fn[4][8];  // [index of MR in kMrSizes][NR - 1]
  constexpr PanelTiles() : fn{} {
    fill<0, 1>();
  }
  template <int mi, int nr>
  constexpr void fill() {
    constexpr int mr = kMrSizes[mi];
    fn[mi][nr - 1] = &panel_tile<F, mr, nr>;
    if constexpr (nr < kMaxNr(mr)) {
      fill<mi, nr + 1>();
    } else if constexpr (mi + 1 < 4) {
      fill<mi + 1, 1>();
    }
  }
};

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
                                      const WeightView& w, const float* bias) {
  static constexpr PanelTiles<F> kTiles;
  const int64_t N = w.N, K = w.K;
  const int64_t P = (N + kPanel - 1) / kPanel;  // panels
  const size_t panel_bytes = size_t(kPanel * K) * kElemBytes<F>;
  const char* wdata = static_cast<const char*>(w.data);
  // Blocks of up to 8 panels, fewer when that leaves a thread without one (small N).
  const int64_t threads = std::max(1, omp_get_max_threads());
  const int64_t per_block = std::clamp<int64_t>((P + threads - 1) / threads, 1, kBlockPanels);
  const int64_t n_blocks = (P + per_block - 1) / per_block;
  // Within a block a thread walks every row of x, so W is read from memory once per call
  // whatever M (the later row tiles find the block's panels in L1/L2).
  auto block = [&](int64_t b) {
    const int64_t p_begin = b * per_block, p_end = std::min(P, p_begin + per_block);
    for (int64_t m0 = 0; m0 < M;) {
      const int mi = M - m0 >= 8 ? 3 : M - m0 >= 4 ? 2 : M - m0 >= 2 ? 1 : 0;
      const int mr = kMrSizes[mi];
      for (int64_t p = p_begin; p < p_end;) {
        const int nr = int(std::min<int64_t>(kMaxNr(mr), p_end - p));
        kTiles.fn[mi][nr - 1](y + m0 * ldy + p * kPanel, ldy, x + m0 * K, K,
                              wdata + size_t(p) * panel_bytes, panel_bytes,
                              w.scales ? w.scales + p * kPanel : nullptr,
                              bias ? bias + p * kPanel : nullptr, N - p * kPanel);
        p += nr;
      }
      m0 += mr;
    }
  };
  for_blocks_owned_first(n_blocks, block);
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace

int64_t panels_elements(int64_t N, int64_t K) { return (N + kPanel - 1) / kPanel * kPanel * K; }

int64_t panels_index(int64_t n, int64_t k, int64_t K) {
  return n / kPanel * kPanel * K + k * kPanel + n % kPanel;
}

int64_t weight_element_index(const WeightView& w, int64_t n, int64_t k) {
  switch (w.layout) {
    case WeightLayout::rows: return n * w.K + k;
    case WeightLayout::amx_tiles: return amx_tiles_index(n, k, w.K);
    case WeightLayout::panels: return panels_index(n, k, w.K);
  }
  LOOM_ASSERT(false, "unknown WeightLayout {}", int(w.layout));
}

namespace {
template <typename T>  // float, bf16 or int8_t: element (n, k) to panels_index(n, k, K)
void pack_panels_as(T* dst, const T* W, int64_t N, int64_t K) {
  const int64_t P = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    T* d = dst + p * kPanel * K;  // (K, 16): this panel
    std::memset(static_cast<void*>(d), 0, size_t(kPanel * K) * sizeof(T));  // padding: zeros
    for (int64_t n = p * kPanel; n < std::min(N, (p + 1) * kPanel); ++n)
      for (int64_t k = 0; k < K; ++k) d[k * kPanel + n % kPanel] = W[n * K + k];
  }
}
}  // namespace

void pack_panels(void* dst, const void* W, WeightFormat format, int64_t N, int64_t K) {
  LOOM_CHECK(N >= 0 && K >= 0, "pack_panels: sizes N={} K={} must be >= 0", N, K);
  switch (format) {
    case WeightFormat::f32:
      return pack_panels_as(static_cast<float*>(dst), static_cast<const float*>(W), N, K);
    case WeightFormat::bf16:
      return pack_panels_as(static_cast<bf16*>(dst), static_cast<const bf16*>(W), N, K);
    case WeightFormat::int8_row:
      return pack_panels_as(static_cast<int8_t*>(dst), static_cast<const int8_t*>(W), N, K);
  }
}

void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias) {
  const int64_t N = w.N, K = w.K;
  if (ldy == 0) ldy = N;
  check_args("weight_matmul_reference", y, ldy, x, M, w);
  if (M == 0 || N == 0) return;
  // The weight at (n, k) as f32, in any layout (exact: bf16 and int8 widen without rounding).
  auto weight = [&w](int64_t n, int64_t k) -> float {
    const int64_t i = weight_element_index(w, n, k);
    switch (w.format) {
      case WeightFormat::f32: return static_cast<const float*>(w.data)[i];
      case WeightFormat::bf16: return bf16_to_f32(static_cast<const bf16*>(w.data)[i]);
      case WeightFormat::int8_row: return float(static_cast<const int8_t*>(w.data)[i]);
    }
    return 0.f;
  };
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;  // (K)
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(xr[k], weight(n, k), acc);
      if (w.format == WeightFormat::int8_row) acc *= w.scales[n];
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
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
  if (w.layout != WeightLayout::panels || !weight_matmul_uses_avx512())
    return weight_matmul_reference(y, ldy, x, M, w, bias);
  switch (w.format) {
    case WeightFormat::f32: return weight_matmul_panels<WeightFormat::f32>(y, ldy, x, M, w, bias);
    case WeightFormat::bf16: return weight_matmul_panels<WeightFormat::bf16>(y, ldy, x, M, w, bias);
    case WeightFormat::int8_row:
      return weight_matmul_panels<WeightFormat::int8_row>(y, ldy, x, M, w, bias);
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
