// Tests for infer/decoder.h: the KV-cached forward against full recomputation
// (model::Gpt::last_logits over the whole context), for every layout feature of the presets
// (query layer on/off, GQA / MHA / MQA, gelu, fast_gelu, gelu_erf), at batch 1 and in a ragged
// batch of 8; batch invariance; bf16 and int8 weights.
//
// Glossary: V vocab, C d_model, P prompt length, G generated tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/memory_pool.h"
#include "core/rng.h"
#include "infer/decoder.h"
#include "model/config.h"
#include "model/gpt.h"

namespace loom::infer {
namespace {

using model::Activation;
using model::ModelConfig;

ModelConfig config(bool query_layer, Activation act, int64_t nkv) {
  ModelConfig c;
  c.name = "infer-test";
  c.vocab = 96;
  c.n_layers = 2;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = nkv;
  c.d_ff = 64;
  c.max_seq = 64;
  c.activation = act;
  c.query_layer = query_layer;
  c.validate();
  return c;
}

// A model with loom's init, perturbed so biases and norms are not at their special values (zero
// biases would hide a bias applied to the wrong rows), and scaled up so logits spread out.
struct TestModel {
  ModelConfig cfg;
  MemoryPool pool;
  model::Gpt gpt;
  explicit TestModel(const ModelConfig& c) : cfg(c), gpt(c, pool, model::Precision::f32) {
    gpt.init_weights(3);
    for (int64_t i = 0; i < gpt.layout().total(); ++i)
      gpt.weights()[i] = 4.f * gpt.weights()[i] + 0.05f * rng_normal(17, 5, uint64_t(i));
  }
  std::vector<float> recompute_logits(const std::vector<int32_t>& ctx) {
    std::vector<float> l(static_cast<size_t>(cfg.vocab));
    gpt.last_logits(l.data(), ctx.data(), 1, int64_t(ctx.size()));
    return l;
  }
};

std::vector<int32_t> prompt(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    p[size_t(i)] = int32_t(rng_u64(seed, 8, uint64_t(i)) % uint64_t(V));
  return p;
}

int32_t argmax(const float* l, int64_t V) { return int32_t(std::max_element(l, l + V) - l); }

// Largest minus second largest logit.
double margin(const std::vector<float>& l) {
  std::vector<float> s = l;
  std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<float>());
  return double(s[0]) - double(s[1]);
}

double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, double(std::fabs(x)));
  return m;
}

// Greedy generation of G tokens for each prompt at once through the cache: one prefill step of
// every prompt, then G-1 decode steps of one token each. Returns each sequence's per-step logits.
std::vector<std::vector<std::vector<float>>> cached_greedy(
    const ModelWeights& w, const std::vector<std::vector<int32_t>>& prompts, int64_t G,
    std::vector<std::vector<int32_t>>* tokens, const std::vector<int32_t>& domains = {},
    DType kv = DType::f32) {
  const ModelConfig& cfg = w.config();
  Decoder dec(w);
  const int64_t B = int64_t(prompts.size()), V = cfg.vocab;
  KvCache cache(dec.cache_shape(kv), dec.cache_shape(kv).block_bytes() * 4 * B * 2, cfg.max_seq);
  std::vector<std::vector<int32_t>> ctx = prompts;
  std::vector<int64_t> seq(static_cast<size_t>(B)), cached(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    seq[size_t(b)] = cache.create();
    EXPECT_TRUE(cache.reserve(seq[size_t(b)], int64_t(prompts[size_t(b)].size()) + G));
  }
  std::vector<std::vector<std::vector<float>>> out(static_cast<size_t>(B));
  std::vector<float> logits(size_t(B * V));
  for (int64_t g = 0; g < G; ++g) {
    std::vector<SeqStep> steps(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const auto& c = ctx[size_t(b)];
      steps[size_t(b)] = {seq[size_t(b)], cached[size_t(b)],
                          std::span<const int32_t>(c.data() + cached[size_t(b)],
                                                   c.size() - size_t(cached[size_t(b)]))};
      if (!domains.empty()) steps[size_t(b)].domain = domains[size_t(b)];
    }
    dec.forward(cache, steps, logits.data());
    for (int64_t b = 0; b < B; ++b) {
      cached[size_t(b)] = int64_t(ctx[size_t(b)].size());
      const float* l = logits.data() + b * V;
      out[size_t(b)].emplace_back(l, l + V);
      ctx[size_t(b)].push_back(argmax(l, V));
    }
  }
  if (tokens) {
    tokens->clear();
    for (int64_t b = 0; b < B; ++b)
      tokens->emplace_back(ctx[size_t(b)].begin() + int64_t(prompts[size_t(b)].size()),
                           ctx[size_t(b)].end());
  }
  return out;
}

