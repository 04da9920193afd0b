// Tests for kernels/cpu/cross_entropy.h: reference gradients vs finite differences, the fused f32
// kernel vs the float64 reference (ignored targets, V not a multiple of anything, partial last
// block), the bf16 error rule, forward-only mode, bad targets, workspace O(rows_per_block * V),
// determinism, and logits_forward.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "common/op_check.h"
#include "core/error.h"
#include "core/memory_pool.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/ref/cross_entropy_ref.h"

using namespace loom;
using namespace loom::test;

namespace {

struct Case {
  int64_t N, C, V, rows_per_block;
};
// V = 13, 127, 300, 1000: none a multiple of 16 or of the block; N not a multiple of the block.
const Case kCases[] = {{5, 7, 13, 64}, {13, 7, 127, 4}, {37, 16, 300, 8}, {70, 32, 1000, 16}};

// Targets uniform in [0, V), with about one in five set to -1 (ignored). Row 0 is always counted.
std::vector<int32_t> make_targets(int64_t N, int64_t V, uint64_t seed) {
  auto t = random_tokens(N, V, seed);
  for (int64_t r = 1; r < N; ++r)
    if (rng_u64(seed, 99, uint64_t(r)) % 5 == 0) t[size_t(r)] = -1;
  return t;
}

// A plain bf16 implementation: bf16 h and wte, f32 dot products in order, f32 softmax (std::exp),
// the logits gradient rounded to bf16, f32 accumulation of dh and dwte.
double plain_bf16_cross_entropy(std::vector<float>& dh, std::vector<float>& dwte,
                                const std::vector<bf16>& h, const std::vector<bf16>& wte,
                                const std::vector<int32_t>& targets, int64_t N, int64_t C,
                                int64_t V, float grad_scale) {
  double loss = 0.0;
  std::vector<float> l(static_cast<size_t>(V));
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t c = 0; c < C; ++c) dh[size_t(r * C + c)] = 0.0f;
    if (targets[size_t(r)] < 0) continue;
    for (int64_t v = 0; v < V; ++v) {
      float s = 0.0f;
      for (int64_t c = 0; c < C; ++c)
        s += bf16_to_f32(h[size_t(r * C + c)]) * bf16_to_f32(wte[size_t(v * C + c)]);
      l[size_t(v)] = s;
    }
    float mx = l[0];
    for (float x : l) mx = std::max(mx, x);
    float sum = 0.0f;
    for (float x : l) sum += std::exp(x - mx);
    loss += double(mx) + std::log(double(sum)) - double(l[size_t(targets[size_t(r)])]);
    for (int64_t v = 0; v < V; ++v) {
      float g = grad_scale * (std::exp(l[size_t(v)] - mx) / sum -
                              (v == targets[size_t(r)] ? 1.0f : 0.0f));
      float gb = bf16_to_f32(f32_to_bf16(g));
      for (int64_t c = 0; c < C; ++c) {
        dh[size_t(r * C + c)] += gb * bf16_to_f32(wte[size_t(v * C + c)]);
        dwte[size_t(v * C + c)] += gb * bf16_to_f32(h[size_t(r * C + c)]);
      }
    }
  }
  return loss;
}

}  // namespace

TEST(KernelsCrossEntropy, ReferenceGradientsMatchFiniteDifferences) {
  const int64_t N = 5, C = 7, V = 13;
  auto h = to_f64(random_normal(N * C, 1)), wte = to_f64(random_normal(V * C, 2, 0.5f));
  auto targets = make_targets(N, V, 3);
  const double scale = 0.25;
  auto loss_h = [&](const std::vector<double>& hh) {
    return scale * kernels::ref::cross_entropy_head(nullptr, nullptr, nullptr, hh.data(),
                                                    wte.data(), targets.data(), N, C, V, 1.0);
  };
  auto loss_w = [&](const std::vector<double>& ww) {
    return scale * kernels::ref::cross_entropy_head(nullptr, nullptr, nullptr, h.data(), ww.data(),
                                                    targets.data(), N, C, V, 1.0);
  };
  std::vector<double> dh(static_cast<size_t>(N * C), 99.0), dwte(static_cast<size_t>(V * C), 0.0);
  kernels::ref::cross_entropy_head(dh.data(), dwte.data(), nullptr, h.data(), wte.data(),
                                   targets.data(), N, C, V, scale);
  // Smooth function of O(1) inputs: h = 1e-6 central differences are good to ~1e-10 relative.
  EXPECT_LT(nmse(dh, fd_gradient(loss_h, h)), 1e-14);
  EXPECT_LT(nmse(dwte, fd_gradient(loss_w, wte)), 1e-14);
}

