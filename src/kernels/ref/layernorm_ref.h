// kernels/ref/layernorm_ref.h: float64 LayerNorm, the reference for cpu/layernorm.h.
// Same contract (biased variance, eps inside the sqrt, backward accumulates into dx, dw, db).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void layernorm_forward(double* out, double* mean, double* rstd, const double* x, const double* w,
                       const double* b, int64_t N, int64_t C, double eps);
void layernorm_backward(double* dx, double* dw, double* db, const double* dout, const double* x,
                        const double* w, const double* mean, const double* rstd, int64_t N,
                        int64_t C);

}  // namespace loom::kernels::ref
