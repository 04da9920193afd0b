// kernels/cpu/layernorm.cpp
// Glossary: N rows, C row length.
//
// Statistics are two-pass in f32 (mean, then the mean of squared deviations): one pass with
// E[x^2] - E[x]^2 cancels badly when |mean| >> std, which happens in residual streams.
#include "kernels/cpu/layernorm.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace loom::kernels {

namespace {
constexpr int64_t kColBlock = 64;  // columns per task in the dw/db reduction
constexpr int64_t kParallelMin = 1 << 14;
// The forward over rows is split at a quarter of that: a batch-32 decode step's LayerNorms
// (32 x 256 elements, eleven a step for codegeex-small) ran on one thread while the other
// waited in the team's barrier.
constexpr int64_t kForwardParallelMin = 1 << 12;
}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int64_t N, int64_t C, float eps) {
  LOOM_CHECK(N >= 0 && C > 0, "layernorm_forward needs N >= 0 and C > 0, got N={} C={}", N, C);
  const float inv_c = 1.0f / float(C);
#pragma omp parallel for schedule(static) if (N > 1 && N * C > kForwardParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * C;  // (C)
    float* outr = out + r * C;    // (C)
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < C; ++i) sum += xr[i];
    const float m = sum * inv_c;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < C; ++i) {
      float d = xr[i] - m;
      sq += d * d;
    }
    const float s = 1.0f / std::sqrt(sq * inv_c + eps);
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) outr[i] = (xr[i] - m) * s * w[i] + b[i];
    if (mean) mean[r] = m;
    if (rstd) rstd[r] = s;
  }
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C) {
  LOOM_CHECK(N >= 0 && C > 0, "layernorm_backward needs N >= 0 and C > 0, got N={} C={}", N, C);
  const float inv_c = 1.0f / float(C);
  // Pass 1: dx, one row per iteration.
#pragma omp parallel for schedule(static) if (N * C > kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * C;     // (C)
    const float* dor = dout + r * C;  // (C)
    float* dxr = dx + r * C;          // (C)
    const float m = mean[r], s = rstd[r];
    float g_mean = 0.0f, gx_mean = 0.0f;
#pragma omp simd reduction(+ : g_mean, gx_mean)
    for (int64_t i = 0; i < C; ++i) {
      float g = dor[i] * w[i];
      g_mean += g;
      gx_mean += g * (xr[i] - m) * s;
    }
    g_mean *= inv_c;
    gx_mean *= inv_c;
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) {
      float xhat = (xr[i] - m) * s;
      dxr[i] += s * (dor[i] * w[i] - g_mean - xhat * gx_mean);
    }
  }
  // Pass 2: dw and db, each task owning a block of columns and walking rows in order, so the sum
  // is deterministic without atomics or per-thread partial buffers.
  const int64_t n_blocks = (C + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (N * C > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * kColBlock, j1 = std::min(C, j0 + kColBlock);
    float dw_acc[kColBlock] = {}, db_acc[kColBlock] = {};
    for (int64_t r = 0; r < N; ++r) {
      const float* xr = x + r * C;
      const float* dor = dout + r * C;
      const float m = mean[r], s = rstd[r];
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        dw_acc[j - j0] += dor[j] * (xr[j] - m) * s;
        db_acc[j - j0] += dor[j];
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      dw[j] += dw_acc[j - j0];
      db[j] += db_acc[j - j0];
    }
  }
}

}  // namespace loom::kernels
