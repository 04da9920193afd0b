// Whole-model tests: gradients against float64 finite differences through the reference path,
// recompute modes, the memory model against the pool, input validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "core/rng.h"
#include "kernels/cpu/matmul.h"
#include "attention/flash_attention.h"
#include "model/block.h"
#include "model/gpt.h"
#include "model/memory.h"
#include "ref_model.h"

using namespace loom;
using namespace loom::model;

namespace {

ModelConfig small_config(bool query_layer, Activation act, int64_t n_kv_heads) {
  ModelConfig c;
  c.name = "gradcheck";
  c.vocab = 37;
  c.n_layers = 2;
  c.d_model = 16;
  c.n_heads = 4;
  c.n_kv_heads = n_kv_heads;
  c.d_ff = 24;
  c.max_seq = 16;
  c.activation = act;
  c.query_layer = query_layer;
  c.validate();
  return c;
}

std::vector<int32_t> random_tokens(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  std::vector<int32_t> t(size_t(B * (T + 1)));
  for (size_t i = 0; i < t.size(); ++i) t[i] = int32_t(rng_u64(seed, 99, i) % uint64_t(V));
  return t;
}

// Perturb the init so biases and norm weights are not at their special values (zeros, ones),
// which would hide errors in their gradients.
void perturb(Gpt& m, uint64_t seed) {
  for (int64_t i = 0; i < m.layout().total(); ++i)
    m.weights()[i] += 0.05f * rng_normal(seed, 5, uint64_t(i));
  m.sync_low_precision_weights();
}

struct GradCase {
  bool query_layer;
  Activation act;
  int64_t nkv;
};

class GradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(GradCheck, EveryParameterMatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  ModelConfig cfg = small_config(gc.query_layer, gc.act, gc.nkv);
  const int64_t B = 2, T = 7;
  MemoryPool pool;
  Gpt m(cfg, pool, Precision::f32);
  m.init_weights(3);
  perturb(m, 4);
  auto tokens = random_tokens(B, T, cfg.vocab, 11);
  m.zero_grads();
  LossSum l = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
  ASSERT_EQ(l.count, B * T);

  const ParamLayout& layout = m.layout();
  std::vector<double> w(size_t(layout.total()));
  for (int64_t i = 0; i < layout.total(); ++i) w[size_t(i)] = m.weights()[i];
  const double ref_loss = reftest::reference_loss(cfg, layout, w, tokens, B, T);
  // f32 forward vs f64 reference: a few ulps per op over ~20 ops in sequence.
  EXPECT_NEAR(l.sum / double(l.count), ref_loss, 1e-5 * std::abs(ref_loss));

  // Central differences in float64 for every parameter (h = 1e-5: truncation error O(h^2) ~ 1e-10
  // times the third derivative, rounding error ~ 1e-16/1e-5 = 1e-11; both far below the f32
  // gradient's own error).
  const double h = 1e-5;
  for (const ParamSpec& s : layout.specs()) {
    double num = 0, den = 0;
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
      double keep = w[size_t(i)];
      w[size_t(i)] = keep + h;
      double lp = reftest::reference_loss(cfg, layout, w, tokens, B, T);
      w[size_t(i)] = keep - h;
      double lm = reftest::reference_loss(cfg, layout, w, tokens, B, T);
      w[size_t(i)] = keep;
      double fd = (lp - lm) / (2 * h);
      double g = m.grads()[i];
      num += (g - fd) * (g - fd);
      den += fd * fd;
    }
    if (s.name.size() > 11 && s.name.substr(s.name.size() - 11) == "attn.k.bias") {
      // The key bias adds q.b_k to every score of a query row, which softmax cancels: its true
      // gradient is exactly 0 (the finite differences agree). Ours must be rounding noise.
      EXPECT_LT(std::sqrt(num), 1e-6) << s.name << " should have a zero gradient";
      EXPECT_LT(std::sqrt(den), 1e-8) << s.name << ": finite differences should vanish";
      continue;
    }
    // Relative L2 error per tensor. f32 backward accumulates rounding of ~1e-7 relative per
    // op through ~40 ops; 1e-4 leaves margin while catching any wrong term (those give O(1)).
    double rel = std::sqrt(num / std::max(den, 1e-30));
    EXPECT_LT(rel, 1e-4) << s.name << " relative L2 error " << rel << " (|fd| = " << std::sqrt(den)
                         << ")";
    EXPECT_GT(den, 0.0) << s.name << " has an all-zero gradient: the check would be vacuous";
  }
}

