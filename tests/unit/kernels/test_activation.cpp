// Tests for kernels/cpu/activation.h: GELU and FastGELU values and derivatives vs the float64
// reference, reference derivatives vs finite differences, extreme inputs, fused bias+GELU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/op_check.h"
#include "kernels/cpu/activation.h"
#include "kernels/ref/activation_ref.h"

using namespace loom;
using namespace loom::test;

namespace {
// Our exp is a polynomial with ~2 ulp error and the rest is a handful of f32 operations, so each
// element is within ~1e-6 relative: NMSE ~1e-13. 1e-10 catches any formula error (NMSE >= 1e-4).
constexpr double kTol = 1e-10;

std::vector<float> test_inputs(int64_t n, uint64_t seed) {
  // Mostly N(0, 3) plus, when n is large enough that they do not dominate the NMSE, the tails:
  // large negative (true output below f32's range: ours returns ~1e-37, the f64 reference ~1e-72;
  // the per-element check bounds that absolute error) and large positive.
  auto x = random_normal(n, seed, 3.0f);
  if (n < 100) return x;
  const float extremes[] = {-100.f, -30.f, -10.f, -5.f, -1e-4f, 0.f, 1e-4f, 5.f, 10.f, 30.f, 100.f};
  for (size_t i = 0; i < std::size(extremes) && i < x.size(); ++i) x[i] = extremes[i];
  return x;
}
}  // namespace

TEST(KernelsActivation, ReferenceDerivativesMatchFiniteDifferences) {
  auto x = to_f64(test_inputs(127, 1));
  std::vector<double> ones(x.size(), 1.0), d(x.size()), out(x.size());
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast_gelu" : "gelu");
    if (fast) kernels::ref::fast_gelu_backward(d.data(), ones.data(), x.data(), int64_t(x.size()));
    else kernels::ref::gelu_backward(d.data(), ones.data(), x.data(), int64_t(x.size()));
    for (size_t i = 0; i < x.size(); ++i) {
      auto f = [&](const std::vector<double>& v) {
        double o;
        if (fast) kernels::ref::fast_gelu_forward(&o, v.data(), 1);
        else kernels::ref::gelu_forward(&o, v.data(), 1);
        return o;
      };
      double fd = fd_gradient(f, {x[i]})[0];
      // h = 1e-6 on values up to 100: rounding ~1e-16*100/1e-6 = 1e-8 absolute.
      EXPECT_NEAR(d[i], fd, 1e-7) << "x=" << x[i];
    }
  }
}

TEST(KernelsActivation, KernelsMatchReference) {
  for (int64_t n : {1, 5, 7, 13, 127, 100003}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    auto x = test_inputs(n, uint64_t(n)), dout = random_normal(n, uint64_t(n) + 1);
    auto x64 = to_f64(x), dout64 = to_f64(dout);
    std::vector<double> ref_out(static_cast<size_t>(n)), ref_dx(static_cast<size_t>(n));
    for (bool fast : {false, true}) {
      SCOPED_TRACE(fast ? "fast_gelu" : "gelu");
      GuardedBuffer<float> out(n), dx(n, 123.0f);  // backward overwrites dx
      if (fast) {
        kernels::fast_gelu_forward(out.data(), x.data(), n);
        kernels::fast_gelu_backward(dx.data(), dout.data(), x.data(), n);
        kernels::ref::fast_gelu_forward(ref_out.data(), x64.data(), n);
        kernels::ref::fast_gelu_backward(ref_dx.data(), dout64.data(), x64.data(), n);
      } else {
        kernels::gelu_forward(out.data(), x.data(), n);
        kernels::gelu_backward(dx.data(), dout.data(), x.data(), n);
        kernels::ref::gelu_forward(ref_out.data(), x64.data(), n);
        kernels::ref::gelu_backward(ref_dx.data(), dout64.data(), x64.data(), n);
      }
      EXPECT_TRUE(out.guards_intact() && dx.guards_intact());
      EXPECT_TRUE(all_finite(out.data(), n) && all_finite(dx.data(), n));
      EXPECT_LT(nmse(out.data(), ref_out.data(), n), kTol);
      EXPECT_LT(nmse(dx.data(), ref_dx.data(), n), kTol);
      // Per-element check too: NMSE could hide a bad tail element among 1e5 good ones.
      for (int64_t i = 0; i < n; ++i)
        ASSERT_NEAR(out[i], ref_out[size_t(i)], 1e-6 * (1.0 + std::abs(ref_out[size_t(i)])))
            << "x=" << x[size_t(i)];
    }
  }
}