struct Layout {
  bool query_layer;
  Activation act;
  int64_t nkv;
};
std::string layout_name(const ::testing::TestParamInfo<Layout>& i) {
  return std::string(i.param.query_layer ? "ql_" : "noql_") + model::activation_name(i.param.act) +
         "_nkv" + std::to_string(i.param.nkv);
}

class CachedVsRecompute : public ::testing::TestWithParam<Layout> {};

// Greedy tokens of the cache equal those of recomputation, and every step's logits agree within
// 1e-5 of the logits' scale: both are f32 with different summation orders (oneDNN matmul and
// flash attention vs weight_matmul and paged attention), ~1e-6 relative after 3 layers.
void check_against_recompute(TestModel& m, const std::vector<std::vector<int32_t>>& prompts,
                             int64_t G) {
  const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
  std::vector<std::vector<int32_t>> toks;
  auto logits = cached_greedy(w, prompts, G, &toks);
  for (size_t b = 0; b < prompts.size(); ++b) {
    std::vector<int32_t> ctx = prompts[b];
    for (int64_t g = 0; g < G; ++g) {
      const std::vector<float> ref = m.recompute_logits(ctx);
      const std::vector<float>& got = logits[b][size_t(g)];
      double err = 0;
      for (size_t v = 0; v < ref.size(); ++v)
        err = std::max(err, double(std::fabs(ref[v] - got[v])));
      EXPECT_LE(err, 1e-5 * std::max(1.0, max_abs(ref))) << "sequence " << b << " step " << g;
      const int32_t want = argmax(ref.data(), m.cfg.vocab);
      if (margin(ref) > 1e-5 * std::max(1.0, max_abs(ref)))
        EXPECT_EQ(toks[b][size_t(g)], want) << "sequence " << b << " step " << g;
      else
        std::printf("sequence %zu step %lld: top-2 margin %.3g below tolerance\n", b, (long long)g,
                    margin(ref));
      ctx.push_back(want);  // follow the reference path
      if (toks[b][size_t(g)] != want) break;
    }
  }
}

TEST_P(CachedVsRecompute, Batch1) {
  TestModel m(config(GetParam().query_layer, GetParam().act, GetParam().nkv));
  check_against_recompute(m, {prompt(5, m.cfg.vocab, 1)}, 20);
}

TEST_P(CachedVsRecompute, RaggedBatchOf8) {
  TestModel m(config(GetParam().query_layer, GetParam().act, GetParam().nkv));
  std::vector<std::vector<int32_t>> ps;
  const int64_t lens[8] = {1, 3, 16, 7, 13, 2, 17, 33};  // across block boundaries
  for (int i = 0; i < 8; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 100 + uint64_t(i)));
  check_against_recompute(m, ps, 12);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CachedVsRecompute,
                         ::testing::Values(Layout{true, Activation::fast_gelu, 2},
                                           Layout{false, Activation::gelu, 4},
                                           Layout{true, Activation::gelu, 4},
                                           Layout{false, Activation::fast_gelu, 1},
                                           Layout{true, Activation::gelu_erf, 2}),
                         layout_name);

// The same sequence gives bitwise the same logits alone or in a ragged batch of 8: f32, bf16 and
// int8 weights, each with an f32 and a bf16 KV cache. bf16 with set_batch_invariant(true) (on
// AMX, a batch of one row otherwise reads its weights with vector loads: next test).
TEST(Decoder, BatchInvariantBitwise) {
  TestModel m(config(true, Activation::fast_gelu, 2));
  for (WeightFormat f : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::int8_row})
    for (DType kv : {DType::f32, DType::bf16}) {
      ModelWeights w(m.cfg, m.gpt.weights(), f, f);
      w.set_batch_invariant(true);
      ASSERT_TRUE(w.batch_invariant());
      EXPECT_TRUE(w.block_linears(1).down.batch_invariant && w.query_linears().qkv.batch_invariant);
      std::vector<std::vector<int32_t>> ps;
      const int64_t lens[8] = {9, 1, 4, 17, 6, 2, 30, 11};
      for (int i = 0; i < 8; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 300 + uint64_t(i)));
      std::vector<std::vector<int32_t>> tb;
      auto batched = cached_greedy(w, ps, 10, &tb, {}, kv);
      const std::string what =
          std::string(weight_format_name(f)) + " weights, " + std::string(dtype_name(kv)) + " KV";
      for (size_t b = 0; b < ps.size(); ++b) {
        std::vector<std::vector<int32_t>> t1;
        auto alone = cached_greedy(w, {ps[b]}, 10, &t1, {}, kv);
        EXPECT_EQ(t1[0], tb[b]) << what << " sequence " << b;
        for (size_t g = 0; g < alone[0].size(); ++g)
          EXPECT_EQ(0,
                    std::memcmp(alone[0][g].data(), batched[b][g].data(), alone[0][g].size() * 4))
              << what << " sequence " << b << " step " << g;
      }
    }
}