TEST(KernelsCrossEntropy, F32KernelMatchesReference) {
  uint64_t seed = 10;
  for (const Case& k : kCases) {
    SCOPED_TRACE(testing::Message() << "N=" << k.N << " C=" << k.C << " V=" << k.V
                                    << " rows_per_block=" << k.rows_per_block);
    auto h = random_normal(k.N * k.C, seed++), wte = random_normal(k.V * k.C, seed++, 0.3f);
    auto targets = make_targets(k.N, k.V, seed++);
    auto dwte0 = random_normal(k.V * k.C, seed++, 0.01f);
    MemoryPool pool;
    GuardedBuffer<float> dh(k.N * k.C, 42.0f), dwte(k.V * k.C);  // dh is overwritten
    dwte.assign(dwte0);
    int64_t counted = -1;
    const float scale = 1.0f / 3.0f;
    double loss = kernels::cross_entropy_head(dh.data(), dwte.data(), &counted, h.data(),
                                              wte.data(), targets.data(), k.N, k.C, k.V, scale,
                                              pool, k.rows_per_block);
    std::vector<double> dh_r(static_cast<size_t>(k.N * k.C)), dwte_r = to_f64(dwte0);
    int64_t counted_r = -1;
    double loss_r = kernels::ref::cross_entropy_head(dh_r.data(), dwte_r.data(), &counted_r,
                                                     to_f64(h).data(), to_f64(wte).data(),
                                                     targets.data(), k.N, k.C, k.V, scale);
    EXPECT_EQ(counted, counted_r);
    EXPECT_GT(counted, 0);
    EXPECT_LT(counted, k.N);  // some rows ignored
    // f32 logits carry ~sqrt(C) * 2^-24 relative error; the loss sums ~N of them: relative 1e-6
    // is ~10x the expected error and far below a wrong formula's.
    EXPECT_NEAR(loss, loss_r, 1e-6 * std::abs(loss_r));
    EXPECT_TRUE(dh.guards_intact() && dwte.guards_intact());
    EXPECT_TRUE(all_finite(dh.data(), dh.size()) && all_finite(dwte.data(), dwte.size()));
    // Gradients: f32 softmax and f32 products, NMSE ~1e-13; 1e-9 is a wide margin.
    EXPECT_LT(nmse(dh.data(), dh_r.data(), dh.size()), 1e-9);
    EXPECT_LT(nmse(dwte.data(), dwte_r.data(), dwte.size()), 1e-9);
    for (int64_t r = 0; r < k.N; ++r) {
      if (targets[size_t(r)] >= 0) continue;
      for (int64_t c = 0; c < k.C; ++c) EXPECT_EQ(dh[r * k.C + c], 0.0f);
    }
    EXPECT_EQ(pool.current(MemCategory::workspace), 0);  // workspace released

    // Forward only: the same loss, bit for bit (same blocks, same order), nothing written.
    int64_t counted_fwd = -1;
    double loss_fwd = kernels::cross_entropy_head(nullptr, nullptr, &counted_fwd, h.data(),
                                                  wte.data(), targets.data(), k.N, k.C, k.V,
                                                  scale, pool, k.rows_per_block);
    EXPECT_EQ(loss_fwd, loss);
    EXPECT_EQ(counted_fwd, counted);
  }
}

