// kernels/ref/elementwise_ref.cpp
#include "kernels/ref/elementwise_ref.h"

namespace loom::kernels::ref {

void bias_add_rows(double* y, const double* bias, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
}
void bias_backward(double* dbias, const double* dy, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) dbias[j] += dy[r * n + j];
}
void add_inplace(double* y, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}
void scale_inplace(double* y, double s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= s;
}

}  // namespace loom::kernels::ref
