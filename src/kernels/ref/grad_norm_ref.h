// kernels/ref/grad_norm_ref.h: float64 references for cpu/grad_norm.h.
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

double sum_squares(const double* x, int64_t n);       // serial sum of x[i]^2
double clip_factor(double total_norm, double max_norm);  // min(1, max_norm / (total_norm + 1e-6))

}  // namespace loom::kernels::ref
