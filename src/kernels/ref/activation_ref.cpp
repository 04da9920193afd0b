// kernels/ref/activation_ref.cpp: written with tanh directly (the fast kernel uses the sigmoid
// identity), so the two are independent.
#include "kernels/ref/activation_ref.h"

#include <cmath>

namespace loom::kernels::ref {

namespace {
const double kSqrt2OverPi = std::sqrt(2.0 / M_PI);
constexpr double kCubic = 0.044715;
constexpr double kAlpha = 1.702;
double gelu(double x) { return 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + kCubic * x * x * x))); }
double fast_gelu(double x) { return x / (1.0 + std::exp(-kAlpha * x)); }
}  // namespace

void gelu_forward(double* out, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu(x[i]);
}
void gelu_backward(double* dx, const double* dout, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double xi = x[i];
    double t = std::tanh(kSqrt2OverPi * (xi + kCubic * xi * xi * xi));
    double dz = kSqrt2OverPi * (1.0 + 3.0 * kCubic * xi * xi);
    dx[i] = dout[i] * (0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * dz);
  }
}
// Exact GELU written as x * Phi(x) with Phi via erfc (accurate for large negative x, where
// 1 + erf cancels); the fast kernel uses 1 + erf in f32.
void gelu_erf_forward(double* out, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * 0.5 * std::erfc(-x[i] / std::sqrt(2.0));
}
void gelu_erf_backward(double* dx, const double* dout, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double cdf = 0.5 * std::erfc(-x[i] / std::sqrt(2.0));
    double pdf = std::exp(-0.5 * x[i] * x[i]) / std::sqrt(2.0 * M_PI);
    dx[i] = dout[i] * (cdf + x[i] * pdf);
  }
}
void fast_gelu_forward(double* out, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = fast_gelu(x[i]);
}
void fast_gelu_backward(double* dx, const double* dout, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double s = 1.0 / (1.0 + std::exp(-kAlpha * x[i]));
    dx[i] = dout[i] * (s + kAlpha * x[i] * s * (1.0 - s));
  }
}
void bias_gelu_forward(double* out, double* y, const double* bias, int64_t rows, int64_t n,
                       bool fast) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      double v = y[r * n + j] + bias[j];
      y[r * n + j] = v;
      out[r * n + j] = fast ? fast_gelu(v) : gelu(v);
    }
}

}  // namespace loom::kernels::ref
