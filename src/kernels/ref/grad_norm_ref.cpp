// kernels/ref/grad_norm_ref.cpp
#include "kernels/ref/grad_norm_ref.h"

#include <algorithm>

namespace loom::kernels::ref {

double sum_squares(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

double clip_factor(double total_norm, double max_norm) {
  return std::min(1.0, max_norm / (total_norm + 1e-6));
}

}  // namespace loom::kernels::ref
