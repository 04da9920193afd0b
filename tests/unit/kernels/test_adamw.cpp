// Tests for kernels/cpu/adamw.h: the update vs the float64 formula over several steps, with
// weight decay, grad_scale and guard bytes; step 0 is an error.
#include <gtest/gtest.h>

#include <cmath>

#include "common/op_check.h"
#include "core/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/ref/adamw_ref.h"

using namespace loom;
using namespace loom::test;

TEST(KernelsAdamW, MatchesFloat64FormulaOverSteps) {
  for (int64_t n : {1, 5, 7, 13, 127, 100003}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    auto p0 = random_normal(n, 1, 0.02f);
    GuardedBuffer<float> p(n), m(n, 0.0f), v(n, 0.0f);
    p.assign(p0);
    auto p_r = to_f64(p0);
    std::vector<double> m_r(static_cast<size_t>(n), 0.0), v_r(static_cast<size_t>(n), 0.0);
    const float lr = 6e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.5f;
    for (int64_t step = 1; step <= 5; ++step) {
      auto g = random_normal(n, 10 + uint64_t(step), 1e-2f);
      kernels::adamw_step(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, step,
                          scale);
      kernels::ref::adamw_step(p_r.data(), to_f64(g).data(), m_r.data(), v_r.data(), n, lr, b1,
                               b2, eps, wd, step, scale);
    }
    EXPECT_TRUE(p.guards_intact() && m.guards_intact() && v.guards_intact());
    EXPECT_TRUE(all_finite(p.data(), n));
    // Each step is a few f32 operations per element (relative error ~1e-7 of each term); after 5
    // steps the parameter's error is ~1e-7 of its size, NMSE ~1e-14. The update itself (lr-sized,
    // ~3% of |p|) is what a wrong formula would change, giving NMSE >= 1e-6.
    EXPECT_LT(nmse(p.data(), p_r.data(), n), 1e-11);
    EXPECT_LT(nmse(m.data(), m_r.data(), n), 1e-11);
    EXPECT_LT(nmse(v.data(), v_r.data(), n), 1e-11);
  }
}

// First step by hand: m = (1-b1) g, v = (1-b2) g^2, so m_hat/(sqrt(v_hat)+eps) = sign(g) (up to
// eps) and p1 = p0 (1 - lr wd) - lr sign(g).
TEST(KernelsAdamW, FirstStepIsSignDescent) {
  float p[2] = {1.0f, -2.0f}, g[2] = {0.3f, -4.0f}, m[2] = {0, 0}, v[2] = {0, 0};
  kernels::adamw_step(p, g, m, v, 2, 0.01f, 0.9f, 0.999f, 1e-8f, 0.1f, 1, 1.0f);
  EXPECT_NEAR(p[0], 1.0f * (1 - 0.001f) - 0.01f, 1e-6f);
  EXPECT_NEAR(p[1], -2.0f * (1 - 0.001f) + 0.01f, 1e-6f);
}

TEST(KernelsAdamW, StepZeroIsAnError) {
  float p = 0, g = 0, m = 0, v = 0;
  EXPECT_THROW(kernels::adamw_step(&p, &g, &m, &v, 1, 0.1f, 0.9f, 0.99f, 1e-8f, 0.f, 0, 1.f),
               Error);
}