INSTANTIATE_TEST_SUITE_P(Model, GradCheck,
                         ::testing::Values(GradCase{true, Activation::fast_gelu, 2},
                                           GradCase{false, Activation::gelu, 4},
                                           GradCase{true, Activation::gelu, 1},
                                           GradCase{false, Activation::gelu_erf, 2}));

TEST(Recompute, ModesGiveIdenticalGradientsAndFallingActivationPeaks) {
  ModelConfig cfg = small_config(true, Activation::fast_gelu, 2);
  cfg.d_model = 32;
  cfg.d_ff = 64;
  cfg.max_seq = 32;
  cfg.n_layers = 3;
  const int64_t B = 2, T = 32;
  auto tokens = random_tokens(B, T, cfg.vocab, 12);
  for (Precision p : {Precision::f32, Precision::bf16}) {
    std::vector<float> first;
    int64_t prev_peak = INT64_MAX;
    for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full}) {
      MemoryPool pool;
      Gpt m(cfg, pool, p);
      m.init_weights(7);
      m.set_recompute(r);
      m.zero_grads();
      int64_t base = pool.current(MemCategory::activations);
      pool.reset_peaks();
      m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
      int64_t peak = pool.peak(MemCategory::activations) - base;
      EXPECT_EQ(pool.current(MemCategory::activations), base) << "activations leaked";
      std::vector<float> g(m.grads(), m.grads() + m.layout().total());
      if (first.empty())
        first = g;
      else
        EXPECT_EQ(g, first) << "recompute " << recompute_name(r) << " changed the gradients";
      EXPECT_LT(peak, prev_peak) << "recompute " << recompute_name(r) << " did not lower the peak";
      prev_peak = peak;
      parallel::ParallelPlan plan;  // one rank, one micro-batch of B sequences
      plan.micro_batch_size = B;
      plan.recompute.assign(size_t(cfg.n_layers), r);
      const RankMemory est = memory_per_rank(cfg, plan, 0, T, p);
      EXPECT_EQ(peak, est.activations())
          << "memory model off for recompute " << recompute_name(r)
          << (p == Precision::bf16 ? " bf16" : " f32");
      EXPECT_EQ(pool.current(MemCategory::weights), est.weights());
      EXPECT_EQ(pool.current(MemCategory::grads), est.grads());
    }
  }
}

TEST(Model, Bf16LossCloseToF32) {
  ModelConfig cfg = small_config(true, Activation::gelu, 2);
  const int64_t B = 2, T = 16;
  auto tokens = random_tokens(B, T, cfg.vocab, 13);
  MemoryPool pool;
  Gpt a(cfg, pool, Precision::f32), b(cfg, pool, Precision::bf16);
  a.init_weights(1);
  b.init_weights(1);
  LossSum la = a.forward_loss(tokens.data(), B, T);
  LossSum lb = b.forward_loss(tokens.data(), B, T);
  // bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) on matmul inputs only; the loss,
  // an average of ~log(V) = 3.6 nats, moves by far less than 1%.
  EXPECT_NEAR(lb.sum / double(lb.count), la.sum / double(la.count), 0.01 * la.sum / double(la.count));
}

