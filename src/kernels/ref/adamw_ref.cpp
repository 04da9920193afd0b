// kernels/ref/adamw_ref.cpp
#include "kernels/ref/adamw_ref.h"

#include <cmath>

#include "core/error.h"

namespace loom::kernels::ref {

void adamw_step(double* param, const double* grad, double* m, double* v, int64_t n, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step,
                double grad_scale) {
  LOOM_CHECK(step >= 1, "adamw_step: step={} must be >= 1", step);
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  for (int64_t i = 0; i < n; ++i) {
    double g = grad[i] * grad_scale;
    param[i] -= lr * weight_decay * param[i];
    m[i] = beta1 * m[i] + (1.0 - beta1) * g;
    v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
    param[i] -= lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
  }
}

}  // namespace loom::kernels::ref
