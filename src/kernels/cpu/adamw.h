// kernels/cpu/adamw.h: one AdamW update over a flat f32 buffer (torch.optim.AdamW semantics).
//
// With g = grad * grad_scale (grad_scale carries gradient clipping / loss scaling), t = step >= 1:
//   p -= lr * weight_decay * p
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// This is torch.optim.AdamW with amsgrad=False, maximize=False, in the operation order of its
// single-tensor path (the scalar coefficients are formed in f64, as Python does, then rounded
// to f32). Shapes: param, grad, m, v (n). Updates param, m and v in place.
// Failure: step < 1 throws loom::Error.
#pragma once

#include <cstdint>

namespace loom::kernels {

void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step,
                float grad_scale);

}  // namespace loom::kernels
