// kernels/ref/elementwise_ref.h: float64 references for cpu/elementwise.h (same contracts).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void bias_add_rows(double* y, const double* bias, int64_t rows, int64_t n);
void bias_backward(double* dbias, const double* dy, int64_t rows, int64_t n);
void add_inplace(double* y, const double* x, int64_t n);
void scale_inplace(double* y, double s, int64_t n);

}  // namespace loom::kernels::ref
