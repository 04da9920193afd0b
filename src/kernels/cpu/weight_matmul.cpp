// kernels/cpu/weight_matmul.cpp: the plain version of the contract in weight_matmul.h: one dot
// product per (m, n) in ascending k, in double-free f32 with a fixed order (batch invariant).
// Correct and simple; the fast vectorised kernels replace the inner loops.
#include "kernels/cpu/weight_matmul.h"

#include <cmath>

#include "core/error.h"

namespace loom::kernels {

void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias) {
  const int64_t N = w.N, K = w.K;
  if (ldy == 0) ldy = N;
  LOOM_CHECK(M >= 0 && N >= 0 && K >= 0, "weight_matmul: sizes M={} N={} K={} must be >= 0", M,
             N, K);
  LOOM_CHECK(ldy >= N, "weight_matmul: ldy={} must be >= N={}", ldy, N);
  if (M == 0 || N == 0) return;
  LOOM_CHECK(y && x && (w.data || K == 0), "weight_matmul: null buffer for M={} N={} K={}", M, N,
             K);
  LOOM_CHECK(w.format != WeightFormat::int8_row || w.scales,
             "weight_matmul: int8_row weight needs scales");
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      switch (w.format) {
        case WeightFormat::f32: {
          const float* wr = static_cast<const float*>(w.data) + n * K;
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * wr[k];
          break;
        }
        case WeightFormat::bf16: {
          const bf16* wr = static_cast<const bf16*>(w.data) + n * K;
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * bf16_to_f32(wr[k]);
          break;
        }
        case WeightFormat::int8_row: {
          const int8_t* wr = static_cast<const int8_t*>(w.data) + n * K;
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * float(wr[k]);
          acc *= w.scales[n];
          break;
        }
      }
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void quantize_rows_int8(int8_t* q, float* scales, const float* W, int64_t N, int64_t K) {
  LOOM_CHECK(N >= 0 && K >= 0, "quantize_rows_int8: sizes N={} K={} must be >= 0", N, K);
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = W + n * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      LOOM_CHECK(std::isfinite(wr[k]), "quantize_rows_int8: weight row {} column {} is {}", n, k,
                 wr[k]);
      amax = std::fmax(amax, std::fabs(wr[k]));
    }
    const float s = amax / 127.f;
    scales[n] = s;
    for (int64_t k = 0; k < K; ++k)
      q[n * K + k] = s == 0.f ? int8_t(0) : int8_t(std::lrint(std::fmin(127.f, std::fmax(-127.f, wr[k] / s))));
  }
}

}  // namespace loom::kernels