// ||a - b|| / ||b||.
double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// bf16 blocks' attention on the native bf16 kernel (model/block.h; AMX tiles or AVX512-BF16,
// whichever this CPU runs) against the f32 kernel on the same f32 q, k, v: the native path rounds
// q, k, v, dout, P and dS to bf16 (2^-9 relative each), the rest of the model is the same bf16
// computation. Both runs also check the pool's workspace against the memory model, which prices
// the native call's workspace only when it is on.
TEST(Model, Bf16AttentionOnNativeKernelTracksTheF32Kernel) {
  if (!attention::native_bf16_attention_usable()) {
    std::printf("SKIP: this CPU or OS has neither AMX-BF16 tiles nor AVX512-BF16\n");
    GTEST_SKIP();
  }
  std::printf("native bf16 attention backend: %s\n", attention::native_bf16_attention_backend());
  ModelConfig cfg = small_config(true, Activation::gelu, 2);
  cfg.max_seq = kNativeAttentionMinSeq;  // the shortest sequence that runs natively
  const int64_t B = 2, T = kNativeAttentionMinSeq;
  auto tokens = random_tokens(B, T, cfg.vocab, 31);
  LossSum loss[2];
  std::vector<float> grads[2];
  for (int amx : {0, 1}) {
    set_native_attention_for_testing(amx);
    MemoryPool pool;
    Gpt m(cfg, pool, Precision::bf16);
    m.init_weights(4);
    m.zero_grads();
    const int64_t base = pool.current(MemCategory::workspace);
    pool.reset_peaks();
    loss[amx] = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
    grads[amx].assign(m.grads(), m.grads() + m.layout().total());
    parallel::ParallelPlan plan;
    plan.micro_batch_size = B;
    plan.recompute.assign(size_t(cfg.n_layers), Recompute::none);
    const RankMemory est = memory_per_rank(cfg, plan, 0, T, Precision::bf16);
    EXPECT_EQ(pool.peak(MemCategory::workspace) - base, est.bytes[size_t(MemCategory::workspace)])
        << "native attention " << amx;
  }
  set_native_attention_for_testing(-1);
  const double l0 = loss[0].sum / double(loss[0].count), l1 = loss[1].sum / double(loss[1].count);
  std::printf("loss f32 kernel %.8f, native %.8f; gradient relative L2 %.3g\n", l0, l1,
              relative_l2(grads[1], grads[0]));
  EXPECT_NE(l0, l1) << "the native path was not taken";
  // The loss (~log V nats) moves through the attention output, whose error is a few bf16
  // roundings (2^-9) scaled by how little the softmax of random weights depends on q and k:
  // measured 0.7-1.8e-6 relative (T 96 and 256). A packing or layout bug moves it by O(1).
  EXPECT_NEAR(l1, l0, 1e-4 * l0);
  // Gradients: the attention path's gradients carry a few 2^-9 = 2e-3 roundings (q, k, v, dout,
  // P, dS), the other tensors inherit a share of them: measured 3.2-4.1e-4 over the whole model;
  // the bound is two roundings' worth.
  EXPECT_LT(relative_l2(grads[1], grads[0]), 4e-3);
  // Shorter sequences stay on the f32 kernel (kNativeAttentionMinSeq): the same bits either way.
  const int64_t Ts = kNativeAttentionMinSeq / 2;
  double short_loss[2];
  for (int amx : {0, 1}) {
    set_native_attention_for_testing(amx);
    MemoryPool pool;
    Gpt m(cfg, pool, Precision::bf16);
    m.init_weights(4);
    short_loss[amx] = m.forward_loss(tokens.data(), 1, Ts).sum;
  }
  set_native_attention_for_testing(-1);
  EXPECT_EQ(short_loss[0], short_loss[1]);
}

