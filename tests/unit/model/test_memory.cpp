// tests/unit/model/test_memory.cpp: the per-rank memory model (model/memory.h) at PanGu-α 200B's
// own layout, and its bookkeeping. (Measured against the pool on 2, 4 and 8 ranks in
// tests/dist/train/test_memory_model.cpp.)
#include <gtest/gtest.h>

#include <cstdio>

#include <string>
#include <vector>

#include "model/config.h"
#include "model/memory.h"
#include "model/params.h"
#include "parallel/plan.h"

namespace loom::model {
namespace {

// PanGu-α 200B as trained (Zeng et al. 2021): pp 16 x tp 8 x dp 16 = 2048 ranks, ZeRO-1 (the
// optimizer state sharded over dp), full recompute, global batch 512 of 1024 tokens in 32
// micro-batches, bf16. 63 blocks + the query layer: 15 stages of 4 blocks and a last stage of
// 3 blocks plus the query layer.
parallel::ParallelPlan pangu_200b_plan(const ModelConfig& cfg) {
  parallel::PlanSettings s;
  s.dp = 16;
  s.tp = 8;
  s.pp = 16;
  s.zero = 1;
  s.recompute = "full";
  s.micro_batches = 32;
  std::string layers;
  for (int i = 0; i < 16; ++i) layers += i ? (i == 15 ? ",3" : ",4") : "4";
  s.stage_layers = layers;
  const parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab};
  return parallel::make_plan(s, shape, 512, 2048);
}

TEST(MemoryModel, PanGu200BTotalsAreParameterBytesTimesReplication) {
  const ModelConfig cfg = load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/pangu-alpha-200b.toml");
  ASSERT_EQ(cfg.n_layers, 63);
  ASSERT_TRUE(cfg.query_layer);
  const parallel::ParallelPlan plan = pangu_200b_plan(cfg);
  ASSERT_EQ(plan.micro_batch_size, 1);
  const std::vector<RankMemory> ranks = memory_all_ranks(cfg, plan, 1024, Precision::bf16);
  ASSERT_EQ(ranks.size(), 2048u);

  // Replication: tp splits the sharded tensors and copies the replicated ones (norms, position
  // tables, out/down biases) to each of its 8 ranks; the last stage holds a second copy of the
  // tied token embedding; dp copies weights and grads 16 times and (ZeRO-1) splits m and v.
  const int64_t P = cfg.num_params(), VC = cfg.vocab * cfg.d_model;
  int64_t replicated = 0;
  const ParamLayout shard(cfg, TpShard{0, 8});
  for (const ParamSpec& s : shard.specs())
    if (s.replicated()) replicated += s.numel;
  const int64_t C = cfg.d_model, S = cfg.max_seq;
  EXPECT_EQ(replicated, (cfg.n_layers + 1) * 6 * C + 2 * S * C + 2 * C);  // per block: 2 norms, 2 biases
  const int64_t held = P + 7 * replicated + VC;  // elements summed over the tp x pp ranks
  EXPECT_EQ(8 * shard.total(), P + 7 * replicated);

  int64_t weights = 0, grads = 0, optimizer = 0;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const RankMemory& m = ranks[r];
    EXPECT_EQ(m.rank, int(r));
    EXPECT_EQ(m.tp, int(r) % 8);
    EXPECT_EQ(m.dp, (int(r) / 8) % 16);
    EXPECT_EQ(m.pp, int(r) / 128);
    weights += m.weights();
    grads += m.grads();
    optimizer += m.optimizer();
    EXPECT_GT(m.activations(), 0);
    EXPECT_GT(m.workspace(), 0);
    EXPECT_GT(m.comm(), 0);  // every stage receives activations or gradients
  }
  const int64_t lp = bf16_emulated() ? 4 : 2;  // the bf16 weight copy
  EXPECT_EQ(grads, 16 * 4 * held);
  EXPECT_EQ(weights, 16 * (4 + lp) * held);
  EXPECT_EQ(optimizer, 8 * held);
  // Priced for a machine with real bf16 copies (2 bytes each), the rest unchanged.
  MemoryOptions native;
  native.bf16_emulated = false;
  int64_t weights_native = 0;
  for (const RankMemory& m : memory_all_ranks(cfg, plan, 1024, Precision::bf16, native))
    weights_native += m.weights();
  EXPECT_EQ(weights_native, 16 * 6 * held);
  // 1F1B keeps pp - s micro-batches in flight on stage s: the first stage holds the most
  // activations, stage by stage fewer (the last adds the head's, so compare 0..14).
  for (int s = 1; s < 15; ++s)
    EXPECT_LT(ranks[size_t(s * 128)].activations(), ranks[size_t((s - 1) * 128)].activations())
        << "stage " << s;
}

