// kernels/cpu/activation.h: GELU (tanh form), exact GELU (erf) and FastGELU, forward and
// backward (f32, OpenMP).
//
//   gelu(x)      = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))     (GPT-2, PanGu-alpha)
//   gelu_erf(x)  = 0.5 x (1 + erf(x / sqrt(2)))                         (BERT, HF "gelu")
//   fast_gelu(x) = x * sigmoid(1.702 x)                                 (MindSpore FastGelu)
// Shapes: all buffers (n) dense f32. Backward OVERWRITES dx with dout * act'(x).
// bias_gelu_forward: y (rows,n) is overwritten with y + bias(n) (the pre-activation backward
// needs), and out (rows,n) = act(y + bias); `fast` picks FastGELU, `kind` any of the three.
// out must not alias y.
// Accuracy: a few f32 ulp (exp is our own vectorised polynomial, see vec_math.h; erf is libm's
// erff, correctly rounded to about 1 ulp).
#pragma once

#include <cstdint>

namespace loom::kernels {

enum class GeluKind { tanh, erf, fast };

void gelu_forward(float* out, const float* x, int64_t n);
void gelu_backward(float* dx, const float* dout, const float* x, int64_t n);
void fast_gelu_forward(float* out, const float* x, int64_t n);
void fast_gelu_backward(float* dx, const float* dout, const float* x, int64_t n);
void gelu_erf_forward(float* out, const float* x, int64_t n);
void gelu_erf_backward(float* dx, const float* dout, const float* x, int64_t n);
void bias_gelu_forward(float* out, float* y, const float* bias, int64_t rows, int64_t n, bool fast);
void bias_gelu_forward(float* out, float* y, const float* bias, int64_t rows, int64_t n,
                       GeluKind kind);
// out[j] = act(x[j]) for j < n on the calling thread (no OpenMP); out may equal x. Per element
// the arithmetic of bias_gelu_forward's `out` (given its y + bias): weight_matmul's fused
// GELU epilogue (weight_matmul.h) calls it on each tile's rows.
void gelu_row(GeluKind kind, float* out, const float* x, int64_t n);
// Dispatch by kind (same contracts as the functions above).
void gelu_kind_forward(GeluKind kind, float* out, const float* x, int64_t n);
void gelu_kind_backward(GeluKind kind, float* dx, const float* dout, const float* x, int64_t n);

}  // namespace loom::kernels
