// kernels/ref/activation_ref.h: float64 GELU (tanh form), exact GELU (erf) and FastGELU, references for
// cpu/activation.h (same contracts; backward overwrites dx).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void gelu_forward(double* out, const double* x, int64_t n);
void gelu_backward(double* dx, const double* dout, const double* x, int64_t n);
void fast_gelu_forward(double* out, const double* x, int64_t n);
void fast_gelu_backward(double* dx, const double* dout, const double* x, int64_t n);
void gelu_erf_forward(double* out, const double* x, int64_t n);
void gelu_erf_backward(double* dx, const double* dout, const double* x, int64_t n);
void bias_gelu_forward(double* out, double* y, const double* bias, int64_t rows, int64_t n,
                       bool fast);

}  // namespace loom::kernels::ref
