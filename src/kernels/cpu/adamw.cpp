// kernels/cpu/adamw.cpp
#include "kernels/cpu/adamw.h"

#include <cmath>

#include "core/error.h"

namespace loom::kernels {

void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step,
                float grad_scale) {
  LOOM_CHECK(step >= 1, "adamw_step: step={} must be >= 1 (the first update is step 1)", step);
  // Scalars exactly as torch's Python code forms them (double arithmetic), then used at f32.
  const double bias_correction1 = 1.0 - std::pow(double(beta1), double(step));
  const double bias_correction2 = 1.0 - std::pow(double(beta2), double(step));
  const float decay = float(1.0 - double(lr) * double(weight_decay));
  const float b1 = beta1, one_minus_b1 = float(1.0 - double(beta1));
  const float b2 = beta2, one_minus_b2 = float(1.0 - double(beta2));
  const float neg_step_size = float(-(double(lr) / bias_correction1));
  const float bc2_sqrt = float(std::sqrt(bias_correction2));
#pragma omp parallel for simd schedule(static) if (parallel : n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * grad_scale;
    float p = param[i] * decay;
    const float mi = m[i] * b1 + one_minus_b1 * g;
    const float vi = v[i] * b2 + one_minus_b2 * g * g;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    // Explicit fma: the scalar loop contracted it this way (p*decay rounded first); left to
    // -ffp-contract the vectorised loop fuses param*decay instead and the bits change.
    p = std::fma(neg_step_size, mi / denom, p);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
  }
}

}  // namespace loom::kernels
