// kernels/cpu/layernorm.h: LayerNorm over the last dimension (f32, one row per OpenMP iteration).
//
// Glossary: N rows (e.g. B*T), C row length (model width).
//   forward:  mean_r = avg(x_r), rstd_r = 1/sqrt(var_r + eps) (biased variance),
//             out_r = (x_r - mean_r) * rstd_r * w + b.
//   backward: with xhat = (x - mean)*rstd and g = dout*w,
//             dx += rstd * (g - avg(g) - xhat * avg(g*xhat)), dw += sum_r dout*xhat, db += sum_r dout.
// Shapes: x, out, dout, dx (N,C); w, b, dw, db (C); mean, rstd (N).
// mean and rstd are written by forward for backward; either may be null (inference).
// Backward ACCUMULATES into dx, dw and db. Deterministic and independent of the thread count
// (dw and db are reduced per column block, rows in order).
#pragma once

#include <cstdint>

namespace loom::kernels {

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w,
                       const float* b, int64_t N, int64_t C, float eps);
void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C);

}  // namespace loom::kernels