// bf16 by default (no set_batch_invariant): every batch of two or more rows runs one kernel (AMX
// tiles where the CPU has them), so a sequence's logits are bitwise the same in any batch of two
// or more sequences: each sequence of the ragged batch of 8 again beside one other (prefill rows
// >= 2, decode rows 2). Alone (one row a decode step) it gets the reference summation order:
// within bf16's tolerance (Bf16LogitsWithinTolerance), not bitwise.
TEST(Decoder, Bf16BatchesOfTwoOrMoreInvariantByDefault) {
  TestModel m(config(true, Activation::fast_gelu, 2));
  for (DType kv : {DType::f32, DType::bf16}) {
    const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::bf16, WeightFormat::bf16);
    ASSERT_FALSE(w.batch_invariant());
    std::vector<std::vector<int32_t>> ps;
    const int64_t lens[8] = {9, 1, 4, 17, 6, 2, 30, 11};
    for (int i = 0; i < 8; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 300 + uint64_t(i)));
    std::vector<std::vector<int32_t>> tb;
    auto batched = cached_greedy(w, ps, 10, &tb, {}, kv);
    for (size_t b = 0; b < ps.size(); ++b) {
      std::vector<std::vector<int32_t>> t2;
      auto pair = cached_greedy(w, {ps[b], ps[(b + 3) % ps.size()]}, 10, &t2, {}, kv);
      EXPECT_EQ(t2[0], tb[b]) << dtype_name(kv) << " KV, sequence " << b;
      for (size_t g = 0; g < pair[0].size(); ++g)
        EXPECT_EQ(0, std::memcmp(pair[0][g].data(), batched[b][g].data(), pair[0][g].size() * 4))
            << dtype_name(kv) << " KV, sequence " << b << " step " << g;
    }
  }
}

// bf16 weights (linears) against f32 recomputation. The dtype's tolerance is what rounding the
// weights to bf16 costs in a plain implementation: model::Gpt in f32 on the same weights rounded
// to bf16 (conventions: error at most 2x a plain same-dtype implementation's, against the exact
// f32 model). Separately, the bf16 path must equal that plain model within the f32 tolerance
// (it multiplies exactly the rounded values). Tokens are compared up to the first step whose
// top-2 margin is below the tolerance; such steps are printed.
// m's weights with every linear rounded to bf16, computed in f32: the plain bf16 implementation.
void round_linears_to_bf16(const TestModel& m, TestModel& rounded) {
  std::copy(m.gpt.weights(), m.gpt.weights() + m.gpt.layout().total(), rounded.gpt.weights());
  for (const auto& spec : m.gpt.layout().specs()) {
    const std::string& n = spec.name;
    const bool linear = n.find("attn.q.weight") != n.npos || n.find("attn.k.weight") != n.npos ||
                        n.find("attn.v.weight") != n.npos || n.find("attn.out.weight") != n.npos ||
                        n.find("ffn.up.weight") != n.npos || n.find("ffn.down.weight") != n.npos;
    if (linear)
      round_f32_to_bf16(rounded.gpt.weights() + spec.offset, rounded.gpt.weights() + spec.offset,
                        size_t(spec.numel));
  }
}

TEST(Decoder, Bf16LogitsWithinTolerance) {
  TestModel m(config(true, Activation::fast_gelu, 2));
  const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::bf16, WeightFormat::f32);
  TestModel rounded(m.cfg);  // the plain bf16 implementation: linears rounded, f32 arithmetic
  round_linears_to_bf16(m, rounded);
  int64_t compared = 0;
  double worst = 0, worst_plain = 0;
  for (uint64_t seed = 0; seed < 6; ++seed) {
    const std::vector<int32_t> p = prompt(6 + int64_t(seed), m.cfg.vocab, 40 + seed);
    std::vector<std::vector<int32_t>> toks;
    const int64_t G = 16;
    auto logits = cached_greedy(w, {p}, G, &toks);
    std::vector<int32_t> ctx = p;
    for (size_t g = 0; g < size_t(G); ++g) {
      const std::vector<float> ref = m.recompute_logits(ctx);
      const std::vector<float> plain = rounded.recompute_logits(ctx);
      const double scale = std::max(1.0, max_abs(ref));
      double err = 0, err_plain = 0, err_same = 0;
      for (size_t v = 0; v < ref.size(); ++v) {
        err = std::max(err, double(std::fabs(ref[v] - logits[0][g][v])));
        err_plain = std::max(err_plain, double(std::fabs(ref[v] - plain[v])));
        err_same = std::max(err_same, double(std::fabs(plain[v] - logits[0][g][v])));
      }
      worst = std::max(worst, err / scale);
      worst_plain = std::max(worst_plain, err_plain / scale);
      const double tol = 2 * err_plain + 1e-5 * scale;
      EXPECT_LE(err, tol) << "prompt " << seed << " step " << g;
      EXPECT_LE(err_same, 1e-5 * scale) << "prompt " << seed << " step " << g;
      if (margin(ref) < tol) {
        std::printf(
            "bf16 prompt %llu step %zu: top-2 margin %.3g below tolerance %.3g; tokens "
            "compared up to here\n",
            (unsigned long long)seed, g, margin(ref), tol);
        break;
      }
      EXPECT_EQ(toks[0][g], argmax(ref.data(), m.cfg.vocab)) << "prompt " << seed << " step " << g;
      ++compared;
      ctx.push_back(toks[0][g]);
    }
  }
  std::printf(
      "bf16: %lld tokens compared; worst logit error %.3g of the logits' scale (plain "
      "bf16-rounded model: %.3g)\n",
      (long long)compared, worst, worst_plain);
  EXPECT_GE(compared, 10);
}

