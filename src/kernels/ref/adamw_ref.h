// kernels/ref/adamw_ref.h: float64 AdamW (the formula in cpu/adamw.h, evaluated in double).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void adamw_step(double* param, const double* grad, double* m, double* v, int64_t n, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step,
                double grad_scale);

}  // namespace loom::kernels::ref
