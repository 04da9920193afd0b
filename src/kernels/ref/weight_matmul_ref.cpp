// kernels/ref/weight_matmul_ref.cpp
#include "kernels/ref/weight_matmul_ref.h"

#include "core/dtype.h"
#include "core/error.h"

namespace loom::kernels::ref {

std::vector<double> weight_to_f64(const WeightView& w) {
  LOOM_CHECK(w.N >= 0 && w.K >= 0, "ref::weight_to_f64: sizes N={} K={} must be >= 0", w.N, w.K);
  std::vector<double> out(size_t(w.N * w.K));  // (N, K)
  for (int64_t n = 0; n < w.N; ++n)
    for (int64_t k = 0; k < w.K; ++k) {
      const int64_t i = weight_element_index(w, n, k);  // in w's layout
      double& o = out[size_t(n * w.K + k)];
      switch (w.format) {
        case WeightFormat::f32: o = static_cast<const float*>(w.data)[i]; break;
        case WeightFormat::bf16: o = bf16_to_f32(static_cast<const bf16*>(w.data)[i]); break;
        case WeightFormat::int8_row:
          o = double(w.scales[n]) * static_cast<const int8_t*>(w.data)[i];
          break;
      }
    }
  return out;
}

void weight_matmul(double* y, int64_t ldy, const double* x, int64_t M, const double* W, int64_t N,
                   int64_t K, const double* bias) {
  if (ldy == 0) ldy = N;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * W[n * K + k];
      y[m * ldy + n] = s + (bias ? bias[n] : 0.0);
    }
}

}  // namespace loom::kernels::ref
