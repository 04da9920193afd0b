// Sparse (MoE) models under mpirun: rre routing depends only on (domain, token), so every layout
// (dp with each ZeRO stage, pp) trains the same model as the serial run: losses and parameters
// within 1e-5 over 6 steps (only summation orders differ). topk likewise at a capacity that
// drops nothing and without the aux loss (both act per micro-batch).
#include <gtest/gtest.h>

#include "comm/process_group.h"
#include "dist/train/train_helpers.h"
#include "model/moe.h"
#include "train/trainer.h"

using namespace loom;

namespace {

constexpr int kSteps = 6;

train::TrainConfig config(int dp, int pp, int zero, const std::string& dir, model::Router router) {
  std::vector<std::string> sets = {
      "train.batch=" + std::to_string(4 * dp), "train.seq=32", "train.micro_batches=2",
      "parallel.zero=" + std::to_string(zero), "parallel.pp=" + std::to_string(pp),
      "checkpoint.dir=\"" + dir + "/ckpt\"", "log.dir=\"" + dir + "\"", "optim.warmup_steps=2"};
  train::TrainConfig c = train::load_train_config(
      std::string(LOOM_SOURCE_DIR) + "/configs/train/tiny-moe.toml", sets);
  if (router == model::Router::topk) {
    model::MoeConfig& m = c.model.moe;
    m = model::MoeConfig{};
    m.sparse_layers = {0, 1};
    m.router = model::Router::topk;
    m.experts = 4;
    m.expert_d_ff = 64;
    m.top_k = 2;
    // No token dropped (capacity >= N) and no aux loss: both are per micro-batch, and the serial
    // run groups the global batch into other micro-batches than the dp layouts do.
    m.capacity_factor = 2.0;
    m.aux_loss_coef = 0.0;
    c.model.name = "tiny-moe-topk";
    c.model.validate();
  }
  return c;
}

class MoeLayouts : public ::testing::TestWithParam<model::Router> {};

TEST_P(MoeLayouts, DpAndPpEqualSerial) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int w = world.size();
  const model::Router router = GetParam();
  const std::string dir = train_test::shared_dir(world, std::string("moe_") + model::router_name(router));
  MemoryPool serial_pool;
  // Serial: one rank, the whole global batch of the dp layouts (4 * w sequences).
  train::TrainConfig sc = config(w, 1, 0, dir + "_s" + std::to_string(world.rank()), router);
  train::Trainer serial(sc, serial_pool);
  serial.init_fresh();
  std::vector<double> serial_losses;
  for (int i = 0; i < kSteps; ++i) serial_losses.push_back(serial.train_step().loss);
  const std::vector<float> serial_w = serial.full_weights();

  struct Layout { int dp, pp, zero, cp = 1; };
  std::vector<Layout> layouts = {{w, 1, 0}, {w, 1, 1}, {w, 1, 3}};
  if (w == 2) layouts.push_back({1, 2, 0});
  // Context parallel: rre routes each token by itself, so cp is exact; topk is refused (its
  // capacity and aux loss would be per cp shard).
  if (w == 2) layouts.push_back({1, 1, 0, 2});
  for (const Layout& l : layouts) {
    MemoryPool pool;
    // pp and cp layouts keep the serial global batch: dp = 1 there, so train.batch = 4 * w still.
    train::TrainConfig c = config(l.dp, l.pp, l.zero, dir, router);
    c.batch = 4 * w;
    c.parallel.dp = l.dp;
    c.parallel.cp = l.cp;
    const std::string what = "dp " + std::to_string(l.dp) + " pp " + std::to_string(l.pp) +
                             " zero " + std::to_string(l.zero) + " cp " + std::to_string(l.cp);
    if (l.cp > 1 && router == model::Router::topk) {
      try {
        train::Trainer t(c, pool, nullptr, nullptr, nullptr, &world, &world);
        ADD_FAILURE() << what << ": topk under cp was accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("moe.router = \"rre\""), std::string::npos)
            << e.what();
      }
      continue;
    }
    train::Trainer t(c, pool, l.pp == 1 && l.cp == 1 ? &world : nullptr, nullptr,
                     l.pp > 1 ? &world : nullptr, l.cp > 1 ? &world : nullptr,
                     l.cp > 1 ? &world : nullptr);
    t.init_fresh();
    for (int i = 0; i < kSteps; ++i) {
      const double loss = t.train_step().loss;
      EXPECT_NEAR(loss, serial_losses[size_t(i)], 1e-5 * serial_losses[size_t(i)])
          << what << " step " << i + 1;
    }
    const std::vector<float> mine = t.full_weights();
    ASSERT_EQ(mine.size(), serial_w.size());
    EXPECT_LT(train_test::relative_l2(mine.data(), serial_w.data(), int64_t(mine.size())), 1e-5)
        << what;
    const auto& stats = t.executor().chunk(0).moe_stats();
    if (t.executor().chunk(0).has_sparse_blocks()) {
      EXPECT_EQ(stats.dropped, 0) << what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Moe, MoeLayouts,
                         ::testing::Values(model::Router::rre, model::Router::topk),
                         [](const auto& i) { return std::string(model::router_name(i.param)); });

}  // namespace
