// kernels/cpu/grad_norm.cpp
#include "kernels/cpu/grad_norm.h"

#include <algorithm>
#include <vector>

namespace loom::kernels {

double sum_squares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t n_chunks = (n + kSumSquaresChunk - 1) / kSumSquaresChunk;
  std::vector<double> partial(static_cast<size_t>(n_chunks));  // (n_chunks)
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i0 = c * kSumSquaresChunk, i1 = std::min(n, i0 + kSumSquaresChunk);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += double(x[i]) * double(x[i]);
    partial[size_t(c)] = s;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

float clip_factor(double total_norm, float max_norm) {
  // torch computes clip_coef = max_norm / (total_norm + 1e-6) and clamps it to at most 1.
  double coef = double(max_norm) / (total_norm + 1e-6);
  return float(std::min(1.0, coef));
}

}  // namespace loom::kernels