// A bf16 KV cache (f32 weights) against the f32 cache. The numerics: every K and V element is
// rounded to bf16 once, when it is written (relative error <= 2^-9); paged attention widens it
// exactly and accumulates in f32 (attention_test_paged_attention checks it equals the f32 kernel
// on the rounded K/V bitwise). So the only difference from the f32 cache is that rounding: an
// activation rounding of the same relative size as rounding the linears' weights to bf16. A
// rounded key moves a score by up to 2^-9 |q.k|, an absolute change that the softmax turns into
// weight changes; this test model's scores are large (its weights are scaled 4x), so per step
// the KV error is of the same order as the bf16-weight error, sometimes above it. The dtype's
// tolerance is therefore taken over the whole run: 2x the worst logit error (relative to the
// logits' scale) of the plain bf16 model (linears rounded, f32 arithmetic) against the exact one
// on the same contexts (conventions: at most 2x a plain same-dtype implementation), plus the f32
// tolerance 1e-5. Tokens are compared up to the first step whose top-2 margin is below it; such
// steps are printed.
TEST(Decoder, Bf16KvCacheWithinToleranceOfF32Kv) {
  for (const Layout& lay :
       {Layout{true, Activation::fast_gelu, 2}, Layout{false, Activation::gelu, 4}}) {
    TestModel m(config(lay.query_layer, lay.act, lay.nkv));
    const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
    TestModel rounded(m.cfg);
    round_linears_to_bf16(m, rounded);
    const int64_t G = 16, n_prompts = 6;
    std::vector<std::vector<int32_t>> ps;
    for (int64_t i = 0; i < n_prompts; ++i)
      ps.push_back(prompt(6 + 5 * i, m.cfg.vocab, 60 + uint64_t(i)));
    // Pass 1: the f32 cache's greedy paths, and the plain bf16 model's error along them.
    std::vector<std::vector<std::vector<float>>> l32(static_cast<size_t>(n_prompts));
    std::vector<std::vector<int32_t>> t32(static_cast<size_t>(n_prompts));
    double worst_plain = 0;
    for (size_t i = 0; i < ps.size(); ++i) {
      std::vector<std::vector<int32_t>> t;
      l32[i] = cached_greedy(w, {ps[i]}, G, &t, {}, DType::f32)[0];
      t32[i] = t[0];
      std::vector<int32_t> ctx = ps[i];
      for (int64_t g = 0; g < G; ++g) {
        const std::vector<float> exact = m.recompute_logits(ctx);
        const std::vector<float> plain = rounded.recompute_logits(ctx);
        double e = 0;
        for (size_t v = 0; v < exact.size(); ++v)
          e = std::max(e, double(std::fabs(exact[v] - plain[v])));
        worst_plain = std::max(worst_plain, e / std::max(1.0, max_abs(exact)));
        ctx.push_back(t32[i][size_t(g)]);
      }
    }
    const double tol_rel = 2 * worst_plain + 1e-5;
    // Pass 2: the bf16 cache along the same prompts.
    int64_t compared = 0;
    double worst = 0;
    for (size_t i = 0; i < ps.size(); ++i) {
      std::vector<std::vector<int32_t>> t16;
      auto l16 = cached_greedy(w, {ps[i]}, G, &t16, {}, DType::bf16)[0];
      for (size_t g = 0; g < size_t(G); ++g) {
        const std::vector<float>& ref = l32[i][g];
        const double scale = std::max(1.0, max_abs(ref)), tol = tol_rel * scale;
        double err = 0;
        for (size_t v = 0; v < ref.size(); ++v)
          err = std::max(err, double(std::fabs(ref[v] - l16[g][v])));
        worst = std::max(worst, err / scale);
        EXPECT_LE(err, tol) << "prompt " << i << " step " << g;
        if (margin(ref) < tol) {
          std::printf(
              "bf16 KV prompt %zu step %zu: top-2 margin %.3g below tolerance %.3g; tokens "
              "compared up to here\n",
              i, g, margin(ref), tol);
          break;
        }
        EXPECT_EQ(t16[0][g], t32[i][g]) << "prompt " << i << " step " << g;
        ++compared;
      }
    }
    std::printf(
        "bf16 KV (%s): %lld tokens compared; worst logit error %.3g of the logits' scale; "
        "tolerance %.3g (plain bf16-weight model's worst: %.3g)\n",
        lay.query_layer ? "query layer, nkv 2" : "no query layer, nkv 4", (long long)compared,
        worst, tol_rel, worst_plain);
    EXPECT_GT(worst, 0.0);  // the cache really was bf16
    EXPECT_GE(compared, 10);
  }
}

