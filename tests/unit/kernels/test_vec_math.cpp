// Tests for kernels/cpu/vec_math.h against glibc's exp, which is correctly rounded or within an
// ulp: exp_f64 over its whole range and at the edges it documents, exp_f32 over its own.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "kernels/cpu/vec_math.h"

using namespace loom::kernels;

// Relative error of exp_f64 against std::exp over [-708, 709], a dense grid plus random points,
// and the largest seen. A degree-13 Taylor polynomial on |r| <= ln2/2 evaluated by Horner in
// double gives a few ulp (2^-52 ~ 2.2e-16 each); 1e-15 allows ~4.5 ulp, while a wrong
// coefficient or range reduction gives errors of 1e-10 or more.
TEST(VecMath, ExpF64WithinAFewUlpOfLibm) {
  double worst = 0, at = 0;
  auto check = [&](double x) {
    const double want = std::exp(x), got = vec::exp_f64(x);
    const double rel = std::fabs(got - want) / want;
    if (rel > worst) {
      worst = rel;
      at = x;
    }
  };
  for (double x = -708.0; x <= 709.0; x += 0.0137) check(x);
  std::mt19937_64 g(7);
  std::uniform_real_distribution<double> u(-708.0, 709.0), small(-1.0, 1.0);
  for (int i = 0; i < 200000; ++i) {
    check(u(g));
    check(small(g));
  }
  for (double x : {0.0, -0.0, 1.0, -1.0, 0.5 * std::log(2.0), -0.5 * std::log(2.0), 1e-300})
    check(x);
  std::printf("exp_f64: max relative error %.3g at x = %.17g\n", worst, at);
  EXPECT_LT(worst, 1e-15) << "at x = " << at;
  EXPECT_EQ(vec::exp_f64(0.0), 1.0);
}

// The documented edges: below -708 and -inf give exactly 0 (sampling's masked tokens must weigh
// nothing), above 709 clamps to exp(709) (finite), NaN stays NaN.
TEST(VecMath, ExpF64Edges) {
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(vec::exp_f64(-inf), 0.0);
  EXPECT_EQ(vec::exp_f64(-708.5), 0.0);
  EXPECT_EQ(vec::exp_f64(-1e308), 0.0);
  EXPECT_GT(vec::exp_f64(-708.0), 0.0);
  EXPECT_NEAR(vec::exp_f64(800.0) / std::exp(709.0), 1.0, 1e-15);
  EXPECT_TRUE(std::isfinite(vec::exp_f64(inf)));
  EXPECT_TRUE(std::isnan(vec::exp_f64(std::numeric_limits<double>::quiet_NaN())));
}

// exp_f32's documented accuracy (~2 ulp of float, 2^-23 ~ 1.2e-7 each) over [-87, 88].
TEST(VecMath, ExpF32WithinAFewUlpOfLibm) {
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.00731f) {
    const double want = std::exp(double(x)), got = vec::exp_f32(x);
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  std::printf("exp_f32: max relative error %.3g\n", worst);
  EXPECT_LT(worst, 4e-7);
}
