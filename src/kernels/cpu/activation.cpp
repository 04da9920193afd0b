// kernels/cpu/activation.cpp
//
// GELU's tanh form is evaluated through a sigmoid: 0.5 (1 + tanh(z)) = sigmoid(2z), so
//   gelu(x)  = x * s,                  s = sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = s + 2 x s (1 - s) z',   z' = sqrt(2/pi) (1 + 3*0.044715 x^2)
// (sech^2 z = 4 s (1 - s)). This avoids 1 - tanh cancellation and needs one exp per element.
// FastGELU: f = x s with s = sigmoid(1.702 x), f' = s + 1.702 x s (1 - s).
// Exact GELU: f = x Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)), f' = Phi(x) + x phi(x) with
// phi(x) = exp(-x^2 / 2) / sqrt(2 pi). erff is libm's (not vectorised: this activation serves
// converted Hugging Face models, where exactness matters more than the last 10% of speed).
#include "kernels/cpu/activation.h"

#include <cmath>

#include "kernels/cpu/vec_math.h"

namespace loom::kernels {

namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kFastGeluAlpha = 1.702f;
constexpr int64_t kParallelMin = 1 << 14;

inline float gelu_scalar(float x) {
  float z = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return x * vec::sigmoid_f32(2.0f * z);
}
inline float fast_gelu_scalar(float x) { return x * vec::sigmoid_f32(kFastGeluAlpha * x); }
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
inline float gelu_erf_scalar(float x) { return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2)); }
}  // namespace

void gelu_row(GeluKind kind, float* out, const float* x, int64_t n) {
  switch (kind) {
    case GeluKind::fast:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = fast_gelu_scalar(x[j]);
      return;
    case GeluKind::tanh:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = gelu_scalar(x[j]);
      return;
    case GeluKind::erf:
      for (int64_t j = 0; j < n; ++j) out[j] = gelu_erf_scalar(x[j]);
      return;
  }
}

void gelu_erf_forward(float* out, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_erf_scalar(x[i]);
}

void gelu_erf_backward(float* dx, const float* dout, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float xi = x[i];
    float cdf = 0.5f * (1.0f + std::erf(xi * kInvSqrt2));
    float pdf = kInvSqrt2Pi * vec::exp_f32(-0.5f * xi * xi);
    dx[i] = dout[i] * (cdf + xi * pdf);
  }
}

void gelu_kind_forward(GeluKind kind, float* out, const float* x, int64_t n) {
  switch (kind) {
    case GeluKind::tanh: return gelu_forward(out, x, n);
    case GeluKind::erf: return gelu_erf_forward(out, x, n);
    case GeluKind::fast: return fast_gelu_forward(out, x, n);
  }
}

void gelu_kind_backward(GeluKind kind, float* dx, const float* dout, const float* x, int64_t n) {
  switch (kind) {
    case GeluKind::tanh: return gelu_backward(dx, dout, x, n);
    case GeluKind::erf: return gelu_erf_backward(dx, dout, x, n);
    case GeluKind::fast: return fast_gelu_backward(dx, dout, x, n);
  }
}

void bias_gelu_forward(float* out, float* y, const float* bias, int64_t rows, int64_t n,
                       GeluKind kind) {
  // y += bias, then the activation through gelu_row: the one per-element loop weight_matmul's
  // fused GELU runs too.
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * n;  // (n)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = yr[j] + bias[j];
    gelu_row(kind, out + r * n, yr, n);
  }
}

void gelu_forward(float* out, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_scalar(x[i]);
}

void gelu_backward(float* dx, const float* dout, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float xi = x[i];
    float z = kSqrt2OverPi * (xi + kGeluCubic * xi * xi * xi);
    float dz = kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * xi * xi);
    float s = vec::sigmoid_f32(2.0f * z);
    dx[i] = dout[i] * (s + 2.0f * xi * s * (1.0f - s) * dz);
  }
}

void fast_gelu_forward(float* out, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = fast_gelu_scalar(x[i]);
}

void fast_gelu_backward(float* dx, const float* dout, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float xi = x[i];
    float s = vec::sigmoid_f32(kFastGeluAlpha * xi);
    dx[i] = dout[i] * (s + kFastGeluAlpha * xi * s * (1.0f - s));
  }
}

void bias_gelu_forward(float* out, float* y, const float* bias, int64_t rows, int64_t n, bool fast) {
  bias_gelu_forward(out, y, bias, rows, n, fast ? GeluKind::fast : GeluKind::tanh);
}

}  // namespace loom::kernels