// Emulated bf16 (f32 tensors holding bf16 values, f32 kernel) computes exactly what the
// widened bf16 matmul computes from bf16 tensors: losses and every gradient bit-identical, with
// and without recompute, and for the query layer's head.
TEST(Model, EmulatedBf16IsBitIdenticalToWidenedBf16) {
  // `auto` takes native only on CPUs with AMX: ask for the widened path unless the caller chose
  // (no effect if already decided).
  ::setenv("LOOM_BF16_MATMUL", "widen", 0);
  if (kernels::bf16_matmul_path() != kernels::Bf16MatmulPath::widen) {
    std::printf("SKIP: bf16 matmuls take oneDNN's native path here (LOOM_BF16_MATMUL), so "
                "emulation is not used\n");
    GTEST_SKIP();
  }
  ModelConfig cfg = small_config(true, Activation::fast_gelu, 2);
  const int64_t B = 2, T = 16;
  auto tokens = random_tokens(B, T, cfg.vocab, 21);
  for (Recompute mode : {Recompute::none, Recompute::full}) {
    MemoryPool pool;
    set_bf16_emulation_for_testing(0);
    Gpt widened(cfg, pool, Precision::bf16);
    set_bf16_emulation_for_testing(1);
    Gpt emulated(cfg, pool, Precision::bf16);
    set_bf16_emulation_for_testing(-1);
    for (Gpt* g : {&widened, &emulated}) {
      g->set_recompute(mode);
      g->init_weights(3);
    }
    LossSum a = widened.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
    LossSum b = emulated.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
    EXPECT_EQ(a.sum, b.sum) << recompute_name(mode);
    const int64_t n = widened.layout().total();
    EXPECT_EQ(std::memcmp(widened.grads(), emulated.grads(), size_t(n) * 4), 0)
        << recompute_name(mode);
  }
}

TEST(Model, ForwardLossEqualsForwardBackwardLoss) {
  ModelConfig cfg = small_config(true, Activation::gelu, 2);
  const int64_t B = 3, T = 9;
  auto tokens = random_tokens(B, T, cfg.vocab, 14);
  MemoryPool pool;
  Gpt m(cfg, pool, Precision::f32);
  m.init_weights(1);
  LossSum a = m.forward_loss(tokens.data(), B, T);
  LossSum b = m.forward_backward(tokens.data(), B, T, 1.0f);
  EXPECT_EQ(a.sum, b.sum);
  EXPECT_EQ(a.count, b.count);
}

TEST(Model, RejectsBadTokensAndLengthsBeforeTouchingAnything) {
  ModelConfig cfg = small_config(false, Activation::gelu, 4);
  MemoryPool pool;
  Gpt m(cfg, pool, Precision::f32);
  m.init_weights(1);
  auto tokens = random_tokens(1, 8, cfg.vocab, 15);
  tokens[3] = int32_t(cfg.vocab);  // one past the vocabulary
  try {
    m.forward_backward(tokens.data(), 1, 8, 1.f);
    FAIL() << "no error for a token id >= vocab";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 37"), std::string::npos) << e.what();
  }
  for (int64_t i = 0; i < m.layout().total(); ++i) ASSERT_EQ(m.grads()[i], 0.f);
  std::vector<int32_t> longer(size_t(cfg.max_seq + 2), 1);
  EXPECT_THROW(m.forward_loss(longer.data(), 1, cfg.max_seq + 1), Error);
}

TEST(Model, GradReadyRangesTileTheBufferBackToFront) {
  // Data parallelism starts reducing each range as soon as the hook reports it, so the ranges
  // must cover every gradient exactly once, arrive back to front, and be final when reported.
  for (bool ql : {true, false}) {
    ModelConfig cfg = small_config(ql, Activation::gelu, 2);
    MemoryPool pool;
    Gpt m(cfg, pool, Precision::f32);
    m.init_weights(1);
    auto tokens = random_tokens(2, 8, cfg.vocab, 16);
    std::vector<std::pair<int64_t, int64_t>> ranges;
    std::vector<float> at_report(size_t(m.layout().total()));
    m.set_grad_ready_hook([&](int64_t b, int64_t e) {
      ranges.emplace_back(b, e);
      std::copy(m.grads() + b, m.grads() + e, at_report.begin() + b);
    });
    m.zero_grads();
    m.forward_backward(tokens.data(), 2, 8, 1.f / 16);
    ASSERT_FALSE(ranges.empty());
    EXPECT_EQ(ranges.front().second, m.layout().total());
    EXPECT_EQ(ranges.back().first, 0);
    for (size_t i = 1; i < ranges.size(); ++i) EXPECT_EQ(ranges[i].second, ranges[i - 1].first);
    std::vector<float> final_grads(m.grads(), m.grads() + m.layout().total());
    EXPECT_EQ(at_report, final_grads) << "a range changed after it was reported";
  }
}

