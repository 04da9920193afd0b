// kernels/cpu/elementwise.cpp
// Glossary: rows = B*T, n = row length.
#include "kernels/cpu/elementwise.h"

#include <algorithm>

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

}  // namespace loom::kernels