// int8 per-row weights: the quantisation bound |W - s q| <= s/2 per element, and hence every
// matmul output within sum_k |x_k| * s_n / 2 (plus f32 rounding) of the f32 product.
TEST(Decoder, Int8PerRowErrorBound) {
  const int64_t N = 13, K = 127, M = 5;
  std::vector<float> W(size_t(N * K)), x(size_t(M * K)), scales(static_cast<size_t>(N));
  rng_fill_normal(W.data(), N * K, 0.f, 1.f, 4, 1, 0);
  for (int64_t k = 0; k < K; ++k) W[size_t(3 * K + k)] = 0.f;  // an all-zero row
  W[size_t(5 * K + 7)] = 40.f;                                 // an outlier
  rng_fill_normal(x.data(), M * K, 0.f, 1.f, 4, 2, 0);
  std::vector<int8_t> q(size_t(N * K));
  kernels::quantize_rows_int8(q.data(), scales.data(), W.data(), N, K);
  EXPECT_EQ(scales[3], 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      EXPECT_LE(std::fabs(W[size_t(n * K + k)] - scales[size_t(n)] * q[size_t(n * K + k)]),
                scales[size_t(n)] / 2 * (1 + 1e-6))
          << n << "," << k;
  std::vector<float> y8(size_t(M * N)), y32(size_t(M * N));
  kernels::weight_matmul(y8.data(), 0, x.data(), M,
                         {WeightFormat::int8_row, N, K, q.data(), scales.data()}, nullptr);
  kernels::weight_matmul(y32.data(), 0, x.data(), M, {WeightFormat::f32, N, K, W.data(), nullptr},
                         nullptr);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double l1 = 0;
      for (int64_t k = 0; k < K; ++k) l1 += std::fabs(x[size_t(m * K + k)]);
      const double bound = l1 * scales[size_t(n)] / 2 + 1e-4 * (1 + l1);
      EXPECT_LE(std::fabs(y8[size_t(m * N + n)] - y32[size_t(m * N + n)]), bound) << m << "," << n;
    }
}

// The whole int8 model stays close to f32: next-token distributions of the prompt, reported.
TEST(Decoder, Int8ModelCloseToF32) {
  TestModel m(config(true, Activation::fast_gelu, 2));
  const ModelWeights w8(m.cfg, m.gpt.weights(), WeightFormat::int8_row, WeightFormat::f32);
  const std::vector<int32_t> p = prompt(12, m.cfg.vocab, 21);
  auto l8 = cached_greedy(w8, {p}, 1, nullptr);
  const std::vector<float> ref = m.recompute_logits(p);
  double err = 0;
  for (size_t v = 0; v < ref.size(); ++v)
    err = std::max(err, double(std::fabs(ref[v] - l8[0][0][v])));
  std::printf("int8: max logit error %.3g, logits' scale %.3g\n", err, max_abs(ref));
  // int8 rounding is 1/254 of a row's max per weight: a few percent of the logits' scale at most.
  EXPECT_LE(err, 5e-2 * std::max(1.0, max_abs(ref)));
  EXPECT_GT(err, 0.0);  // it really ran quantised
}

