// kernels/cpu/activation.h: GELU (tanh form) and FastGELU, forward and backward (f32, OpenMP).
//
//   gelu(x)      = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))     (GPT-2, PanGu-alpha)
//   fast_gelu(x) = x * sigmoid(1.702 x)                                 (MindSpore FastGelu)
// Shapes: all buffers (n) dense f32. Backward OVERWRITES dx with dout * act'(x).
// bias_gelu_forward: y (rows,n) is overwritten with y + bias(n) (the pre-activation backward
// needs), and out (rows,n) = act(y + bias); `fast` picks FastGELU. out must not alias y.
// Accuracy: a few f32 ulp (exp is our own vectorised polynomial, see vec_math.h).
#pragma once

#include <cstdint>

namespace loom::kernels {

void gelu_forward(float* out, const float* x, int64_t n);
void gelu_backward(float* dx, const float* dout, const float* x, int64_t n);
void fast_gelu_forward(float* out, const float* x, int64_t n);
void fast_gelu_backward(float* dx, const float* dout, const float* x, int64_t n);
void bias_gelu_forward(float* out, float* y, const float* bias, int64_t rows, int64_t n, bool fast);

}  // namespace loom::kernels
