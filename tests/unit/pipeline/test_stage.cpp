// tests/unit/pipeline/test_stage.cpp: model::GptStage without MPI. Stages chained by hand must
// reproduce model::Gpt bit for bit (same kernels in the same order), own exactly their
// parameters, and reject bad splits and misuse with clear errors.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>

#include "core/error.h"
#include "dist/pipeline/pipeline_helpers.h"
#include "model/stage.h"

namespace loom::model {
namespace {

using pipeline_test::step_tokens;
using pipeline_test::tiny_config;

TEST(PipelineSplitStages, EvenAndUneven) {
  ModelConfig cfg = tiny_config(4);
  auto even = split_stages(cfg, 2);
  ASSERT_EQ(even.size(), 2u);
  EXPECT_EQ(even[0], (StageSpan{0, 2, true, false}));
  EXPECT_EQ(even[1], (StageSpan{2, 4, false, true}));
  auto uneven = split_stages(cfg, 2, {1, 3});
  EXPECT_EQ(uneven[0], (StageSpan{0, 1, true, false}));
  EXPECT_EQ(uneven[1], (StageSpan{1, 4, false, true}));
  auto one = split_stages(cfg, 1);
  EXPECT_EQ(one[0], (StageSpan{0, 4, true, true}));
}

// Each error names what is wrong and the valid values.
TEST(PipelineSplitStages, BadSplitsNameTheFix) {
  ModelConfig cfg = tiny_config(4);
  auto message = [&](int64_t n, std::vector<int64_t> layers) {
    try {
      split_stages(cfg, n, layers);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(3, {}).find("{1, 2, 4}"), std::string::npos) << message(3, {});
  EXPECT_NE(message(2, {1, 2}).find("sum to 3"), std::string::npos) << message(2, {1, 2});
  EXPECT_NE(message(2, {0, 4}).find("stage_layers[0] = 0"), std::string::npos);
  EXPECT_NE(message(2, {1, 1, 2}).find("give exactly 2"), std::string::npos);
  EXPECT_NE(message(5, {}).find("use 1 to 4"), std::string::npos) << message(5, {});
  MemoryPool pool;
  EXPECT_THROW(GptStage(cfg, StageSpan{0, 3, false, true}, pool, Precision::f32), Error);
  EXPECT_THROW(GptStage(cfg, StageSpan{1, 4, true, false}, pool, Precision::f32), Error);
  EXPECT_THROW(GptStage(cfg, StageSpan{2, 5, false, false}, pool, Precision::f32), Error);
}

// Stages own disjoint parameters covering the model once, plus the head's tied copy.
TEST(PipelineGptStage, OwnsExactlyItsParameters) {
  ModelConfig cfg = tiny_config(4);
  MemoryPool pool;
  ParamLayout layout(cfg);
  auto spans = split_stages(cfg, 3, {1, 2, 1});
  std::vector<int> owners(layout.specs().size(), 0);
  int64_t elements = 0;
  for (const StageSpan& s : spans) {
    GptStage st(cfg, s, pool, Precision::f32);
    for (const StageParam& p : st.params()) {
      if (p.tied_copy) {
        EXPECT_EQ(p.global.name, "embed.token.weight");
        EXPECT_TRUE(s.has_head && !s.has_embedding);
        continue;
      }
      elements += p.global.numel;
      for (size_t i = 0; i < layout.specs().size(); ++i)
        if (layout.specs()[i].name == p.global.name) ++owners[i];
    }
    if (s.has_head) {
      EXPECT_EQ(st.find("final_norm.weight").global.shape, Shape{cfg.d_model});
    }
    if (!s.has_embedding) {
      EXPECT_THROW(st.find("embed.position.weight"), Error);
    }
  }
  EXPECT_EQ(elements, layout.total());
  for (size_t i = 0; i < owners.size(); ++i) EXPECT_EQ(owners[i], 1) << layout.specs()[i].name;
}

// Grad of `name` summed over the stages holding it (the tied embedding is held twice).
std::vector<float> stage_grad(const std::vector<std::unique_ptr<GptStage>>& stages,
                              const ParamSpec& spec) {
  std::vector<float> g(size_t(spec.numel), 0.f);
  bool first = true;
  for (auto& st : stages)
    for (const StageParam& p : st->params())
      if (p.global.name == spec.name) {
        const float* src = st->grads() + p.local_offset;
        for (int64_t i = 0; i < spec.numel; ++i)
          g[size_t(i)] = first ? src[i] : g[size_t(i)] + src[i];
        first = false;
      }
  return g;
}

// Runs `n_mb` micro-batches through stages split by `layers`, all forwards first (several
// micro-batches in flight, as GPipe), then all backwards; compares with Gpt.
void check_against_gpt(const std::vector<int64_t>& layers, int n_mb,
                       Precision precision = Precision::f32,
                       Recompute recompute = Recompute::none) {
  ModelConfig cfg = tiny_config(4);
  const int64_t B = 2, T = 16, N = B * T;
  const float scale = 1.0f / float(B * T * n_mb);
  std::vector<int32_t> tokens = step_tokens(7, n_mb, B, T, cfg.vocab);
  MemoryPool pool;
  Gpt gpt(cfg, pool, precision);
  gpt.init_weights(5);
  gpt.set_recompute(recompute);
  gpt.zero_grads();
  std::vector<LossSum> ref;
  for (int mb = 0; mb < n_mb; ++mb)
    ref.push_back(gpt.forward_backward(tokens.data() + mb * B * (T + 1), B, T, scale));

  auto spans = split_stages(cfg, int64_t(layers.size()), layers);
  std::vector<std::unique_ptr<GptStage>> stages;
  for (auto& s : spans) {
    stages.push_back(std::make_unique<GptStage>(cfg, s, pool, precision));
    stages.back()->init_weights(5);
    stages.back()->set_recompute(recompute);
    stages.back()->zero_grads();
  }
  std::vector<std::vector<int32_t>> in(static_cast<size_t>(n_mb)), tg(static_cast<size_t>(n_mb));
  for (int mb = 0; mb < n_mb; ++mb)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        in[size_t(mb)].push_back(tokens[size_t((mb * B + b) * (T + 1) + t)]);
        tg[size_t(mb)].push_back(tokens[size_t((mb * B + b) * (T + 1) + t + 1)]);
      }
  std::vector<LossSum> got(static_cast<size_t>(n_mb));
  for (int mb = 0; mb < n_mb; ++mb) {
    Tensor h;
    for (auto& st : stages)
      h = st->forward(mb, in[size_t(mb)].data(), tg[size_t(mb)].data(), h, B, T, scale,
                      &got[size_t(mb)]);
    EXPECT_FALSE(h.defined());
  }
  for (auto& st : stages) EXPECT_EQ(st->in_flight(), n_mb);
  for (int mb = 0; mb < n_mb; ++mb) {
    Tensor d;
    for (size_t i = stages.size(); i-- > 0;) {
      d = stages[i]->backward(mb, d);
      if (i > 0) {
        ASSERT_EQ(d.numel(), N * cfg.d_model);
      }
    }
    EXPECT_FALSE(d.defined());
  }
  for (int mb = 0; mb < n_mb; ++mb) {
    // Same kernels, same order: the loss is bit-identical.
    EXPECT_EQ(got[size_t(mb)].sum, ref[size_t(mb)].sum) << "mb " << mb;
    EXPECT_EQ(got[size_t(mb)].count, ref[size_t(mb)].count);
  }
  for (const ParamSpec& spec : gpt.layout().specs()) {
    std::vector<float> g = stage_grad(stages, spec);
    const float* r = gpt.grads() + spec.offset;
    if (spec.name == "embed.token.weight") {
      // The serial model adds the head's and the embedding's contributions into one buffer,
      // micro-batch by micro-batch; the stages sum each side separately and add the two:
      // another f32 summation order of at most 2*n_mb*B*T terms, so a few ulp of the largest.
      double max_abs = 0;
      for (int64_t i = 0; i < spec.numel; ++i) max_abs = std::max(max_abs, double(std::fabs(r[i])));
      for (int64_t i = 0; i < spec.numel; ++i)
        ASSERT_NEAR(g[size_t(i)], r[i], 1e-6 * max_abs) << spec.name << "[" << i << "]";
    } else {
      // Bit-identical: each tensor's contributions arrive in the serial order.
      ASSERT_EQ(std::memcmp(g.data(), r, size_t(spec.numel) * 4), 0) << spec.name;
    }
  }
}

TEST(PipelineGptStage, OneStageEqualsGpt) { check_against_gpt({4}, 1); }
TEST(PipelineGptStage, ThreeUnevenStagesEqualGptOneMicroBatch) { check_against_gpt({1, 2, 1}, 1); }
TEST(PipelineGptStage, TwoStagesEqualGptWithMicroBatchesInFlight) { check_against_gpt({1, 3}, 3); }
// bf16 matmul inputs: the same kernels on the same bf16 copies, so still bit-identical.
TEST(PipelineGptStage, Bf16StagesEqualGpt) { check_against_gpt({2, 1, 1}, 2, Precision::bf16); }
// Recompute replays the identical kernels, so every mode gives the same bits as Gpt's.
TEST(PipelineGptStage, RecomputeStagesEqualGpt) {
  check_against_gpt({1, 3}, 2, Precision::f32, Recompute::selective);
  check_against_gpt({3, 1}, 2, Precision::f32, Recompute::full);
}

TEST(PipelineGptStage, MisuseIsAnError) {
  ModelConfig cfg = tiny_config(4);
  MemoryPool pool;
  GptStage mid(cfg, StageSpan{1, 3, false, false}, pool, Precision::f32);
  mid.init_weights(1);
  const int64_t B = 1, T = 4;
  Tensor x = Tensor::zeros({B * T, cfg.d_model}, DType::f32, pool, MemCategory::activations);
  Tensor wrong =
      Tensor::zeros({B * T + 1, cfg.d_model}, DType::f32, pool, MemCategory::activations);
  EXPECT_THROW(mid.forward(0, nullptr, nullptr, wrong, B, T, 1.f, nullptr), Error);
  Tensor y = mid.forward(0, nullptr, nullptr, x, B, T, 1.f, nullptr);
  EXPECT_EQ(y.numel(), B * T * cfg.d_model);
  EXPECT_THROW(mid.forward(0, nullptr, nullptr, x, B, T, 1.f, nullptr), Error);  // in flight
  Tensor none;
  EXPECT_THROW(mid.backward(1, none), Error);  // never forwarded
  EXPECT_THROW(mid.backward(0, none), Error);  // needs dy
  Tensor dy = Tensor::zeros({B * T, cfg.d_model}, DType::f32, pool, MemCategory::activations);
  EXPECT_EQ(mid.backward(0, dy).numel(), B * T * cfg.d_model);
  EXPECT_EQ(mid.in_flight(), 0);
  // Head stage: a target outside the vocabulary is rejected before anything runs.
  GptStage head(cfg, StageSpan{3, 4, false, true}, pool, Precision::f32);
  head.init_weights(1);
  std::vector<int32_t> targets(size_t(B * T), 0);
  targets[2] = int32_t(cfg.vocab);
  LossSum l;
  EXPECT_THROW(head.forward(0, nullptr, targets.data(), x, B, T, 1.f, &l), Error);
}

}  // namespace
}  // namespace loom::model
