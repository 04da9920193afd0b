// Tests for kernels/cpu/elementwise.h against kernels/ref/elementwise_ref.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/op_check.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/ref/elementwise_ref.h"

using namespace loom;
using namespace loom::test;

namespace {
// Each output element is one f32 add (or a sum of `rows` f32 adds for bias_backward, error
// ~rows * 2^-24 relative in the worst case): NMSE < 1e-10 for rows <= 300 with wide margin.
constexpr double kTol = 1e-10;
const int64_t kDims[][2] = {{1, 1}, {5, 7}, {7, 13}, {13, 5}, {127, 129}, {300, 768}};
}  // namespace

TEST(KernelsElementwise, BiasAddRowsAndBiasBackward) {
  uint64_t seed = 1;
  for (auto [rows, n] : kDims) {
    SCOPED_TRACE(testing::Message() << "rows=" << rows << " n=" << n);
    auto y0 = random_normal(rows * n, seed++), bias = random_normal(n, seed++);
    GuardedBuffer<float> y(rows * n);
    y.assign(y0);
    kernels::bias_add_rows(y.data(), bias.data(), rows, n);
    auto yref = to_f64(y0);
    kernels::ref::bias_add_rows(yref.data(), to_f64(bias).data(), rows, n);
    EXPECT_TRUE(y.guards_intact());
    EXPECT_LT(nmse(y.data(), yref.data(), rows * n), kTol);

    auto db0 = random_normal(n, seed++);
    GuardedBuffer<float> db(n);
    db.assign(db0);
    kernels::bias_backward(db.data(), y0.data(), rows, n);  // accumulates
    auto dbref = to_f64(db0);
    kernels::ref::bias_backward(dbref.data(), to_f64(y0).data(), rows, n);
    EXPECT_TRUE(db.guards_intact());
    EXPECT_TRUE(all_finite(db.data(), n));
    EXPECT_LT(nmse(db.data(), dbref.data(), n), kTol);
  }
}

TEST(KernelsElementwise, AddAndScaleInplace) {
  for (int64_t n : {1, 5, 7, 13, 127, 100003}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    auto y0 = random_normal(n, 3), x = random_normal(n, 4);
    GuardedBuffer<float> y(n);
    y.assign(y0);
    kernels::add_inplace(y.data(), x.data(), n);
    kernels::scale_inplace(y.data(), 0.37f, n);
    auto yref = to_f64(y0);
    kernels::ref::add_inplace(yref.data(), to_f64(x).data(), n);
    kernels::ref::scale_inplace(yref.data(), double(0.37f), n);
    EXPECT_TRUE(y.guards_intact());
    EXPECT_LT(nmse(y.data(), yref.data(), n), kTol);
  }
}

TEST(KernelsElementwise, BiasBackwardIsBitReproducible) {
  const int64_t rows = 1024, n = 768;
  auto dy = random_normal(rows * n, 9);
  std::vector<float> a(n, 0.0f), b(n, 0.0f);
  kernels::bias_backward(a.data(), dy.data(), rows, n);
  kernels::bias_backward(b.data(), dy.data(), rows, n);
  EXPECT_EQ(a, b);
}

namespace {
// The definition argmax_first vectorises: the first strictly larger element from -inf.
int64_t scalar_argmax(const std::vector<float>& x) {
  int64_t arg = -1;
  float best = -INFINITY;
  for (size_t i = 0; i < x.size(); ++i)
    if (x[i] > best) {
      best = x[i];
      arg = int64_t(i);
    }
  return arg;
}
}  // namespace

TEST(KernelsElementwise, ArgmaxFirstEqualsTheScalarLoop) {
  const float nan = std::nanf(""), inf = INFINITY;
  uint64_t seed = 5;
  for (int64_t n : {0, 1, 15, 16, 17, 31, 33, 255, 50304}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& v : x) v = float(int(rng_u64(seed++, 0, 0) % 1000)) / 10.f;  // many ties
    auto check = [&](const char* what) {
      EXPECT_EQ(kernels::argmax_first(x.data(), n), scalar_argmax(x)) << what << " n=" << n;
    };
    check("random with ties");
    if (n == 0) continue;
    // The largest value at several places: in two lanes, later in the same lane, in the tail.
    const float top = 1000.f;
    for (int64_t at : {n - 1, n / 2, n / 3, int64_t(0)}) {
      x[size_t(at)] = top;
      check("repeated maximum");
    }
    for (int64_t i = 0; i < n; i += 7) x[size_t(i)] = nan;
    check("NaN sprinkled");
    std::fill(x.begin(), x.end(), -inf);
    check("all -inf");
    EXPECT_EQ(kernels::argmax_first(x.data(), n), -1);
    x[size_t(n - 1)] = -3.f;
    check("only the last above -inf");
    std::fill(x.begin(), x.end(), nan);
    EXPECT_EQ(kernels::argmax_first(x.data(), n), -1) << "all NaN, n=" << n;
    x[size_t(n / 2)] = inf;
    check("+inf among NaN");
  }
  EXPECT_THROW(kernels::argmax_first(nullptr, -1), Error);
}