// flash-attention's rule: against the float64 result on the ORIGINAL f32 inputs, the bf16
// kernel's error (loss, dh, dwte) is at most 2x that of the plain bf16 implementation above.
TEST(KernelsCrossEntropy, Bf16ErrorAtMostTwicePlainBf16) {
  uint64_t seed = 50;
  for (const Case& k : kCases) {
    SCOPED_TRACE(testing::Message() << "N=" << k.N << " C=" << k.C << " V=" << k.V
                                    << " rows_per_block=" << k.rows_per_block);
    auto h = random_normal(k.N * k.C, seed++), wte = random_normal(k.V * k.C, seed++, 0.3f);
    auto targets = make_targets(k.N, k.V, seed++);
    auto hb = to_bf16(h), wb = to_bf16(wte);
    const float scale = 0.1f;
    MemoryPool pool;
    GuardedBuffer<float> dh(k.N * k.C), dwte(k.V * k.C, 0.0f);
    int64_t counted = 0;
    double loss = kernels::cross_entropy_head_bf16(dh.data(), dwte.data(), &counted, hb.data(),
                                                   wb.data(), targets.data(), k.N, k.C, k.V,
                                                   scale, pool, k.rows_per_block);
    std::vector<float> dh_p(static_cast<size_t>(k.N * k.C)), dwte_p(static_cast<size_t>(k.V * k.C));
    double loss_p = plain_bf16_cross_entropy(dh_p, dwte_p, hb, wb, targets, k.N, k.C, k.V, scale);
    std::vector<double> dh_r(static_cast<size_t>(k.N * k.C)), dwte_r(static_cast<size_t>(k.V * k.C));
    double loss_r = kernels::ref::cross_entropy_head(dh_r.data(), dwte_r.data(), nullptr,
                                                     to_f64(h).data(), to_f64(wte).data(),
                                                     targets.data(), k.N, k.C, k.V, scale);
    EXPECT_TRUE(dh.guards_intact() && dwte.guards_intact());
    EXPECT_TRUE(all_finite(dh.data(), dh.size()) && all_finite(dwte.data(), dwte.size()));
    EXPECT_LE(std::abs(loss - loss_r), 2.0 * std::abs(loss_p - loss_r))
        << "ours " << loss << " plain " << loss_p << " f64 " << loss_r;
    double e_dh = nmse(dh.data(), dh_r.data(), dh.size());
    double e_dh_p = nmse(dh_p.data(), dh_r.data(), dh.size());
    double e_dw = nmse(dwte.data(), dwte_r.data(), dwte.size());
    double e_dw_p = nmse(dwte_p.data(), dwte_r.data(), dwte.size());
    EXPECT_LE(e_dh, 2.0 * e_dh_p) << "ours " << e_dh << " plain " << e_dh_p;
    EXPECT_LE(e_dw, 2.0 * e_dw_p) << "ours " << e_dw << " plain " << e_dw_p;
    // And the bf16 result is still a usable gradient (bf16 has 8 bits: NMSE ~1e-5).
    EXPECT_LT(e_dh, 1e-3);
    EXPECT_LT(e_dw, 1e-3);
    // Against float64 on the bf16-ROUNDED inputs the input rounding drops out and what is left
    // is our own arithmetic (f32 softmax, bf16 logits gradient): still at most 2x plain's.
    std::vector<double> dh_rb(dh_r.size()), dwte_rb(dwte_r.size());
    kernels::ref::cross_entropy_head(dh_rb.data(), dwte_rb.data(), nullptr, to_f64(hb).data(),
                                     to_f64(wb).data(), targets.data(), k.N, k.C, k.V, scale);
    EXPECT_LE(nmse(dh.data(), dh_rb.data(), dh.size()),
              2.0 * nmse(dh_p.data(), dh_rb.data(), dh.size()));
    EXPECT_LE(nmse(dwte.data(), dwte_rb.data(), dwte.size()),
              2.0 * nmse(dwte_p.data(), dwte_rb.data(), dwte.size()));
  }
}

TEST(KernelsCrossEntropy, WorkspaceIsPerBlockNotPerBatch) {
  const int64_t N = 512, C = 16, V = 1000, rows_per_block = 16;
  auto h = random_normal(N * C, 1), wte = random_normal(V * C, 2, 0.3f);
  auto targets = make_targets(N, V, 3);
  std::vector<float> dh(static_cast<size_t>(N * C)), dwte(static_cast<size_t>(V * C), 0.0f);
  const int64_t block_bytes = rows_per_block * V * int64_t(sizeof(float));
  const int64_t full_bytes = N * V * int64_t(sizeof(float));
  {
    MemoryPool pool;
    kernels::cross_entropy_head(dh.data(), dwte.data(), nullptr, h.data(), wte.data(),
                                targets.data(), N, C, V, 1.0f / N, pool, rows_per_block);
    // One (rows_per_block, V) f32 logits block; the full logits would be 32x larger.
    EXPECT_LE(pool.peak(MemCategory::workspace), block_bytes + 4096);
    EXPECT_GE(pool.peak(MemCategory::workspace), block_bytes);  // it is counted at all
    EXPECT_LT(pool.peak(MemCategory::workspace), full_bytes / 8);
  }
  {
    MemoryPool pool;
    auto hb = to_bf16(h), wb = to_bf16(wte);
    kernels::cross_entropy_head_bf16(dh.data(), dwte.data(), nullptr, hb.data(), wb.data(),
                                     targets.data(), N, C, V, 1.0f / N, pool, rows_per_block);
    // f32 logits block plus its bf16 copy: 1.5x the f32 block.
    EXPECT_LE(pool.peak(MemCategory::workspace), block_bytes * 3 / 2 + 4096);
    EXPECT_LT(pool.peak(MemCategory::workspace), full_bytes / 8);
  }
}