TEST(Config, StrictAndActionable) {
  EXPECT_THROW(model_config_from_toml("vocab=10\nn_layers=1\nd_model=8\nn_heads=2\nd_ff=8\n"
                                      "max_seq=4\nbogus=1\n", "x.toml"), Error);
  try {
    model_config_from_toml("vocab=10\nn_layers=1\nd_model=8\nn_heads=4\nn_kv_heads=3\nd_ff=8\n"
                           "max_seq=4\n", "x.toml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("choose one of 1, 2, 4"), std::string::npos) << e.what();
  }
  ModelConfig c = small_config(true, Activation::fast_gelu, 2);
  ModelConfig back = model_config_from_toml(c.to_toml(), "roundtrip");
  EXPECT_EQ(back.to_toml(), c.to_toml());
}

// Sizes from a file are range-checked in checked arithmetic: 2^62 positions or 2^40 layers used
// to pass (a wrapped parameter count, 0-byte tensors, an allocation until the OOM killer).
TEST(Config, HugeSizesAreRejectedWithTheLimit) {
  auto expect_rejected = [](const std::string& extra, const std::string& what) {
    std::string text = "vocab=10\nn_heads=2\n" + extra;
    try {
      model_config_from_toml(text, "huge.toml");
      FAIL() << "accepted: " << extra;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_rejected("d_model=8\nd_ff=8\nn_layers=1\nmax_seq=4611686018427387904\n",
                  "max_seq = 4611686018427387904 exceeds the limit 16777216");
  expect_rejected("d_model=8\nd_ff=8\nn_layers=1099511627776\nmax_seq=4\n",
                  "n_layers = 1099511627776 exceeds the limit 16384");
  expect_rejected("d_model=8\nn_layers=1\nmax_seq=4\nd_ff=9223372036854775807\n", "d_ff = ");
  // A float where an integer belongs (fuzz_model_toml: 5E20 used to be converted with UB).
  expect_rejected("d_model=5E20\nd_ff=8\nn_layers=1\nmax_seq=4\n",
                  "model key 'd_model' must be an integer");
  // Each field within its limit, the product not: parameters.
  expect_rejected("n_layers=16384\nmax_seq=4\nd_model=1048576\nd_ff=8\n",
                  "parameters exceed the limit");
  // Activations of one sequence: huge vocab times long sequences.
  try {
    model_config_from_toml("vocab=2000000000\nn_layers=1\nd_model=8\nn_heads=2\nd_ff=8\n"
                           "max_seq=16777216\n", "act.toml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bytes of activations"), std::string::npos) << e.what();
  }
  ModelConfig ok = model_config_from_toml(
      "vocab=52224\nn_layers=39\nd_model=5120\nn_heads=40\nd_ff=20480\nmax_seq=2048\n"
      "query_layer=true\n", "codegeex.toml");
  EXPECT_GT(ok.num_params(), int64_t(12e9));  // CodeGeeX-13B: 12.9e9 with vocab 52224
}

TEST(Config, DirectoryOrMissingFileIsNamed) {
  const std::string dir = ::testing::TempDir();
  try {
    load_model_config(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_model_config(dir + "/no_such_model.toml"), Error);
}

}  // namespace