// --int8-head: the tied head's copy of the token embedding in int8 rows as well. Its bytes and
// scales are exactly quantize_rows_int8 of the embedding (the rule every int8 linear follows; the
// embedding lookup keeps the f32 table), the bytes a decode step reads fall by the head's bf16 ->
// int8 difference, and the logits stay within the int8 model's tolerance of the f32 ones (the
// test above: int8 rounding is at most half a row's step per weight). The flag rules too.
TEST(Decoder, Int8HeadIsTheQuantizedEmbedding) {
  TestModel m(config(true, Activation::fast_gelu, 2));
  const ModelWeights w8(m.cfg, m.gpt.weights(), WeightFormat::int8_row, WeightFormat::bf16);
  const ModelWeights w8h(m.cfg, m.gpt.weights(), WeightFormat::int8_row, WeightFormat::int8_row);
  ASSERT_EQ(w8h.head().format, WeightFormat::int8_row);
  const int64_t V = m.cfg.vocab, C = m.cfg.d_model;
  const model::ParamSpec& emb = m.gpt.layout().find("embed.token.weight");
  std::vector<int8_t> q(size_t(V * C));
  std::vector<float> sc(static_cast<size_t>(V));
  kernels::quantize_rows_int8(q.data(), sc.data(), m.gpt.weights() + emb.offset, V, C);
  // The head holds those values in its own layout (panels on AVX-512 CPUs).
  const kernels::WeightView& h = w8h.head();
  int64_t differ = 0;
  for (int64_t v = 0; v < V; ++v)
    for (int64_t c = 0; c < C; ++c)
      differ += static_cast<const int8_t*>(h.data)[kernels::weight_element_index(h, v, c)] !=
                q[size_t(v * C + c)];
  EXPECT_EQ(differ, 0);
  EXPECT_EQ(std::memcmp(sc.data(), w8h.head().scales, sc.size() * sizeof(float)), 0);
  // The matmul bytes fall by the head's bf16 -> int8 difference: V*C*(2 - 1) - 4*V (scales),
  // with each layout's padding (panels round V up to 16 columns, int8 spans to 64; tile order
  // to 32).
  auto stored = [&](const kernels::WeightView& v) {
    switch (v.layout) {
      case kernels::WeightLayout::rows: return V * C;
      case kernels::WeightLayout::panels: return kernels::panels_elements(v.format, V, C);
      case kernels::WeightLayout::amx_tiles: return kernels::amx_tiles_elements(V, C);
    }
    return int64_t(0);
  };
  EXPECT_EQ(w8.matmul_weight_bytes() - w8h.matmul_weight_bytes(),
            2 * stored(w8.head()) - (stored(w8h.head()) + 4 * V));
  const std::vector<int32_t> p = prompt(12, V, 21);
  auto l8 = cached_greedy(w8h, {p}, 1, nullptr);
  const std::vector<float> ref = m.recompute_logits(p);
  double err = 0;
  for (size_t v = 0; v < ref.size(); ++v) err = std::max(err, double(std::fabs(ref[v] - l8[0][0][v])));
  std::printf("int8 linears + int8 head: max logit error %.3g, logits' scale %.3g\n", err, max_abs(ref));
  EXPECT_LE(err, 5e-2 * std::max(1.0, max_abs(ref)));
  // Flags: --int8 stores the head in int8 too unless --head-dtype says otherwise; --int8-head
  // (the older spelling) needs --int8; --kv-dtype auto keeps following --dtype.
  const WeightFormats f = weight_formats_from_flags("bf16", true, true);
  EXPECT_EQ(f.linears, WeightFormat::int8_row);
  EXPECT_EQ(f.head, WeightFormat::int8_row);
  EXPECT_EQ(f.base, WeightFormat::bf16);
  EXPECT_EQ(weight_formats_from_flags("f32", true).head, WeightFormat::int8_row);
  EXPECT_EQ(weight_formats_from_flags("f32", true, false, "bf16").head, WeightFormat::bf16);
  EXPECT_EQ(weight_formats_from_flags("bf16", false).head, WeightFormat::bf16);
  EXPECT_EQ(weight_formats_from_flags("bf16", false, false, "int8").head, WeightFormat::int8_row);
  EXPECT_EQ(weight_formats_from_flags("bf16", false, false, "int8").linears, WeightFormat::bf16);
  try {
    (void)weight_formats_from_flags("f32", false, true);
    ADD_FAILURE() << "--int8-head without --int8 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("give it with --int8"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)weight_formats_from_flags("f32", true, true, "bf16"), Error);
  EXPECT_THROW((void)weight_formats_from_flags("f32", true, false, "fp8"), Error);
}

// ---- Sparse (MoE, rre) blocks: configs/models/tiny-moe.toml (top block sparse, 4 domains x 2
// experts, query layer). Weights perturbed like TestModel's except the frozen routing table.
struct MoeModel {
  ModelConfig cfg;
  MemoryPool pool;
  model::Gpt gpt;
  explicit MoeModel(const ModelConfig& c) : cfg(c), gpt(c, pool, model::Precision::f32) {
    gpt.init_weights(3);
    for (const auto& s : gpt.layout().specs()) {
      if (!s.trainable) continue;  // the rre table: integer expert indices
      for (int64_t i = s.offset; i < s.offset + s.numel; ++i)
        gpt.weights()[i] = 4.f * gpt.weights()[i] + 0.05f * rng_normal(17, 5, uint64_t(i));
    }
  }
  // GptStage's full forward with every token of the context in `domain` (-1: null = "other").
  std::vector<float> recompute_logits(const std::vector<int32_t>& ctx, int32_t domain) {
    std::vector<float> l(static_cast<size_t>(cfg.vocab));
    std::vector<int32_t> d(ctx.size(), domain);
    gpt.stage().logits(l.data(), ctx.data(), 1, int64_t(ctx.size()), /*last_only=*/true,
                       domain >= 0 ? d.data() : nullptr);
    return l;
  }
};

ModelConfig tiny_moe() {
  return model::load_model_config(std::string(LOOM_TEST_DATA_DIR) +
                                  "/../../configs/models/tiny-moe.toml");
}

// Cached greedy decode of an rre model equals GptStage's full recomputation, per sequence with its
// own domain, f32 logits within 1e-5 of their scale (the dense test's tolerance: the same kernels
// with different summation orders), at batch 1 and in a ragged batch whose sequences use every
// domain and the default (-1).
void check_moe_against_recompute(MoeModel& m, const std::vector<std::vector<int32_t>>& prompts,
                                 const std::vector<int32_t>& domains, int64_t G) {
  const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
  std::vector<std::vector<int32_t>> toks;
  auto logits = cached_greedy(w, prompts, G, &toks, domains);
  for (size_t b = 0; b < prompts.size(); ++b) {
    std::vector<int32_t> ctx = prompts[b];
    for (int64_t g = 0; g < G; ++g) {
      const std::vector<float> ref = m.recompute_logits(ctx, domains[b]);
      const std::vector<float>& got = logits[b][size_t(g)];
      double err = 0;
      for (size_t v = 0; v < ref.size(); ++v)
        err = std::max(err, double(std::fabs(ref[v] - got[v])));
      EXPECT_LE(err, 1e-5 * std::max(1.0, max_abs(ref))) << "sequence " << b << " step " << g;
      const int32_t want = argmax(ref.data(), m.cfg.vocab);
      if (margin(ref) <= 1e-5 * std::max(1.0, max_abs(ref))) break;  // tie: stop comparing
      EXPECT_EQ(toks[b][size_t(g)], want) << "sequence " << b << " step " << g;
      ctx.push_back(want);
      if (toks[b][size_t(g)] != want) break;
    }
  }
}

// forward_all (every position's logits, for scoring text): in a ragged batch, row i of a
// sequence is bitwise the logits forward() gives for the prefix ending at token i (a batch of its
// own), and within 1e-5 of the full recomputation (model::Gpt::all_logits); for each layout with
// and without the query layer (the last layer keeps all rows instead of the last one).
TEST(Decoder, ForwardAllRowsEqualPrefixForwards) {
  for (bool ql : {true, false}) {
    TestModel m(config(ql, Activation::fast_gelu, 2));
    for (WeightFormat f : {WeightFormat::f32, WeightFormat::int8_row}) {
      const ModelWeights w(m.cfg, m.gpt.weights(), f, WeightFormat::f32);
      Decoder dec(w);
      const int64_t V = m.cfg.vocab;
      const std::vector<std::vector<int32_t>> ps = {prompt(13, V, 41), prompt(1, V, 42),
                                                    prompt(20, V, 43)};
      KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 16, m.cfg.max_seq);
      std::vector<SeqStep> steps;
      int64_t N = 0;
      for (const auto& p : ps) {
        const int64_t s = cache.create();
        ASSERT_TRUE(cache.reserve(s, int64_t(p.size())));
        steps.push_back({s, 0, p});
        N += int64_t(p.size());
      }
      std::vector<float> all(size_t(N * V));
      dec.forward_all(cache, steps, all.data());
      int64_t r = 0;
      for (const auto& p : ps) {
        std::vector<float> rec(p.size() * size_t(V));
        m.gpt.all_logits(rec.data(), p.data(), 1, int64_t(p.size()));
        for (size_t i = 0; i < p.size(); ++i, ++r) {
          KvCache c1(dec.cache_shape(), dec.cache_shape().block_bytes() * 4, m.cfg.max_seq);
          const int64_t s = c1.create();
          ASSERT_TRUE(c1.reserve(s, int64_t(i + 1)));
          std::vector<SeqStep> one = {{s, 0, std::span<const int32_t>(p.data(), i + 1)}};
          std::vector<float> l(static_cast<size_t>(V));
          dec.forward(c1, one, l.data());
          EXPECT_EQ(0, std::memcmp(l.data(), all.data() + r * V, size_t(V) * 4))
              << "query layer " << ql << " " << weight_format_name(f) << " row " << r;
          if (f == WeightFormat::f32) {
            double err = 0;
            for (int64_t v = 0; v < V; ++v)
              err = std::max(err, double(std::fabs(rec[i * size_t(V) + size_t(v)] -
                                                   all[size_t(r * V + v)])));
            EXPECT_LE(err, 1e-5 * std::max(1.0, max_abs(rec))) << "row " << r;
          }
        }
      }
    }
  }
}