TEST(KernelsCrossEntropy, BadTargetIsAnErrorAndAllIgnoredGivesZero) {
  const int64_t N = 3, C = 4, V = 5;
  auto h = random_normal(N * C, 1), wte = random_normal(V * C, 2);
  std::vector<int32_t> targets = {0, 5, 1};
  MemoryPool pool;
  std::vector<float> dh(static_cast<size_t>(N * C)), dwte(static_cast<size_t>(V * C), 0.0f);
  try {
    kernels::cross_entropy_head(dh.data(), dwte.data(), nullptr, h.data(), wte.data(),
                                targets.data(), N, C, V, 1.0f, pool);
    FAIL() << "expected loom::Error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("target 5 at row 1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("V=5"), std::string::npos) << msg;
  }
  targets = {-1, -1, -100};
  int64_t counted = -1;
  double loss = kernels::cross_entropy_head(dh.data(), dwte.data(), &counted, h.data(), wte.data(),
                                            targets.data(), N, C, V, 1.0f, pool);
  EXPECT_EQ(loss, 0.0);
  EXPECT_EQ(counted, 0);
  for (float g : dh) EXPECT_EQ(g, 0.0f);
  for (float g : dwte) EXPECT_EQ(g, 0.0f);
}

TEST(KernelsCrossEntropy, BitReproducible) {
  const int64_t N = 100, C = 64, V = 777;
  auto h = random_normal(N * C, 1), wte = random_normal(V * C, 2, 0.3f);
  auto targets = make_targets(N, V, 3);
  MemoryPool pool;
  std::vector<float> dh1(static_cast<size_t>(N * C)), dw1(static_cast<size_t>(V * C), 0.0f);
  std::vector<float> dh2(dh1), dw2(dw1);
  double l1 = kernels::cross_entropy_head(dh1.data(), dw1.data(), nullptr, h.data(), wte.data(),
                                          targets.data(), N, C, V, 0.01f, pool, 32);
  double l2 = kernels::cross_entropy_head(dh2.data(), dw2.data(), nullptr, h.data(), wte.data(),
                                          targets.data(), N, C, V, 0.01f, pool, 32);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(dh1, dh2);
  EXPECT_EQ(dw1, dw2);
}

TEST(KernelsCrossEntropy, LogitsForwardMatchesReference) {
  const int64_t N = 13, C = 7, V = 127;
  auto h = random_normal(N * C, 1), wte = random_normal(V * C, 2);
  GuardedBuffer<float> logits(N * V), logits_b(N * V);
  kernels::logits_forward(logits.data(), h.data(), wte.data(), N, C, V);
  auto hb = to_bf16(h), wb = to_bf16(wte);
  kernels::logits_forward_bf16(logits_b.data(), hb.data(), wb.data(), N, C, V);
  std::vector<double> ref(static_cast<size_t>(N * V)), ref_b(ref.size());
  kernels::ref::logits_forward(ref.data(), to_f64(h).data(), to_f64(wte).data(), N, C, V);
  kernels::ref::logits_forward(ref_b.data(), to_f64(hb).data(), to_f64(wb).data(), N, C, V);
  EXPECT_TRUE(logits.guards_intact() && logits_b.guards_intact());
  EXPECT_LT(nmse(logits.data(), ref.data(), N * V), 1e-10);    // f32 dot products of length 7
  EXPECT_LT(nmse(logits_b.data(), ref_b.data(), N * V), 1e-10);  // exact bf16 inputs, f32 sums
}

TEST(KernelsCrossEntropy, OnlyOneGradientRequested) {
  const int64_t N = 13, C = 8, V = 127;
  auto h = random_normal(N * C, 1), wte = random_normal(V * C, 2, 0.3f);
  auto targets = make_targets(N, V, 3);
  MemoryPool pool;
  std::vector<double> dh_r(static_cast<size_t>(N * C)), dw_r(static_cast<size_t>(V * C), 0.0);
  kernels::ref::cross_entropy_head(dh_r.data(), dw_r.data(), nullptr, to_f64(h).data(),
                                   to_f64(wte).data(), targets.data(), N, C, V, 0.5);
  GuardedBuffer<float> dh(N * C), dw(V * C, 0.0f);
  kernels::cross_entropy_head(dh.data(), nullptr, nullptr, h.data(), wte.data(), targets.data(), N,
                              C, V, 0.5f, pool, 5);
  kernels::cross_entropy_head(nullptr, dw.data(), nullptr, h.data(), wte.data(), targets.data(), N,
                              C, V, 0.5f, pool, 5);
  EXPECT_TRUE(dh.guards_intact() && dw.guards_intact());
  EXPECT_LT(nmse(dh.data(), dh_r.data(), N * C), 1e-9);  // f32 vs f64, as in F32KernelMatchesReference
  EXPECT_LT(nmse(dw.data(), dw_r.data(), V * C), 1e-9);
}