TEST(KernelsActivation, FusedBiasGeluMatchesReference) {
  const int64_t dims[][2] = {{5, 7}, {13, 127}, {64, 3072}};
  for (auto [rows, n] : dims) {
    for (bool fast : {false, true}) {
      SCOPED_TRACE(testing::Message() << "rows=" << rows << " n=" << n << " fast=" << fast);
      auto y0 = random_normal(rows * n, 5, 2.0f), bias = random_normal(n, 6);
      GuardedBuffer<float> y(rows * n), out(rows * n);
      y.assign(y0);
      kernels::bias_gelu_forward(out.data(), y.data(), bias.data(), rows, n, fast);
      auto y_r = to_f64(y0);
      std::vector<double> out_r(static_cast<size_t>(rows * n));
      kernels::ref::bias_gelu_forward(out_r.data(), y_r.data(), to_f64(bias).data(), rows, n, fast);
      EXPECT_TRUE(y.guards_intact() && out.guards_intact());
      EXPECT_LT(nmse(y.data(), y_r.data(), rows * n), kTol);  // pre-activation kept
      EXPECT_LT(nmse(out.data(), out_r.data(), rows * n), kTol);
    }
  }
}

TEST(KernelsActivation, NanPropagates) {
  float x[3] = {1.0f, std::numeric_limits<float>::quiet_NaN(), -1.0f}, out[3];
  kernels::gelu_forward(out, x, 3);
  EXPECT_TRUE(std::isnan(out[1]));
  EXPECT_TRUE(std::isfinite(out[0]) && std::isfinite(out[2]));
}

// Exact (erf) GELU, Hugging Face's "gelu": the same three checks as above.
TEST(KernelsActivation, GeluErfReferenceDerivativeMatchesFiniteDifferences) {
  auto x = to_f64(test_inputs(127, 11));
  std::vector<double> ones(x.size(), 1.0), d(x.size());
  kernels::ref::gelu_erf_backward(d.data(), ones.data(), x.data(), int64_t(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    auto f = [&](const std::vector<double>& v) {
      double o;
      kernels::ref::gelu_erf_forward(&o, v.data(), 1);
      return o;
    };
    // Same step and rounding bound as the tanh form above.
    EXPECT_NEAR(d[i], fd_gradient(f, {x[i]})[0], 1e-7) << "x=" << x[i];
  }
  // Exact values: gelu(1) = Phi(1) = 0.8413447460685429, gelu(-1) = -(1 - Phi(1)).
  double in[2] = {1.0, -1.0}, out[2];
  kernels::ref::gelu_erf_forward(out, in, 2);
  EXPECT_NEAR(out[0], 0.8413447460685429, 1e-15);
  EXPECT_NEAR(out[1], -0.15865525393145707, 1e-15);
}

TEST(KernelsActivation, GeluErfKernelsMatchReference) {
  for (int64_t n : {1, 5, 7, 13, 127, 100003}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    auto x = test_inputs(n, uint64_t(n) + 7), dout = random_normal(n, uint64_t(n) + 8);
    auto x64 = to_f64(x), dout64 = to_f64(dout);
    std::vector<double> ref_out(static_cast<size_t>(n)), ref_dx(static_cast<size_t>(n));
    GuardedBuffer<float> out(n), dx(n, 123.0f);
    kernels::gelu_erf_forward(out.data(), x.data(), n);
    kernels::gelu_erf_backward(dx.data(), dout.data(), x.data(), n);
    kernels::ref::gelu_erf_forward(ref_out.data(), x64.data(), n);
    kernels::ref::gelu_erf_backward(ref_dx.data(), dout64.data(), x64.data(), n);
    EXPECT_TRUE(out.guards_intact() && dx.guards_intact());
    EXPECT_TRUE(all_finite(out.data(), n) && all_finite(dx.data(), n));
    EXPECT_LT(nmse(out.data(), ref_out.data(), n), kTol);
    EXPECT_LT(nmse(dx.data(), ref_dx.data(), n), kTol);
    // Per element: f32 1 + erf(x/sqrt2) loses relative accuracy for x << 0 (the true value is
    // tiny there), so the bound is absolute 1e-6 plus 1e-6 relative.
    for (int64_t i = 0; i < n; ++i)
      ASSERT_NEAR(out[i], ref_out[size_t(i)], 1e-6 * (1.0 + std::abs(ref_out[size_t(i)])))
          << "x=" << x[size_t(i)];
    // The dispatcher picks the same kernel.
    GuardedBuffer<float> out2(n);
    kernels::gelu_kind_forward(kernels::GeluKind::erf, out2.data(), x.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out2[i], out[i]);
  }
}

TEST(KernelsActivation, GeluErfFusedBiasMatchesReference) {
  const int64_t rows = 13, n = 127;
  auto y0 = random_normal(rows * n, 15, 2.0f), bias = random_normal(n, 16);
  GuardedBuffer<float> y(rows * n), out(rows * n);
  y.assign(y0);
  kernels::bias_gelu_forward(out.data(), y.data(), bias.data(), rows, n, kernels::GeluKind::erf);
  std::vector<double> pre(size_t(rows * n)), ref(size_t(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) pre[size_t(r * n + j)] = double(y0[size_t(r * n + j)]) + bias[size_t(j)];
  kernels::ref::gelu_erf_forward(ref.data(), pre.data(), rows * n);
  EXPECT_TRUE(y.guards_intact() && out.guards_intact());
  EXPECT_LT(nmse(y.data(), pre.data(), rows * n), kTol);
  EXPECT_LT(nmse(out.data(), ref.data(), rows * n), kTol);
}