TEST(MoeCachedVsRecompute, Batch1) {
  MoeModel m(tiny_moe());
  ASSERT_TRUE(m.cfg.moe.enabled());
  check_moe_against_recompute(m, {prompt(5, m.cfg.vocab, 1)}, {0}, 16);
}

TEST(MoeCachedVsRecompute, RaggedBatchMixedDomains) {
  MoeModel m(tiny_moe());
  std::vector<std::vector<int32_t>> ps;
  const int64_t lens[6] = {1, 3, 17, 7, 33, 2};  // across block boundaries
  for (int i = 0; i < 6; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 100 + uint64_t(i)));
  check_moe_against_recompute(m, ps, {0, 1, 2, 3, -1, 1}, 10);
}

// Without a query layer the sparse block is the last one, where only each sequence's last row
// goes on after attention (the decoder's last_only path routes those rows' tokens and domains).
TEST(MoeCachedVsRecompute, LastBlockSparseWithoutQueryLayer) {
  ModelConfig c = tiny_moe();
  c.query_layer = false;
  c.validate();
  MoeModel m(c);
  std::vector<std::vector<int32_t>> ps;
  const int64_t lens[4] = {2, 11, 1, 18};
  for (int i = 0; i < 4; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 200 + uint64_t(i)));
  check_moe_against_recompute(m, ps, {2, -1, 0, 1}, 8);
}

