// Tests for kernels/cpu/layernorm.h: reference gradients vs float64 finite differences, kernel
// values and gradients vs the reference, odd shapes, guard bytes, a large-mean input, determinism.
#include <gtest/gtest.h>

#include "common/op_check.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/ref/layernorm_ref.h"

using namespace loom;
using namespace loom::test;

namespace {
constexpr double kEps = 1e-5;
const int64_t kDims[][2] = {{1, 5}, {5, 7}, {7, 13}, {13, 127}, {127, 5}, {64, 768}};
}  // namespace

// Reference backward vs central differences of L = sum(G .* layernorm(x, w, b)) in float64.
TEST(KernelsLayerNorm, ReferenceGradientsMatchFiniteDifferences) {
  const int64_t N = 5, C = 7;
  auto x = to_f64(random_normal(N * C, 1, 1.0f, 0.5f));
  auto w = to_f64(random_normal(C, 2, 0.5f, 1.0f));
  auto b = to_f64(random_normal(C, 3));
  auto G = to_f64(random_normal(N * C, 4));
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww,
                  const std::vector<double>& bb) {
    std::vector<double> out(static_cast<size_t>(N * C));
    kernels::ref::layernorm_forward(out.data(), nullptr, nullptr, xx.data(), ww.data(), bb.data(),
                                    N, C, kEps);
    return dot(out, G);
  };
  std::vector<double> out(static_cast<size_t>(N * C)), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
  kernels::ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(),
                                  b.data(), N, C, kEps);
  std::vector<double> dx(static_cast<size_t>(N * C)), dw(static_cast<size_t>(C)), db(static_cast<size_t>(C));
  kernels::ref::layernorm_backward(dx.data(), dw.data(), db.data(), G.data(), x.data(), w.data(),
                                   mean.data(), rstd.data(), N, C);
  // h = 1e-6 central differences: truncation O(h^2) ~ 1e-12, rounding ~1e-16/1e-6 = 1e-10
  // relative, so NMSE ~ 1e-20; 1e-14 is far above that and far below any formula error.
  EXPECT_LT(nmse(dx, fd_gradient([&](const auto& v) { return loss(v, w, b); }, x)), 1e-14);
  EXPECT_LT(nmse(dw, fd_gradient([&](const auto& v) { return loss(x, v, b); }, w)), 1e-14);
  EXPECT_LT(nmse(db, fd_gradient([&](const auto& v) { return loss(x, w, v); }, b)), 1e-14);
}

TEST(KernelsLayerNorm, KernelMatchesReferenceForwardAndBackward) {
  uint64_t seed = 10;
  for (auto [N, C] : kDims) {
    SCOPED_TRACE(testing::Message() << "N=" << N << " C=" << C);
    // A mean of 3 with std 1: the two-pass variance keeps full precision here.
    auto x = random_normal(N * C, seed++, 1.0f, 3.0f);
    auto w = random_normal(C, seed++, 0.2f, 1.0f), b = random_normal(C, seed++, 0.1f);
    auto dout = random_normal(N * C, seed++);
    auto dx0 = random_normal(N * C, seed++), dw0 = random_normal(C, seed++),
         db0 = random_normal(C, seed++);
    GuardedBuffer<float> out(N * C), mean(N), rstd(N), dx(N * C), dw(C), db(C);
    kernels::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                               N, C, float(kEps));
    dx.assign(dx0);
    dw.assign(dw0);
    db.assign(db0);
    kernels::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
                                mean.data(), rstd.data(), N, C);

    auto x64 = to_f64(x), w64 = to_f64(w), b64 = to_f64(b), dout64 = to_f64(dout);
    std::vector<double> out_r(static_cast<size_t>(N * C)), mean_r(static_cast<size_t>(N)), rstd_r(static_cast<size_t>(N));
    kernels::ref::layernorm_forward(out_r.data(), mean_r.data(), rstd_r.data(), x64.data(),
                                    w64.data(), b64.data(), N, C, kEps);
    auto dx_r = to_f64(dx0), dw_r = to_f64(dw0), db_r = to_f64(db0);
    kernels::ref::layernorm_backward(dx_r.data(), dw_r.data(), db_r.data(), dout64.data(),
                                     x64.data(), w64.data(), mean_r.data(), rstd_r.data(), N, C);
    for (auto* g : {&out, &mean, &rstd, &dx, &dw, &db}) EXPECT_TRUE(g->guards_intact());
    EXPECT_TRUE(all_finite(out.data(), N * C) && all_finite(dx.data(), N * C));
    // f32 rounding of O(C) sums with inputs of magnitude ~3: relative error ~1e-6 at worst,
    // NMSE ~1e-12; 1e-9 leaves margin yet catches any wrong term (NMSE >= 1e-3).
    EXPECT_LT(nmse(out.data(), out_r.data(), N * C), 1e-9);
    EXPECT_LT(nmse(mean.data(), mean_r.data(), N), 1e-9);
    EXPECT_LT(nmse(rstd.data(), rstd_r.data(), N), 1e-9);
    EXPECT_LT(nmse(dx.data(), dx_r.data(), N * C), 1e-9);
    EXPECT_LT(nmse(dw.data(), dw_r.data(), C), 1e-9);
    EXPECT_LT(nmse(db.data(), db_r.data(), C), 1e-9);
  }
}

TEST(KernelsLayerNorm, BackwardIsBitReproducible) {
  const int64_t N = 256, C = 768;
  auto x = random_normal(N * C, 1), w = random_normal(C, 2), b = random_normal(C, 3);
  auto dout = random_normal(N * C, 4);
  std::vector<float> out(N * C), mean(N), rstd(N);
  kernels::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                             N, C, 1e-5f);
  std::vector<float> dx1(N * C, 0.f), dw1(C, 0.f), db1(C, 0.f), dx2(dx1), dw2(dw1), db2(db1);
  kernels::layernorm_backward(dx1.data(), dw1.data(), db1.data(), dout.data(), x.data(), w.data(),
                              mean.data(), rstd.data(), N, C);
  kernels::layernorm_backward(dx2.data(), dw2.data(), db2.data(), dout.data(), x.data(), w.data(),
                              mean.data(), rstd.data(), N, C);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(dw1, dw2);
  EXPECT_EQ(db1, db2);
}