TEST(MemoryModel, RanksAreOrderedTpDpPpAndBadArgumentsAreErrors) {
  ModelConfig cfg;
  cfg.vocab = 64, cfg.n_layers = 4, cfg.d_model = 16, cfg.n_heads = 4, cfg.n_kv_heads = 4;
  cfg.d_ff = 32, cfg.max_seq = 8;
  cfg.validate();
  parallel::PlanSettings s;
  s.dp = 2, s.tp = 2, s.pp = 2, s.zero = 1, s.micro_batches = 2;
  const parallel::ParallelPlan plan =
      parallel::make_plan(s, {cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab}, 8, 8);
  const RankMemory m = memory_per_rank(cfg, plan, 6, 8, Precision::f32);  // 6 = tp 0 + 2*dp 1 + 4*pp 1
  EXPECT_EQ(m.tp, 0);
  EXPECT_EQ(m.dp, 1);
  EXPECT_EQ(m.pp, 1);
  EXPECT_THROW(memory_per_rank(cfg, plan, 8, 8, Precision::f32), Error);
  EXPECT_THROW(memory_per_rank(cfg, plan, 0, 9, Precision::f32), Error);
}

// MemoryOptions::bound_backwards: every bound is at most the exact peak in every category (the
// planner prunes with them, planner/search.h), the persistent bound is the same for every
// micro-batch count, size, schedule and recompute of a layout (the planner caches it by
// layout), and a MemoryReplayer reusing its layouts gives what a fresh memory_per_rank gives.
TEST(MemoryModel, BoundsAreLowerBoundsAndTheReplayerMatchesAFreshCall) {
  for (const char* name : {"tiny.toml", "tiny-moe.toml"}) {
    ModelConfig cfg = load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/" + name);
    const bool moe = cfg.moe.enabled();
    if (!moe) cfg.n_layers = 8;
    const int64_t T = 32, G = 16;
    MemoryReplayer replayer(cfg, 3);  // a small bound: exercises emptying the cache
    parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab};
    shape.seq = T;
    shape.experts = moe ? cfg.moe.experts : 0;
    int checked = 0, tight = 0;
    struct Layout {
      const char* axes;
      int world;
    };
    const Layout layouts[] = {{"dp=2,tp=1,pp=1", 2},     {"dp=2,tp=1,pp=2", 4},
                              {"dp=1,tp=2,pp=2", 4},     {"dp=2,tp=1,pp=1,ep=2", 2},
                              {"dp=4,tp=1,pp=1,ep=2", 4}, {"dp=1,tp=1,pp=4", 4}};
    for (const Layout& lay : layouts) {
      const bool ep = std::string(lay.axes).find("ep=") != std::string::npos;
      if (ep && !moe) continue;
      if (std::string(lay.axes).find("pp=4") != std::string::npos && moe) continue;
      for (const char* sched : {"1f1b", "gpipe", "interleaved"})
        for (int zero : {0, 1, 2, 3})
          for (const char* rc : {"none", "selective", "full"})
            for (int64_t M : {1, 2, 8}) {
              parallel::PlanSettings s;
              const std::string axes = lay.axes;
              for (size_t p = 0; p < axes.size();) {
                const size_t e = axes.find(',', p), q = axes.find('=', p);
                const int v = std::stoi(axes.substr(q + 1, e == std::string::npos ? e : e - q - 1));
                const std::string k = axes.substr(p, q - p);
                (k == "dp" ? s.dp : k == "tp" ? s.tp : k == "pp" ? s.pp : s.ep) = v;
                p = e == std::string::npos ? axes.size() : e + 1;
              }
              s.zero = zero;
              s.schedule = sched;
              if (std::string(sched) == "interleaved") s.virtual_stages = 2;
              s.recompute = rc;
              s.micro_batches = M;
              parallel::ParallelPlan plan;
              try {
                plan = parallel::make_plan(s, shape, G, lay.world);
              } catch (const Error&) {
                continue;  // not a valid plan (interleaved with pp 1, ZeRO 2 under ep, ...)
              }
              for (int rank : {0, lay.world - 1}) {
                const RankMemory exact = memory_per_rank(cfg, plan, rank, T, Precision::bf16);
                const RankMemory again = replayer.rank_memory(plan, rank, T, Precision::bf16);
                EXPECT_EQ(again.bytes, exact.bytes) << lay.axes << " " << sched << " " << rc;
                for (int k : {0, 1, 2, 3}) {
                  MemoryOptions o;
                  o.bound_backwards = k;
                  const RankMemory b = replayer.rank_memory(plan, rank, T, Precision::bf16, o);
                  for (size_t c = 0; c < kNumMemCategories; ++c)
                    EXPECT_LE(b.bytes[c], exact.bytes[c])
                        << name << " " << lay.axes << " zero " << zero << " " << sched << " " << rc
                        << " M " << M << " rank " << rank << " k " << k << " category " << c;
                  tight += k == 2 && b.total() == exact.total();
                }
                // The persistent bound does not depend on M, b, the schedule or recompute.
                MemoryOptions p0;
                p0.bound_backwards = 0;
                parallel::ParallelPlan base = plan;
                base.micro_batches = 1;
                base.micro_batch_size = 1;
                base.recompute.clear();
                EXPECT_EQ(replayer.rank_memory(plan, rank, T, Precision::bf16, p0).bytes,
                          replayer.rank_memory(base, rank, T, Precision::bf16, p0).bytes);
                ++checked;
              }
            }
    }
    EXPECT_GT(checked, 100) << name;
    EXPECT_GT(tight, 0) << name;  // the two-backward bound is often exact (not required)
    std::printf("%s: %d plan-ranks checked, bound(2) exact on %d\n", name, checked, tight);
  }
}

}  // namespace
}  // namespace loom::model