// The domain really routes: the same prompt in two domains gives different logits (different
// expert groups), and a sequence's logits are bitwise the same alone or in a mixed batch (bf16:
// with set_batch_invariant, since an expert's rows in a step can be one whatever the batch).
TEST(MoeCachedVsRecompute, DomainChangesLogitsAndBatchInvariance) {
  MoeModel m(tiny_moe());
  for (WeightFormat f : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::int8_row}) {
    ModelWeights w(m.cfg, m.gpt.weights(), f, f);
    w.set_batch_invariant(true);
    const std::vector<int32_t> p = prompt(9, m.cfg.vocab, 7);
    auto a = cached_greedy(w, {p}, 1, nullptr, {0});
    auto b = cached_greedy(w, {p}, 1, nullptr, {1});
    EXPECT_NE(0, std::memcmp(a[0][0].data(), b[0][0].data(), a[0][0].size() * 4));
    std::vector<std::vector<int32_t>> ps;
    const int64_t lens[4] = {4, 9, 1, 20};
    for (int i = 0; i < 4; ++i) ps.push_back(prompt(lens[i], m.cfg.vocab, 300 + uint64_t(i)));
    const std::vector<int32_t> doms = {3, 0, 2, 1};
    auto batched = cached_greedy(w, ps, 6, nullptr, doms);
    for (size_t s = 0; s < ps.size(); ++s) {
      auto alone = cached_greedy(w, {ps[s]}, 6, nullptr, {doms[s]});
      for (size_t g = 0; g < alone[0].size(); ++g)
        EXPECT_EQ(0, std::memcmp(alone[0][g].data(), batched[s][g].data(), alone[0][g].size() * 4))
            << weight_format_name(f) << " sequence " << s << " step " << g;
    }
  }
}

// Bad MoE input is named: a domain outside the model's, a table entry outside the group.
TEST(MoeCachedVsRecompute, BadDomainAndTableAreNamed) {
  MoeModel m(tiny_moe());
  {
    const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
    Decoder dec(w);
    KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 8, m.cfg.max_seq);
    const int64_t s = cache.create();
    ASSERT_TRUE(cache.reserve(s, 16));
    std::vector<float> logits(static_cast<size_t>(m.cfg.vocab));
    std::vector<int32_t> t = {1, 2};
    std::vector<SeqStep> st = {{s, 0, t, 4}};  // 4 domains: [0, 4)
    try {
      dec.forward(cache, st, logits.data());
      ADD_FAILURE() << "domain 4 accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("domain 4"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("python"), std::string::npos) << e.what();
    }
  }
  const int64_t table = m.gpt.layout().block(m.cfg.moe.sparse_layers[0]).moe_table;
  m.gpt.weights()[table + 5] = float(m.cfg.moe.experts_per_domain);  // out of the group
  try {
    const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
    ADD_FAILURE() << "a table entry outside [0, G) was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rre_table[0, 5] = 2"), std::string::npos) << e.what();
  }
}

TEST(Decoder, BadInputThrowsBeforeTouchingTheCache) {
  TestModel m(config(false, Activation::gelu, 4));
  const ModelWeights w(m.cfg, m.gpt.weights(), WeightFormat::f32, WeightFormat::f32);
  Decoder dec(w);
  KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 8, m.cfg.max_seq);
  const int64_t s = cache.create();
  ASSERT_TRUE(cache.reserve(s, 16));
  std::vector<float> logits(static_cast<size_t>(m.cfg.vocab));
  std::vector<int32_t> bad = {1, 96};  // 96 >= V
  std::vector<SeqStep> st = {{s, 0, bad}};
  EXPECT_THROW(dec.forward(cache, st, logits.data()), Error);
  std::vector<int32_t> ok(17, 1);  // 17 tokens, 16 reserved
  st = {{s, 0, ok}};
  EXPECT_THROW(dec.forward(cache, st, logits.data()), Error);
  st = {{s, 60, std::span<const int32_t>(ok.data(), 5)}};  // past max_seq = 64
  EXPECT_THROW(dec.forward(cache, st, logits.data()), Error);
}

}  // namespace
}  // namespace loom::infer
