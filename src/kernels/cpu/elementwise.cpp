// kernels/cpu/elementwise.cpp
// Glossary: rows = B*T, n = row length.
#include "kernels/cpu/elementwise.h"

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core/error.h"

namespace loom::kernels {

namespace {
// Column block per thread task in column reductions: 64 floats = 4 AVX-512 registers' worth and
// one 256-byte stretch per row, enough tasks (n/64) to keep two cores busy at n = 768.
constexpr int64_t kColBlock = 64;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;
}  // namespace

void bias_add_rows(float* y, const float* bias, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * n;  // (n)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] += bias[j];
  }
}

void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t n) {
  const int64_t n_blocks = (n + kColBlock - 1) / kColBlock;
  // Each task owns kColBlock columns and walks the rows in order: no shared accumulators, and
  // the summation order does not depend on the number of threads.
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * kColBlock, j1 = std::min(n, j0 + kColBlock);
    float acc[kColBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* dyr = dy + r * n;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += dyr[j];
    }
    for (int64_t j = j0; j < j1; ++j) dbias[j] += acc[j - j0];
  }
}

void add_inplace(float* y, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void scale_inplace(float* y, float s, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] *= s;
}

int64_t argmax_first(const float* x, int64_t n) {
  LOOM_CHECK(n >= 0 && n < (int64_t(1) << 31), "argmax_first: n = {} must be in [0, 2^31)", n);
  int64_t i = 0, arg = -1;
  float best = -INFINITY;
#if defined(__AVX512F__)
  if (n >= 16) {
    // Per lane: the first strictly larger value (ordered compare: NaN never wins) and its index;
    // then the largest lane value, and among the lanes holding it the smallest index.
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_set1_epi32(-1);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, mx, _CMP_GT_OQ);
      mx = _mm512_mask_mov_ps(mx, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, iv);
      iv = _mm512_add_epi32(iv, step);
    }
    alignas(64) float lv[16];
    alignas(64) int32_t li[16];
    _mm512_store_ps(lv, mx);
    _mm512_store_si512(reinterpret_cast<__m512i*>(li), at);
    for (int l = 0; l < 16; ++l)
      if (li[l] >= 0 && (lv[l] > best || (lv[l] == best && li[l] < arg))) {
        best = lv[l];
        arg = li[l];
      }
  }
#endif
  for (; i < n; ++i)
    if (x[i] > best) {
      best = x[i];
      arg = i;
    }
  return arg;
}

}  // namespace loom::kernels
