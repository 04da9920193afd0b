// tests/unit/planner/test_planner.cpp: planner/cost_model.h terms against hand-computed values,
// the pipeline bubble against parallel::simulate, the search's frontier (valid, undominated,
// deterministic, bounded, equal to brute force), and cluster-file strictness.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "attention/context_parallel.h"
#include "core/error.h"
#include "model/config.h"
#include "model/memory.h"
#include "parallel/schedule.h"
#include "model/block.h"
#include "planner/cluster.h"
#include "planner/cost_model.h"
#include "planner/search.h"

namespace loom::planner {
namespace {

using parallel::ParallelPlan;
using parallel::ScheduleKind;

// A small cluster with round numbers, so hand computations are easy to check.
const char* kTestCluster = R"(
name = "test"
nodes = 2
devices_per_node = 4
[device]
peak_tflops_f32 = 1
peak_tflops_bf16 = 2
memory_GiB = 1
memory_bandwidth_GBps = 100
matmul_efficiency_f32 = [[1, 0.5]]
matmul_efficiency_bf16 = [[0.001, 0.25], [1, 0.5]]
[links.intra]
latency_us = 10
bandwidth_GBps = 10
efficiency = 0.5
all_reduce = [2, 2]
all_gather = [1, 1]
reduce_scatter = [1, 1]
send = [1, 1]
[links.inter]
latency_us = 100
bandwidth_GBps = 1
efficiency = 1
all_reduce = [2, 2]
all_gather = [1, 1]
reduce_scatter = [1, 1]
send = [1, 1]
)";

model::ModelConfig small_model(int64_t layers = 8) {
  model::ModelConfig c = model::load_model_config(std::string(LOOM_SOURCE_DIR) +
                                                  "/configs/models/tiny.toml");
  c.n_layers = layers;
  return c;
}

std::string with_line_replaced(std::string text, const std::string& from, const std::string& to) {
  const size_t p = text.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  return text.replace(p, from.size(), to);
}

ParallelPlan plan_of(const std::string& s, const model::ModelConfig& cfg, int64_t G, int world);

TEST(Cluster, AlphaBetaOfCollectivesByHand) {
  const Cluster c = cluster_from_toml(kTestCluster, "test");
  // Ring all-gather of 1 MB over 4 ranks: 3 steps of 10 us + 3/4 of 1e6 bytes at 10 GB/s x 0.5.
  EXPECT_NEAR(c.intra.time(Collective::all_gather, 1e6, 4), 3 * 10e-6 + 0.75 * 1e6 / 5e9, 1e-15);
  // All-reduce: twice that.
  EXPECT_NEAR(c.intra.time(Collective::all_reduce, 1e6, 4), 2 * (3 * 10e-6 + 0.75 * 1e6 / 5e9),
              1e-15);
  EXPECT_NEAR(c.inter.time(Collective::send, 1e6, 2), 100e-6 + 1e6 / 1e9, 1e-15);
  EXPECT_EQ(c.intra.time(Collective::all_reduce, 1e6, 1), 0);
  // Efficiency: below the first point clamped, log-interpolated between points.
  EXPECT_DOUBLE_EQ(c.eff_bf16.at(1e3), 0.25);
  EXPECT_NEAR(c.eff_bf16.at(std::sqrt(1e6 * 1e9)), 0.375, 1e-12);  // halfway in log(size)
  EXPECT_DOUBLE_EQ(c.eff_bf16.at(1e12), 0.5);
}

TEST(Cluster, SharedHostConcurrency) {
  std::string text = kTestCluster;
  text = with_line_replaced(text, "[links.intra]", "[host]\ncores = 2\n[links.intra]");
  Cluster c = cluster_from_toml(text, "test");
  EXPECT_DOUBLE_EQ(c.rank_share(1), 2.0);  // no table: cores / ranks
  EXPECT_DOUBLE_EQ(c.rank_share(4), 0.5);
  text = with_line_replaced(text, "cores = 2\n", "cores = 2\nconcurrency = [[1, 1.5], [2, 0.8]]\n");
  c = cluster_from_toml(text, "test");
  EXPECT_DOUBLE_EQ(c.rank_share(1), 1.5);
  EXPECT_DOUBLE_EQ(c.rank_share(2), 0.8);
  EXPECT_DOUBLE_EQ(c.rank_share(4), 0.4);  // beyond the table: 2 ranks' worth split over 4
  {
    // An entry above cores/ranks (a measurement artefact: 2 ranks cannot get 2.4 cores) is
    // capped at cores/ranks.
    const Cluster hi = cluster_from_toml(
        with_line_replaced(text, "concurrency = [[1, 1.5], [2, 0.8]]", "concurrency = [[1, 1.7], [2, 1.2]]"),
        "test");
    EXPECT_DOUBLE_EQ(hi.rank_share(1), 1.7);
    EXPECT_DOUBLE_EQ(hi.rank_share(2), 1.0);
    EXPECT_DOUBLE_EQ(hi.rank_share(4), 0.5);
  }
  {
    // Oversubscribed shared host (4 ranks, 2 cores): idle pipeline stages' cores are absorbed,
    // so the fill/drain costs nothing extra (bubble <= 0: the larger of total work over the
    // ranks and the makespan at one core per busy rank); with as many cores as ranks the bubble
    // is the schedule's as usual (> 0).
    const model::ModelConfig cfg8 = small_model(8);
    MemoryOracle o8(cfg8, 32, model::Precision::f32, Cluster{});
    const ParallelPlan pp4 = plan_of("dp=1,tp=1,pp=4,micro_batches=4,schedule=1f1b", cfg8, 4, 4);
    const Cluster two = cluster_from_toml(with_line_replaced(kTestCluster, "[links.intra]",
                                                             "[host]\ncores = 2\n[links.intra]"),
                                          "test");
    const Cluster four = cluster_from_toml(with_line_replaced(kTestCluster, "[links.intra]",
                                                              "[host]\ncores = 4\n[links.intra]"),
                                           "test");
    const StepCost shared = estimate_time({cfg8, two, 32, model::Precision::f32}, pp4, o8);
    const StepCost own = estimate_time({cfg8, four, 32, model::Precision::f32}, pp4, o8);
    EXPECT_LE(shared.terms.bubble, 0.0);
    EXPECT_GT(own.terms.bubble, 0.0);
    EXPECT_NEAR(shared.step_time, shared.terms.total(), 1e-12);
  }
  // A rank's compute time scales with 1 / its share.
  const model::ModelConfig cfg = small_model(4);
  MemoryOracle oracle(cfg, 32, model::Precision::f32, Cluster{});
  const ParallelPlan p2 = plan_of("dp=2,micro_batches=1", cfg, 2, 2);
  const StepCost t2 = estimate_time({cfg, c, 32, model::Precision::f32}, p2, oracle);
  const ParallelPlan p1 = plan_of("dp=1,micro_batches=1", cfg, 1, 1);
  const StepCost t1 = estimate_time({cfg, c, 32, model::Precision::f32}, p1, oracle);
  EXPECT_NEAR(t2.terms.forward / t1.terms.forward, 1.5 / 0.8, 1e-9);
  EXPECT_THROW(cluster_from_toml(with_line_replaced(text, "[[1, 1.5], [2, 0.8]]", "[[2, 1.5], [1, 0.8]]"), "t"),
               Error);
  // The memory table: looked up like the compute one, not capped at cores / ranks; absent, it
  // is the compute one.
  EXPECT_DOUBLE_EQ(c.memory_share(2), c.rank_share(2));
  const Cluster mem = cluster_from_toml(
      with_line_replaced(text, "concurrency = [[1, 1.5], [2, 0.8]]\n",
                         "concurrency = [[1, 1.5], [2, 0.8]]\nmemory_concurrency = [[1, 1.9], [2, 0.6]]\n"),
      "test");
  EXPECT_DOUBLE_EQ(mem.memory_share(1), 1.9);
  EXPECT_DOUBLE_EQ(mem.memory_share(2), 0.6);
  EXPECT_DOUBLE_EQ(mem.memory_share(4), 0.3);
  EXPECT_DOUBLE_EQ(mem.rank_share(2), 0.8);
  EXPECT_NE(cluster_from_toml(mem.to_toml(), "round trip").memory_concurrency.size(), 0u);
  // The training-step table, where present, prices ranks that fill the cores (one thread each),
  // compute and memory alike; fewer ranks keep the probes' tables unless the file carries a
  // step_unit (calibrated with the one-rank entry measured right; see below).
  const Cluster step = cluster_from_toml(
      with_line_replaced(mem.to_toml(), "memory_concurrency = [",
                         "step_concurrency = [[1, 1.2], [2, 0.9], [4, 0.4]]\nmemory_concurrency = ["),
      "test");
  EXPECT_DOUBLE_EQ(step.rank_share(1), 1.5);
  EXPECT_DOUBLE_EQ(step.memory_share(1), 1.9);
  EXPECT_DOUBLE_EQ(step.rank_share(2), 0.9);
  EXPECT_DOUBLE_EQ(step.memory_share(2), 0.9);
  EXPECT_DOUBLE_EQ(step.rank_share(4), 0.4);
  EXPECT_DOUBLE_EQ(step.rank_share(8), 0.2);
  EXPECT_DOUBLE_EQ(step.memory_share(8), 0.2);
  EXPECT_EQ(cluster_from_toml(step.to_toml(), "round trip").step_concurrency.size(), 3u);
  // step_unit converts the step table's unit (one thread's steps alone) into priced cores, after
  // the cap at cores / ranks (a bound in the table's own unit), and with it the step table
  // prices fewer ranks than cores too.
  const Cluster unit = cluster_from_toml(
      with_line_replaced(step.to_toml(), "step_concurrency = [",
                         "step_unit = 0.8\nstep_concurrency = ["),
      "test");
  EXPECT_DOUBLE_EQ(unit.rank_share(1), 1.2 * 0.8);
  EXPECT_DOUBLE_EQ(unit.rank_share(2), 0.9 * 0.8);
  EXPECT_DOUBLE_EQ(unit.memory_share(2), 0.9 * 0.8);
  EXPECT_DOUBLE_EQ(unit.rank_share(4), 0.4 * 0.8);
  const Cluster over = cluster_from_toml(
      with_line_replaced(unit.to_toml(), "[4, 0.4000]", "[4, 0.6000]"), "test");
  EXPECT_DOUBLE_EQ(over.rank_share(4), 0.5 * 0.8);  // 0.6 capped at 2 cores / 4 ranks first
  EXPECT_DOUBLE_EQ(cluster_from_toml(unit.to_toml(), "round trip").step_unit, 0.8);
  EXPECT_THROW(cluster_from_toml(with_line_replaced(unit.to_toml(), "step_unit = 0.8000",
                                                    "step_unit = 0"), "t"),
               Error);
  // A unit with no table to convert is a mistake in the file, not something to ignore.
  EXPECT_THROW(cluster_from_toml(with_line_replaced(mem.to_toml(), "memory_concurrency = [",
                                                    "step_unit = 0.8\nmemory_concurrency = ["),
                                 "t"),
               Error);
  // step_unit = 1 exactly still round-trips as read (it switches the one-rank pricing).
  const Cluster one = cluster_from_toml(
      with_line_replaced(unit.to_toml(), "step_unit = 0.8000", "step_unit = 1"), "test");
  EXPECT_DOUBLE_EQ(one.rank_share(1), 1.2);
  EXPECT_DOUBLE_EQ(cluster_from_toml(one.to_toml(), "round trip").rank_share(1), 1.2);
}

// loom calibrate's step_unit: the one-core price of a step is the cost model's price of a dp 1
// plan on a host whose one rank gets exactly one core, whatever the host's concurrency tables.
TEST(Cluster, OneCoreStepPriceIgnoresConcurrencyTables) {
  const Cluster c = cluster_from_toml(
      with_line_replaced(kTestCluster, "[device]",
                         "[host]\ncores = 2\nconcurrency = [[1, 1.7], [2, 0.9]]\n"
                         "step_concurrency = [[1, 1.3], [2, 0.6]]\n\n[device]"),
      "test");
  const model::ModelConfig cfg = small_model(4);
  const double price = one_core_step_price(cfg, c, 2, 32, model::Precision::f32);
  Cluster one = c;
  one.concurrency = {{1, 1.0}};
  one.step_concurrency.clear();
  MemoryOracle oracle(cfg, 32, model::Precision::f32, one);
  const ParallelPlan p1 = plan_of("dp=1,micro_batches=1", cfg, 2, 1);
  EXPECT_DOUBLE_EQ(price, estimate_time({cfg, one, 32, model::Precision::f32}, p1, oracle).step_time);
  // Two cores' worth alone (the table's 1.7 would be capped at 2): the same plan is cheaper.
  Cluster two = c;
  two.step_concurrency.clear();
  two.concurrency = {{1, 2.0}};
  EXPECT_LT(estimate_time({cfg, two, 32, model::Precision::f32}, p1, oracle).step_time, price);
  Cluster gpu = c;
  gpu.host_cores = 0;
  EXPECT_THROW(one_core_step_price(cfg, gpu, 2, 32, model::Precision::f32), Error);
}

TEST(Cluster, PresetsLoadAndTheirNumbersAreThere) {
  for (const char* f : {"a100-80gb-ib.toml", "a100-80gb-opa-jeanzay.toml", "dgx-h100.toml",
                        "pangu-ascend-2048.toml"}) {
    const Cluster c = load_cluster(std::string(LOOM_SOURCE_DIR) + "/configs/clusters/" + f);
    EXPECT_GT(c.peak_flops_bf16, 1e14) << f;
    EXPECT_EQ(c.devices_per_node, 8) << f;
  }
  const Cluster p = load_cluster(std::string(LOOM_SOURCE_DIR) + "/configs/clusters/pangu-ascend-2048.toml");
  EXPECT_EQ(p.total_devices(), 2048);
  const Cluster a = load_cluster(std::string(LOOM_SOURCE_DIR) + "/configs/clusters/a100-80gb-ib.toml");
  EXPECT_EQ(a.total_devices(), 3072);
  EXPECT_DOUBLE_EQ(a.inter.bandwidth_Bps, 25e9);
}

TEST(Cluster, StrictKeysAndUnits) {
  auto fails_with = [](const std::string& text, const std::string& needle) {
    try {
      cluster_from_toml(text, "bad.toml");
      ADD_FAILURE() << "no error, expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  fails_with("bogus = 1\n" + std::string(kTestCluster), "unknown key 'bogus'");
  fails_with(with_line_replaced(kTestCluster, "memory_GiB = 1", "memory_gb = 1"),
             "unknown key 'device.memory_gb'");
  fails_with(with_line_replaced(kTestCluster, "memory_GiB = 1\n", ""), "GiB");
  fails_with(with_line_replaced(kTestCluster, "latency_us = 10", "latency_us = \"10us\""),
             "'links.intra.latency_us' must be a number in microseconds");
  fails_with(with_line_replaced(kTestCluster, "\nbandwidth_GBps = 10\n", "\nbandwidth_GBps = -1\n"),
             "links.intra.bandwidth_GBps");
  fails_with(with_line_replaced(kTestCluster, "[[0.001, 0.25], [1, 0.5]]", "[[1, 0.5], [0.1, 0.6]]"),
             "must be larger than the previous");
  fails_with(with_line_replaced(kTestCluster, "[[0.001, 0.25], [1, 0.5]]", "[[1, 1.5]]"),
             "efficiency in (0, 1]");
  fails_with(with_line_replaced(kTestCluster, "send = [1, 1]\n[links.inter]", "send = 1\n[links.inter]"),
             "[latency factor, bandwidth factor]");
  fails_with("name = ", "TOML syntax error");
  EXPECT_THROW(load_cluster("/nonexistent/cluster.toml"), Error);
}

ParallelPlan plan_of(const std::string& s, const model::ModelConfig& cfg, int64_t G, int world) {
  return parallel::make_plan(parse_plan_string(s),
                             {cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab}, G,
                             world);
}

TEST(CostModel, TensorParallelTermByHand) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(4);
  const int64_t T = 32, G = 2;
  const ParallelPlan p = plan_of("dp=1,tp=2,pp=1,micro_batches=1", cfg, G, 2);
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const StepCost c = estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  // Per block (4 blocks + the query layer), forward and backward: 2 all-gathers and 2
  // reduce-scatters of the (N, C) f32 rows, N = b*T = 64, over tp = 2 on the intra link; the
  // head adds two (N) f32 all-reduces.
  const double N = 2 * 32, C = 64, a = 10e-6, beta = 10e9 * 0.5;
  const double ag = 1 * a + 0.5 * N * C * 4 / beta;  // (p-1) = 1 step, (p-1)/p = 1/2
  const double per_block = 2 * (2 * ag + 2 * ag);    // reduce-scatter has the same cost
  const double head = 2 * (2 * a + 2 * 0.5 * N * 4 / beta);
  EXPECT_NEAR(c.terms.tp, 5 * per_block + head, 1e-12);
  EXPECT_EQ(c.terms.bubble, 0);
  EXPECT_EQ(c.terms.dp, 0);
  EXPECT_NEAR(c.step_time, c.terms.total(), 1e-15);
}

TEST(CostModel, DataParallelOverlapByHand) {
  // ZeRO-1 over dp = 2 (intra link): the gradient all-reduce hides behind the last micro-batch's
  // backward (train/executor.h's buckets), the broadcast of the updated shares does not.
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(4);
  const int64_t T = 32;
  const ParallelPlan p = plan_of("dp=2,tp=1,pp=1,zero=1,micro_batches=1", cfg, 2, 2);
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const StepCost c = estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  const double P = double(oracle.rank_params(p)[0]), a = 10e-6, beta = 10e9 * 0.5;
  const double all_reduce = 2 * 1 * a + 2 * 0.5 * P * 4 / beta;
  const double all_gather = 1 * a + 0.5 * P * 4 / beta;
  EXPECT_NEAR(c.terms.dp, std::max(0.0, all_reduce - c.terms.backward) + all_gather, 1e-12);
  EXPECT_NEAR(c.terms.dp_total, all_reduce + all_gather, 1e-12);
  // The optimizer updates half the parameters: 36 bytes each (cost_model.h) at 100 GB/s.
  EXPECT_NEAR(c.terms.optimizer, P / 2 * 36 / 100e9, 1e-12);
  // On a CPU host ([host]: the ranks' cores move the bytes inside their MPI calls) nothing of
  // the reduction hides under the backward.
  const Cluster host = cluster_from_toml(
      with_line_replaced(kTestCluster, "[links.intra]", "[host]\ncores = 8\n[links.intra]"), "test");
  const StepCost h = estimate_time({cfg, host, T, model::Precision::f32}, p, oracle);
  ASSERT_GT(all_reduce, 0.0);
  EXPECT_NEAR(h.terms.dp, all_reduce + all_gather, 1e-12);
}

TEST(CostModel, ContextParallelTermByHand) {
  // cp = 2 on the intra link, compute made negligible (1e6 TFLOP/s) so nothing overlaps: the cp
  // term is the transfers of attention/context_parallel.h's closed byte counts. tiny has NH 4,
  // NKV 2 (g = 2: burst's per-layer choice is the ring backward), HD 16; 2 blocks + the query
  // layer run attention.
  const Cluster cl = cluster_from_toml(
      with_line_replaced(kTestCluster, "peak_tflops_f32 = 1\n", "peak_tflops_f32 = 1000000\n"),
      "test");
  const model::ModelConfig cfg = small_model(2);
  const int64_t T = 64, B = 2;
  const double a = 10e-6, beta = 10e9 * 0.5;
  auto cost = [&](const std::string& scheme) {
    parallel::PlanSettings s = parse_plan_string("dp=1,tp=1,pp=1,cp=2,micro_batches=1");
    s.cp_scheme = scheme;
    const ParallelPlan p = parallel::make_plan(
        s, {cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab, T}, B, 2);
    MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
    return estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  };
  EXPECT_EQ(attention::choose_cp_backward(4, 2, 16, DType::f32), attention::CpBackward::ring);
  // burst: one ring step each way (G - 1 = 1): forward K, V; backward K, V, dK, dV (f32).
  const double fwd = 2.0 * B * T * 2 * 16 * 0.5 * 4, bwd = B * T * 0.5 * 2 * 16 * (2 * 4 + 8);
  EXPECT_EQ(fwd, double(attention::cp_forward_bytes(B, T, 2, 2, 16, DType::f32)));
  EXPECT_EQ(bwd, double(attention::cp_backward_bytes(attention::CpBackward::ring, B, T, 2, 4, 2,
                                                     16, DType::f32)));
  const StepCost burst = cost("burst");
  EXPECT_NEAR(burst.terms.cp, 3 * ((a + fwd / beta) + (a + bwd / beta)), 1e-9);
  // allgather: all-gather the whole K, V (n bytes over 2 ranks: 1 step, half of n), backward the
  // same again plus a reduce-scatter of f32 dK, dV.
  const double kv = 2.0 * B * T * 2 * 16 * 4, ag = a + 0.5 * kv / beta;
  EXPECT_NEAR(cost("allgather").terms.cp, 3 * (ag + 2 * ag), 1e-9);
  // ulysses: all-to-all; a rank sends (G-1)/G of its buffer.
  const double uf = double(attention::cp_ulysses_bytes(false, B, T, 2, 4, 2, 16, DType::f32)),
               ub = double(attention::cp_ulysses_bytes(true, B, T, 2, 4, 2, 16, DType::f32));
  EXPECT_NEAR(cost("ulysses").terms.cp, 3 * ((a + uf / beta) + (a + ub / beta)), 1e-9);
  // The cp ranks hold the same weights: gradients all-reduce over dp x cp = 2 ranks.
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const double P = double(oracle.rank_params(parallel::ParallelPlan{})[0]);
  EXPECT_NEAR(burst.terms.dp_total, 2 * a + 2 * 0.5 * P * 4 / beta, 1e-12);
}

model::ModelConfig tiny_moe() {
  return model::load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/tiny-moe.toml");
}

ParallelPlan moe_plan_of(const std::string& s, const model::ModelConfig& cfg, int64_t G, int world,
                         int64_t T) {
  parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab, T};
  shape.experts = cfg.moe.experts;
  return parallel::make_plan(parse_plan_string(s), shape, G, world);
}

TEST(CostModel, ExpertParallelTermByHand) {
  // tiny-moe: block 1 sparse, E = 8 experts of Fe = 128, rre (k = 1), C = 64. dp 2 x ep 2 on
  // the intra link, one micro-batch of b = 2 x T = 32: N = 64 rows. all_to_all has the default
  // factors [1, 1]: (p-1) alpha + (p-1)/p n / beta, n a rank's buffer (docs/moe.md's uniform
  // closed form: (ep-1)/ep of it leaves the rank).
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = tiny_moe();
  ASSERT_EQ(cfg.moe.experts, 8);
  ASSERT_TRUE(cfg.moe.is_sparse(1));
  ASSERT_FALSE(cfg.moe.is_sparse(0));
  const int64_t T = 32, G = 4;
  const double a = 10e-6, beta = 10e9 * 0.5, N = 64, C = 64, Fe = 128, E = 8;
  auto a2a = [&](double n) { return a + 0.5 * n / beta; };
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  auto cost = [&](const std::string& s) {
    return estimate_time({cfg, cl, T, model::Precision::f32}, moe_plan_of(s, cfg, G, 2, T), oracle);
  };
  // Forward: counts (E int64), rows out, outputs back; backward: d(out) out, d(x) back (f32).
  const double fwd = a2a(E * 8) + 2 * a2a(N * C * 4), bwd = 2 * a2a(N * C * 4);
  const StepCost ep2 = cost("dp=2,ep=2,micro_batches=1");
  EXPECT_NEAR(ep2.terms.ep, fwd + bwd, 1e-15);
  EXPECT_NEAR(ep2.step_time, ep2.terms.total(), 1e-15);
  // Full recompute runs the forward, its exchange included, again.
  EXPECT_NEAR(cost("dp=2,ep=2,micro_batches=1,recompute=full").terms.ep, 2 * fwd + bwd, 1e-15);
  EXPECT_EQ(cost("dp=2,micro_batches=1").terms.ep, 0);  // ep 1: no exchange
  // Each ep rank holds E/ep = 4 experts (up (Fe, C) + bias Fe, down (C, Fe) + bias C).
  const ParallelPlan p2 = moe_plan_of("dp=2,ep=2,micro_batches=1", cfg, G, 2, T);
  const double per_expert = Fe * C + Fe + C * Fe + C;
  EXPECT_EQ(double(oracle.params(p2).expert[0]), 4 * per_expert);
  const double P = double(oracle.params(p2).total[0]), dense = P - 4 * per_expert;
  EXPECT_EQ(P, double(oracle.params(moe_plan_of("dp=2,micro_batches=1", cfg, G, 2, T)).total[0]) -
                   4 * per_expert);
  // Gradients: the dense part all-reduces over dp = 2; the experts over ep_dp = dp/ep = 1
  // rank (nothing to reduce).
  EXPECT_NEAR(ep2.terms.dp_total, 2 * a + 2 * 0.5 * dense * 4 / beta, 1e-12);
  // ZeRO-1: the optimizer owns half the dense elements and all of its experts (ep_dp = 1).
  const StepCost z1 = cost("dp=2,ep=2,zero=1,micro_batches=1");
  EXPECT_NEAR(z1.terms.optimizer, (dense / 2 + 4 * per_expert) * 36 / 100e9, 1e-12);
  // The sparse block's FFN: N k rows at Fe (half the dense d_ff here), so its forward is
  // cheaper than a dense block's by the FFN products' difference (f32 efficiency 0.5).
  const double rate = 0.5e12, F = 256;
  model::ModelConfig dense_cfg = cfg;
  dense_cfg.moe = model::MoeConfig{};
  MemoryOracle dense_oracle(dense_cfg, T, model::Precision::f32, Cluster{});
  const StepCost d = estimate_time({dense_cfg, cl, T, model::Precision::f32},
                                   plan_of("dp=2,micro_batches=1", dense_cfg, G, 2), dense_oracle);
  EXPECT_NEAR(d.terms.forward - cost("dp=2,micro_batches=1").terms.forward,
              2 * (2 * N * C * F - 2 * N * C * Fe) / rate, 1e-12);
}

TEST(CostModel, ContextParallelHidesTransfersBehindAttention) {
  // At the preset speeds (1 TFLOP/s) a long sequence's ring transfer per step is shorter than the
  // attention of a visiting block, so burst's exposed cp time is 0; allgather, which blocks,
  // is not.
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  model::ModelConfig cfg = small_model(2);
  cfg.max_seq = 8192;
  const int64_t T = 8192;
  auto cost = [&](const std::string& scheme) {
    parallel::PlanSettings s = parse_plan_string("dp=1,tp=1,pp=1,cp=4,micro_batches=1");
    s.cp_scheme = scheme;
    const ParallelPlan p = parallel::make_plan(
        s, {cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab, T}, 1, 4);
    MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
    return estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  };
  EXPECT_EQ(cost("burst").terms.cp, 0);
  EXPECT_GT(cost("allgather").terms.cp, 0);
}

TEST(CostModel, ComputeTermsByHand) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(2);
  const int64_t T = 16, G = 1;
  const ParallelPlan p = plan_of("dp=1,tp=1,pp=1,micro_batches=1,recompute=full", cfg, G, 1);
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const StepCost c = estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  // f32 efficiency is 0.5 for every size; peak 1 TFLOP/s.
  const double N = 16, C = 64, KV = 32, F = 256, V = 512, HD = 16, NH = 4, rate = 0.5e12;
  const double weights = 2 * N * (C * (C + 2 * KV) + C * C + C * F + F * C);
  const double attn = 2 * NH * T * T * HD;  // q.k and p.v, causal half each
  const double block = (weights + attn) / rate;
  const double head = 2 * N * V * C / rate;
  EXPECT_NEAR(c.terms.forward, 3 * block + head, 1e-12);  // 2 blocks + query layer
  EXPECT_NEAR(c.terms.backward, 3 * (2 * weights + 2.5 * attn) / rate + 2 * head, 1e-12);
  // Full recompute: the 2 blocks' forward again (the query layer is not a recomputed block).
  EXPECT_GT(c.terms.recompute, 2 * block);
  EXPECT_LT(c.terms.recompute, 2 * block * 1.5);
}

// Measured kernels ([kernels], as loom calibrate writes them on a CPU host) replace the table
// pricing of products' layouts, the attention kernel and the elementwise passes; by hand.
const char* kKernelsTable = R"([host]
cores = 2
concurrency = [[1, 2.0]]
memory_concurrency = [[1, 1.25]]
[kernels]
matmul_layout_f32 = [0.5, 0.25]
matmul_layout_bf16 = [1, 1]
attention_fwd = [[1, 0.1]]
attention_bwd = [[1, 0.05]]
[kernels.ns_per_element]
layernorm_fwd = 1
layernorm_bwd = 2
bias_add = 3
add = 4
bias_bwd = 5
zero = 6
gelu_fwd = 100
gelu_bwd = 100
fast_gelu_fwd = 7
fast_gelu_bwd = 8
gelu_erf_fwd = 100
gelu_erf_bwd = 100
cross_entropy = 9
optimizer = 10
[links.intra])";

// bf16 attention on AMX tiles ([kernels] attention_fwd_bf16 / _bwd_bf16, over one core's bf16
// peak) prices bf16 plans' attention from kNativeAttentionMinSeq tokens; f32 plans, shorter
// sequences and files without the tables keep the f32 tables. Both keys or neither.
TEST(CostModel, Bf16AttentionOnAmxTablesByHand) {
  const std::string with16 = with_line_replaced(
      kKernelsTable, "attention_bwd = [[1, 0.05]]\n",
      "attention_bwd = [[1, 0.05]]\nattention_fwd_bf16 = [[1, 0.2]]\nattention_bwd_bf16 = [[1, 0.08]]\n");
  const Cluster amx = cluster_from_toml(with_line_replaced(kTestCluster, "[links.intra]", with16), "amx");
  const Cluster f32 =
      cluster_from_toml(with_line_replaced(kTestCluster, "[links.intra]", kKernelsTable), "f32");
  ASSERT_EQ(amx.kernels.attention_fwd_bf16.points.size(), 1u);
  model::ModelConfig cfg = small_model(2);
  cfg.max_seq = 2 * model::kNativeAttentionMinSeq;
  const ParallelPlan p = plan_of("dp=1,tp=1,pp=1,micro_batches=1", cfg, 1, 1);
  // One rank gets 2 cores' worth (concurrency [[1, 2.0]]): one core's seconds count half. One
  // core's peaks: f32 0.5, bf16 1 TFLOP/s. 3 attention layers (2 blocks + the query layer).
  const double core_s = 0.5, NH = 4, HD = 16;
  for (int64_t T : {model::kNativeAttentionMinSeq / 2, model::kNativeAttentionMinSeq}) {
    const double attn = 2 * NH * double(T) * double(T) * HD;
    for (auto prec : {model::Precision::f32, model::Precision::bf16}) {
      MemoryOracle oa(cfg, T, prec, amx), of(cfg, T, prec, f32);
      const StepCost a = estimate_time({cfg, amx, T, prec}, p, oa);
      const StepCost b = estimate_time({cfg, f32, T, prec}, p, of);
      const bool used = prec == model::Precision::bf16 && T >= model::kNativeAttentionMinSeq;
      const double dfwd = used ? 3 * attn * core_s * (1 / (1e12 * 0.2) - 1 / (0.5e12 * 0.1)) : 0;
      const double dbwd =
          used ? 3 * 2.5 * attn * core_s * (1 / (1e12 * 0.08) - 1 / (0.5e12 * 0.05)) : 0;
      EXPECT_NEAR(a.terms.forward - b.terms.forward, dfwd, 1e-12) << T;
      EXPECT_NEAR(a.terms.backward - b.terms.backward, dbwd, 1e-12) << T;
    }
  }
  const Cluster back = cluster_from_toml(amx.to_toml(), "round trip");
  ASSERT_EQ(back.kernels.attention_bwd_bf16.points.size(), 1u);
  EXPECT_DOUBLE_EQ(back.kernels.attention_bwd_bf16.points[0].second, 0.08);
  try {
    cluster_from_toml(with_line_replaced(amx.to_toml(), "attention_bwd_bf16", "# "), "half.toml");
    FAIL() << "one of the two bf16 attention keys was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("attention_bwd_bf16"), std::string::npos) << e.what();
  }
}

TEST(CostModel, MeasuredKernelTermsByHand) {
  const Cluster cl =
      cluster_from_toml(with_line_replaced(kTestCluster, "[links.intra]", kKernelsTable), "test");
  ASSERT_TRUE(cl.kernels.measured);
  const model::ModelConfig cfg = small_model(2);  // fast_gelu
  const int64_t T = 16;
  const ParallelPlan p = plan_of("dp=1,tp=1,pp=1,micro_batches=1", cfg, 1, 1);
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const StepCost c = estimate_time({cfg, cl, T, model::Precision::f32}, p, oracle);
  // One rank alone gets 2 cores' worth (concurrency), so one core's seconds count half, and the
  // host's 1 TFLOP/s at the table's 0.5 is the plain products' rate.
  const double N = 16, C = 64, KV = 32, F = 256, V = 512, HD = 16, NH = 4, rate = 0.5e12;
  // Elementwise and optimizer work is memory-bound: it runs at the memory table's 1.25.
  const double core_s = 0.5, mem_s = 1 / 1.25, core_peak = 0.5e12, ns = 1e-9;
  const double weights = 2 * N * (C * (C + 2 * KV) + C * C + C * F + F * C);
  const double attn = 2 * NH * T * T * HD;
  const double head = 2 * N * V * C;
  // Forward products at half the plain rate (nt 0.5); backward the plain dY @ W plus dY^T @ X at
  // a quarter (tn 0.25); attention at its own efficiency of one core's peak.
  const double attn_fwd = attn * core_s / (core_peak * 0.1);
  const double attn_bwd = 2.5 * attn * core_s / (core_peak * 0.05);
  EXPECT_NEAR(c.terms.forward, 3 * (weights / rate / 0.5 + attn_fwd) + head / rate / 0.5, 1e-12);
  EXPECT_NEAR(c.terms.backward, 3 * (weights / rate * 5 + attn_bwd) + head / rate * 5, 1e-12);
  const double qkv = N * (C + 2 * KV);
  const double block_vec = mem_s * ns *
                           (1 * 2 * N * C + 3 * (qkv + 2 * N * C) + 4 * 2 * N * C + 7 * N * F +
                            2 * 2 * N * C + 5 * (qkv + 2 * N * C + N * F) + 8 * N * F + 6 * qkv);
  const double head_vec = mem_s * ns * (9 * N * V + (1 + 2) * N * C);
  EXPECT_NEAR(c.terms.vector, 3 * block_vec + head_vec, 1e-15);
  const double params = double(oracle.params(p).total[0]);
  EXPECT_NEAR(c.terms.optimizer, mem_s * 10 * ns * params, 1e-15);
  // Without [kernels] the same plan is priced as before (layouts 1, attention as products).
  const StepCost plain =
      estimate_time({cfg, cluster_from_toml(kTestCluster, "test"), T, model::Precision::f32}, p, oracle);
  EXPECT_NEAR(plain.terms.forward, 3 * (weights + attn) / rate + head / rate, 1e-12);
  // The file form round-trips.
  const Cluster back = cluster_from_toml(cl.to_toml(), "round trip");
  ASSERT_TRUE(back.kernels.measured);
  EXPECT_DOUBLE_EQ(back.kernels.layout_f32.second, 0.25);
  EXPECT_DOUBLE_EQ(back.kernels.act_bwd[size_t(model::Activation::fast_gelu)], 8e-9);
  EXPECT_DOUBLE_EQ(back.kernels.optimizer, 10e-9);
  EXPECT_NEAR(estimate_time({cfg, back, T, model::Precision::f32}, p, oracle).step_time, c.step_time,
              1e-15);
  // Strict: a missing per-element key and a layout outside (0, 10] are named.
  try {
    cluster_from_toml(with_line_replaced(cl.to_toml(), "optimizer = 10\n", ""), "bad.toml");
    ADD_FAILURE() << "no error for a missing kernels.ns_per_element.optimizer";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kernels.ns_per_element.optimizer"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(cluster_from_toml(with_line_replaced(cl.to_toml(), "matmul_layout_f32 = [0.5000, 0.2500]",
                                                    "matmul_layout_f32 = [0, 0.25]"),
                                 "bad.toml"),
               Error);
}

TEST(CostModel, OneFOneBBubbleIsPpMinusOneOverMPlusPpMinusOne) {
  for (int pp : {2, 4, 8})
    for (int64_t M : {1, 4, 16}) {
      const std::vector<double> t(size_t(pp), 0.25);
      const double span = pipeline_makespan(t, M, ScheduleKind::one_f_one_b, 1);
      const double bubble = span - double(M) * 0.25;
      EXPECT_NEAR(bubble / span, double(pp - 1) / double(M + pp - 1), 1e-12);
      // The same makespan as the schedule simulator (forward 0.1, backward 0.15 per stage).
      parallel::SimulationOptions so;
      so.forward_time = 0.1;
      so.backward_time = 0.15;
      for (ScheduleKind k : {ScheduleKind::one_f_one_b, ScheduleKind::gpipe}) {
        const auto sim = parallel::simulate(parallel::make_schedule(k, pp, int(M), 1), so);
        ASSERT_TRUE(sim.completed) << sim.error;
        EXPECT_NEAR(sim.makespan, pipeline_makespan(t, M, k, 1), 1e-9) << pp << " " << M;
      }
    }
}

TEST(CostModel, InterleavedBubbleShrinksByVirtualStages) {
  const int pp = 4, VS = 2;
  const int64_t M = 8;
  const std::vector<double> t(size_t(pp), 1.0);
  const double span = pipeline_makespan(t, M, ScheduleKind::interleaved, VS);
  // Narayanan et al. SC'21: bubble time (pp-1)/VS stage-times against M stage-times of work.
  EXPECT_NEAR(span - double(M), double(pp - 1) / VS, 1e-12);
  parallel::SimulationOptions so;
  so.forward_time = 0.5;
  so.backward_time = 0.5;
  const auto sim = parallel::simulate(parallel::make_schedule(ScheduleKind::interleaved, pp, int(M), VS), so);
  ASSERT_TRUE(sim.completed);
  // The simulator's interleaved makespan is at most the closed form (it may overlap more).
  EXPECT_LE(sim.makespan, span + 1e-9);
  EXPECT_GE(sim.makespan, double(M));
}

TEST(CostModel, PeakMemoryIsTheLargestRankOfTheEngineModel) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(8);
  const int64_t T = 32;
  for (const char* s : {"dp=2,tp=1,pp=4,zero=1,micro_batches=4,schedule=1f1b",
                        "dp=1,tp=2,pp=4,micro_batches=4,schedule=1f1b,stage_layers=1,2,3,2",
                        "dp=2,tp=2,pp=2,zero=2,micro_batches=2,schedule=gpipe,recompute=full:0-3",
                        "dp=1,tp=1,pp=2,micro_batches=4,schedule=interleaved,virtual_stages=2"}) {
    const ParallelPlan p = plan_of(s, cfg, 8, 0);
    MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
    StepCost c;
    add_memory(c, p, oracle);
    model::MemoryOptions mo;
    mo.bf16_emulated = false;
    int64_t most = 0;
    for (const model::RankMemory& r : model::memory_all_ranks(cfg, p, T, model::Precision::f32, mo))
      most = std::max(most, r.total());
    EXPECT_EQ(c.peak_bytes, most) << s;
    EXPECT_EQ(c.persistent_bytes + c.transient_bytes, c.peak_bytes);
  }
}

TEST(CostModel, PlanStringRoundTrips) {
  const model::ModelConfig cfg = small_model(8);
  const ParallelPlan p = plan_of(
      "dp=2,tp=1,pp=4,zero=1,micro_batches=4,schedule=1f1b,recompute=full:0-1,selective:4-5,"
      "stage_layers=1,2,3,2",
      cfg, 8, 8);
  EXPECT_EQ(plan_of(plan_string(p), cfg, 8, 8), p);
  const ParallelPlan q =
      plan_of("dp=1,tp=2,pp=1,cp=2,cp_scheme=allgather,cp_layout=striped,micro_batches=2", cfg, 4, 4);
  EXPECT_EQ(q.cp, 2);
  EXPECT_EQ(q.cp_scheme, "allgather");
  EXPECT_EQ(plan_of(plan_string(q), cfg, 4, 4), q);
  EXPECT_THROW(parse_plan_string("dp=2,bogus=3"), Error);
  EXPECT_THROW(parse_plan_string("2,dp=2"), Error);
}

// matmul_memory_efficiency (Calculon's "no_overlap"): each product's operand traffic (M*K + K*N +
// M*N elements) at memory bandwidth x efficiency adds to the forward term; by hand for one plan
// (pp 1, tp 1, f32: the four block products per layer and the tied head per micro-batch).
TEST(CostModel, MatmulMemoryTrafficByHand) {
  const model::ModelConfig cfg = small_model(4);
  const Cluster hidden = cluster_from_toml(kTestCluster, "test");
  const Cluster shown = cluster_from_toml(
      with_line_replaced(kTestCluster, "matmul_efficiency_f32 = [[1, 0.5]]",
                         "matmul_efficiency_f32 = [[1, 0.5]]\nmatmul_memory_efficiency = [[1, 0.8]]"),
      "test");
  ASSERT_EQ(shown.matmul_memory_eff.points.size(), 1u);
  const int64_t T = 32;
  const ParallelPlan p = plan_of("dp=1,tp=1,pp=1,micro_batches=2", cfg, 4, 1);
  MemoryOracle oracle(cfg, T, model::Precision::f32, Cluster{});
  const StepCost a = estimate_time({cfg, hidden, T, model::Precision::f32}, p, oracle);
  const StepCost b = estimate_time({cfg, shown, T, model::Precision::f32}, p, oracle);
  const double N = double(p.micro_batch_size * T), C = double(cfg.d_model),
               KV = double(cfg.kv_dim()), F = double(cfg.d_ff), V = double(cfg.vocab);
  auto moved = [](double m, double n, double k) { return m * k + k * n + m * n; };
  const double block = moved(N, C + 2 * KV, C) + moved(N, C, C) + moved(N, F, C) + moved(N, C, F);
  const double layers = double(cfg.n_layers + (cfg.query_layer ? 1 : 0));
  const double per_mb = (layers * block + moved(N, V, C)) * 4 / (100e9 * 0.8);
  EXPECT_NEAR(b.terms.forward - a.terms.forward, 2 * per_mb, 1e-12 + 1e-9 * per_mb);
  // Each backward product moves what its forward product does, twice per product.
  EXPECT_NEAR(b.terms.backward - a.terms.backward, 2 * (b.terms.forward - a.terms.forward),
              1e-12 + 1e-9 * per_mb);
  // The table is named in errors with its unit.
  try {
    cluster_from_toml(with_line_replaced(kTestCluster, "matmul_efficiency_f32 = [[1, 0.5]]",
                                         "matmul_efficiency_f32 = [[1, 0.5]]\nmatmul_memory_efficiency = [[1, 2]]"),
                      "bad");
    ADD_FAILURE() << "efficiency 2 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("device.matmul_memory_efficiency"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("MB"), std::string::npos) << e.what();
  }
}

// Time at scale: published step times of Megatron-LM GPT runs on Selene (A100-80GB SXM, 8 per
// node on NVLink 3 / NVSwitch, 8x 200 Gb/s HDR InfiniBand per node: configs/clusters/
// a100-80gb-ib.toml; both Megatron papers state this layout) and of BLOOM-176B on Jean Zay (4x
// 100 Gb/s Omni-Path per node: a100-80gb-opa-jeanzay.toml). GPT as the papers define it: s = 2048,
// d_ff = 4h, tied embedding. The presets are used as published (Calculon's A100 figures,
// including its HBM efficiency table and "no_overlap" mode: products' operand traffic adds to
// their time); no per-run factor. Each row's plan is loom's nearest: loom's tp is always
// Megatron tp with sequence parallelism, its attention is flash attention, its elementwise passes
// are f32 (docs/planner.md "Published step times" has the tables, the errors and where each row
// was read).
struct PublishedRun {
  const char* source;
  int64_t heads, hidden, layers, tp, pp, gpus, batch;
  std::string plan;    // schedule and recompute; dp, tp, pp (and micro_batches) follow
  double published_s;  // the publication's step time (or the one its figures give)
  int64_t vocab = 51200;
  const char* cluster = "a100-80gb-ib.toml";  // the run's own cluster (configs/clusters/)
};

model::ModelConfig megatron_gpt(int64_t heads, int64_t hidden, int64_t layers, int64_t vocab) {
  model::ModelConfig cfg;
  cfg.name = "megatron";
  cfg.vocab = vocab;
  cfg.n_layers = layers;
  cfg.d_model = hidden;
  cfg.n_heads = cfg.n_kv_heads = heads;
  cfg.d_ff = 4 * hidden;
  cfg.max_seq = 2048;
  return cfg;
}

// Predicted / published - 1 for each run; micro-batch size = batch / (dp x micro_batches) where
// the plan names micro_batches, else 1.
std::vector<double> published_errors(const std::vector<PublishedRun>& runs, bool print = true) {
  const int64_t s = 2048;
  std::vector<double> errors;
  for (const PublishedRun& r : runs) {
    const Cluster cl = load_cluster(std::string(LOOM_SOURCE_DIR) + "/configs/clusters/" + r.cluster);
    const model::ModelConfig cfg = megatron_gpt(r.heads, r.hidden, r.layers, r.vocab);
    const int64_t dp = r.gpus / (r.tp * r.pp);
    std::string spec = fmt::format("dp={},tp={},pp={},{}", dp, r.tp, r.pp, r.plan);
    if (spec.find("micro_batches") == std::string::npos)
      spec += fmt::format(",micro_batches={}", r.batch / dp);
    const ParallelPlan p = plan_of(spec, cfg, r.batch, int(r.gpus));
    MemoryOracle oracle(cfg, s, model::Precision::bf16, Cluster{});
    const StepCost c = estimate_time({cfg, cl, s, model::Precision::bf16}, p, oracle);
    const double err = c.step_time / r.published_s - 1;
    errors.push_back(err);
    if (print)
      std::printf("%-12s h %5lld L %3lld n %4lld B %4lld %-72s published %7.2f s "
                  "predicted %7.2f s %+6.1f%%\n",
                  r.source, (long long)r.hidden, (long long)r.layers, (long long)r.gpus,
                  (long long)r.batch, spec.c_str(), r.published_s, c.step_time, 100 * err);
  }
  return errors;
}

double mean_abs(const std::vector<double>& e) {
  double sum = 0;
  for (double x : e) sum += std::abs(x);
  return e.empty() ? 0 : sum / double(e.size());
}

// Narayanan et al., SC'21 (arXiv 2104.04473), Table 1 (weak scaling: heads, hidden, layers, tp,
// pp, GPUs, batch, achieved TFLOP/s per GPU); every row re-read from the paper's text (a markdown
// conversion of the arXiv paper in the stored GitHub corpus, docs/planner.md names it). The
// published step time follows from the paper's FLOP count with recompute, its eq. (3),
// 96 B s L h^2 (1 + s/(6h) + V/(16 L h)), over n GPUs x the TFLOP/s per GPU. Full recompute (eq.
// (3) counts it); micro-batch 1 and 1f1b (the table gives neither).
std::vector<PublishedRun> sc21_table1() {
  struct Row { int64_t heads, hidden, layers, tp, pp, gpus, batch; double tflops_per_gpu; };
  const Row rows[] = {{24, 2304, 24, 1, 1, 32, 512, 137},     {32, 3072, 30, 2, 1, 64, 512, 138},
                      {32, 4096, 36, 4, 1, 128, 512, 142},    {48, 6144, 40, 8, 1, 256, 1024, 135},
                      {64, 8192, 48, 8, 2, 512, 1536, 138},   {80, 10240, 60, 8, 4, 1024, 1792, 140},
                      {96, 12288, 80, 8, 8, 1536, 2304, 148}, {128, 16384, 96, 8, 16, 1920, 2160, 155},
                      {128, 20480, 105, 8, 35, 2520, 2520, 163},
                      {160, 25600, 128, 8, 64, 3072, 3072, 163}};
  std::vector<PublishedRun> runs;
  for (const Row& r : rows) {
    const double s = 2048, V = 51200, L = double(r.layers), h = double(r.hidden);
    const double flops =
        96.0 * double(r.batch) * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h));
    runs.push_back({"SC'21 T1", r.heads, r.hidden, r.layers, r.tp, r.pp, r.gpus, r.batch,
                    "schedule=1f1b,recompute=full",
                    flops / (double(r.gpus) * r.tflops_per_gpu * 1e12)});
  }
  return runs;
}

// Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (arXiv
// 2205.05198, MLSys'23), re-read from the paper's text (docs/planner.md names the copy): Table 3
// (configurations: no data parallelism; 22B micro-batch 4, the others 1; "the interleaving
// schedule with three interleaving stages" for 175B and 530B) and Table 5 (end-to-end iteration
// seconds, "full recompute" vs "present work" = sequence parallelism + selective recompute), and
// section 6.3's 530B at 8-way data parallelism (2240 GPUs, batch 8 x 280): 39.15 s, present work,
// gradient all-reduce not overlapped. loom's plans: recompute=full vs recompute=selective (loom's
// tp is always sequence parallel, so the full-recompute rows, which Megatron ran without
// sequence parallelism, get it too; the paper's Table 4 puts that at 3% of a layer's time).
std::vector<PublishedRun> korthikanti_table5() {
  const std::string full = "recompute=full", sel = "recompute=selective";
  const std::string mb1 = "schedule=1f1b,micro_batches=1,", f1b = "schedule=1f1b,",
                    il = "schedule=interleaved,virtual_stages=3,";
  const char* t5 = "MLSys'23 T5";
  return {
      {t5, 64, 6144, 48, 8, 1, 8, 4, mb1 + full, 1.42},
      {t5, 64, 6144, 48, 8, 1, 8, 4, mb1 + sel, 1.10},
      {t5, 96, 12288, 96, 8, 8, 64, 64, il + full, 18.13},
      {t5, 96, 12288, 96, 8, 8, 64, 64, il + sel, 13.75},
      {t5, 128, 20480, 105, 8, 35, 280, 280, il + full, 49.05},
      {t5, 128, 20480, 105, 8, 35, 280, 280, il + sel, 37.83},
      {t5, 160, 25600, 128, 8, 64, 512, 512, f1b + full, 94.42},
      {t5, 160, 25600, 128, 8, 64, 512, 512, f1b + sel, 71.49},
      {"MLSys'23 6.3", 128, 20480, 105, 8, 35, 2240, 2240, il + sel, 39.15},
  };
}

// BLOOM-176B (BigScience, Megatron-DeepSpeed) on Jean Zay: its own cluster file,
// a100-80gb-opa-jeanzay.toml (4x 100 Gb/s Omni-Path per node, a quarter of Selene's inter-node
// bandwidth per GPU). Configuration and time from bigscience-workshop/bigscience
// train/tr11-176B-ml/README.md: 70 layers, hidden 14336, 112 heads, s = 2048, embedding
// 250880 x 14336 (the 250,680-token vocabulary padded), TP=4 PP=12 DP=8 MBS=2, GBS=2048 once
// ramped up, activation checkpointing (full recompute), the BF16 optimizer's own ZeRO stage 1,
// pipeline partition "embed | 5 blocks", 6 blocks x 10, "5 blocks | embed"; the first epoch's
// last logged iteration (85376, GBS 2048): "elapsed time per iteration (s): 104.70", 149.77
// TFLOP/s per GPU. ALiBi and the embedding layer norm are not in loom's model (both are small).
std::vector<PublishedRun> bloom_tr11() {
  PublishedRun r{"BLOOM tr11", 112, 14336, 70, 4, 12, 384, 2048,
                 "zero=1,schedule=1f1b,recompute=full,micro_batches=128,"
                 "stage_layers=5,6,6,6,6,6,6,6,6,6,6,5",
                 104.70};
  r.vocab = 250880;
  r.cluster = "a100-80gb-opa-jeanzay.toml";
  return {r};
}

TEST(CostModel, MegatronSelenePublishedStepTimes) {
  const std::vector<double> e = published_errors(sc21_table1());
  for (double x : e) EXPECT_LT(std::abs(x), 0.25);
  std::printf("SC'21 Table 1: mean |error| %.1f%% over %zu runs\n", 100 * mean_abs(e), e.size());
  EXPECT_LT(mean_abs(e), 0.15);  // the issue's bound: 15% on average
}

TEST(CostModel, MegatronSelectiveRecomputePublishedStepTimes) {
  const std::vector<double> e = published_errors(korthikanti_table5());
  for (double x : e) EXPECT_LT(std::abs(x), 0.25);
  std::printf("Korthikanti Table 5 / 6.3: mean |error| %.1f%% over %zu runs\n", 100 * mean_abs(e),
              e.size());
  EXPECT_LT(mean_abs(e), 0.15);
}

TEST(CostModel, BloomJeanZayPublishedStepTime) {
  const std::vector<double> e = published_errors(bloom_tr11());
  ASSERT_EQ(e.size(), 1u);
  EXPECT_LT(std::abs(e[0]), 0.25);
}

// All sources together: 20 runs, one preset per cluster, no per-run factor.
TEST(CostModel, PublishedStepTimesAllSources) {
  std::vector<double> e = published_errors(sc21_table1(), false);
  for (double x : published_errors(korthikanti_table5(), false)) e.push_back(x);
  for (double x : published_errors(bloom_tr11(), false)) e.push_back(x);
  ASSERT_EQ(e.size(), 20u);
  std::printf("all sources: mean |error| %.1f%% over %zu runs\n", 100 * mean_abs(e), e.size());
  EXPECT_LT(mean_abs(e), 0.15);  // the issue's bound: 15% on average
}

SearchOptions small_search(int devices) {
  SearchOptions o;
  o.devices = devices;
  o.global_batch = 8;
  o.seq = 32;
  return o;
}

TEST(Search, FrontierIsValidUndominatedAndSorted) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(8);
  const SearchResult r = search(cfg, cl, small_search(8));
  ASSERT_FALSE(r.frontier.empty());
  for (size_t i = 0; i < r.frontier.size(); ++i) {
    const Candidate& c = r.frontier[i];
    EXPECT_NO_THROW(plan_of(c.key, cfg, 8, 8)) << c.key;
    EXPECT_EQ(c.plan.world_size(), 8);
    if (i > 0) {
      EXPECT_GE(c.cost.step_time, r.frontier[i - 1].cost.step_time);
      EXPECT_LT(memory_bucket(c.cost.peak_bytes, 0.01),
                memory_bucket(r.frontier[i - 1].cost.peak_bytes, 0.01));
    }
  }
  EXPECT_GT(r.timed, 100);
  EXPECT_FALSE(r.truncated);
}

TEST(Search, PrunedSearchEqualsBruteForce) {
  // Brute force: every candidate's memory computed. No plan may dominate a frontier point, and
  // every plan off the frontier must be dominated by one on it; the pruned search must agree.
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(8);
  for (int devices : {4, 8}) {
    SearchOptions o = small_search(devices);
    o.space.cp = {1, 2, 4};  // seq 32: zigzag chunks of 8 and 4 tokens
    o.prune_with_bound = false;
    o.max_memory_evals = 1'000'000;
    const SearchResult brute = search(cfg, cl, o);
    EXPECT_EQ(brute.memory_evaluated, brute.timed);
    SearchOptions op = small_search(devices);
    op.space.cp = {1, 2, 4};
    const SearchResult pruned = search(cfg, cl, op);
    int64_t cp_plans = 0;
    for (const Candidate& x : brute.evaluated) cp_plans += x.plan.cp > 1;
    EXPECT_GT(cp_plans, 0);
    ASSERT_EQ(pruned.frontier.size(), brute.frontier.size()) << devices;
    for (size_t i = 0; i < brute.frontier.size(); ++i)
      EXPECT_EQ(pruned.frontier[i].key, brute.frontier[i].key);
    EXPECT_GT(pruned.pruned_by_bound, 0);
    auto bucket = [](const Candidate& c) { return memory_bucket(c.cost.peak_bytes, 0.01); };
    for (const Candidate& x : brute.evaluated) {
      bool on = false, covered = false;
      for (const Candidate& f : brute.frontier) {
        on |= f.key == x.key;
        covered |= f.cost.step_time <= x.cost.step_time && bucket(f) <= bucket(x);
        // Nothing strictly dominates a frontier point.
        EXPECT_FALSE(x.cost.step_time < f.cost.step_time && bucket(x) < bucket(f))
            << x.key << " dominates " << f.key;
      }
      EXPECT_TRUE(on || covered) << x.key << " is missing from the frontier";
    }
  }
}

TEST(Search, PrunedSearchEqualsBruteForceWithExpertParallel) {
  // tiny-moe (8 experts, ZeRO 0/1 under ep): ep in {1, 2, 4, 8} wherever it divides dp.
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = tiny_moe();
  EXPECT_EQ(auto_ep_sizes(cfg), (std::vector<int>{1, 2, 4, 8}));
  EXPECT_EQ(auto_ep_sizes(small_model()), (std::vector<int>{1}));
  for (int devices : {4, 8}) {
    SearchOptions o = small_search(devices);
    o.prune_with_bound = false;
    o.max_memory_evals = 1'000'000;
    const SearchResult brute = search(cfg, cl, o);
    const SearchResult pruned = search(cfg, cl, small_search(devices));
    int64_t ep_plans = 0, ep_frontier = 0, ep_zero23 = 0;
    for (const Candidate& x : brute.evaluated) {
      ep_plans += x.plan.ep > 1;
      EXPECT_TRUE(x.plan.ep == 1 || x.plan.dp % x.plan.ep == 0) << x.key;
      if (x.plan.ep > 1) {
        EXPECT_GT(x.cost.terms.ep, 0) << x.key;
        // ZeRO-2/3 under ep (train/zero.h): the dense all-reduce over ep is priced.
        if (x.plan.zero >= 2) {
          ++ep_zero23;
          EXPECT_GT(x.cost.terms.zero, 0) << x.key;
        }
      }
    }
    for (const Candidate& f : brute.frontier) ep_frontier += f.plan.ep > 1;
    EXPECT_GT(ep_plans, 0);
    EXPECT_GT(ep_zero23, 0);
    ASSERT_EQ(pruned.frontier.size(), brute.frontier.size()) << devices;
    for (size_t i = 0; i < brute.frontier.size(); ++i)
      EXPECT_EQ(pruned.frontier[i].key, brute.frontier[i].key);
    auto bucket = [](const Candidate& c) { return memory_bucket(c.cost.peak_bytes, 0.01); };
    for (const Candidate& x : brute.evaluated) {
      bool on = false, covered = false;
      for (const Candidate& f : brute.frontier) {
        on |= f.key == x.key;
        covered |= f.cost.step_time <= x.cost.step_time && bucket(f) <= bucket(x);
        EXPECT_FALSE(x.cost.step_time < f.cost.step_time && bucket(x) < bucket(f))
            << x.key << " dominates " << f.key;
      }
      EXPECT_TRUE(on || covered) << x.key << " is missing from the frontier";
    }
    std::printf("tiny-moe on %d: %ld plans (%ld with ep > 1), frontier %zu (%ld with ep > 1)\n",
                devices, long(brute.timed), long(ep_plans), brute.frontier.size(),
                long(ep_frontier));
  }
}

TEST(Search, LargePresetsNeedFewWholeReplays) {
  // The issue's search targets (docs/planner.md "At scale"): PanGu-alpha 200B on the 2048-Ascend
  // preset and Megatron's 1T on 3072 A100s. The memory bounds keep the replays counted against
  // max_memory_evals in the hundreds / low thousands (the search before them: 2,146 and 8,409);
  // CPU seconds are printed, not asserted (machines differ; docs/planner.md has the numbers).
  struct Case { const char *model, *cluster; int devices; int64_t batch, seq; int64_t max_evals; };
  const Case cases[] = {{"pangu-alpha-200b.toml", "pangu-ascend-2048.toml", 2048, 512, 1024, 1500},
                        {"megatron-1t.toml", "a100-80gb-ib.toml", 3072, 3072, 2048, 6000}};
  for (const Case& c : cases) {
    const model::ModelConfig cfg =
        model::load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/" + c.model);
    const Cluster cl = load_cluster(std::string(LOOM_SOURCE_DIR) + "/configs/clusters/" + c.cluster);
    SearchOptions o;
    o.devices = c.devices;
    o.global_batch = c.batch;
    o.seq = c.seq;
    o.precision = model::Precision::bf16;
    const std::clock_t t0 = std::clock();
    const SearchResult r = search(cfg, cl, o);
    const double cpu = double(std::clock() - t0) / CLOCKS_PER_SEC;
    EXPECT_FALSE(r.truncated) << c.model;
    EXPECT_LT(r.memory_evaluated, c.max_evals) << c.model;
    EXPECT_GT(r.pruned_by_persistent, r.timed / 2) << c.model;
    std::printf("%s: %ld plans timed, frontier %zu, %ld replays counted (%ld by the oracle), "
                "%.2f s CPU\n",
                c.model, long(r.timed), r.frontier.size(), long(r.memory_evaluated),
                long(r.oracle_replays), cpu);
  }
}

TEST(Search, DeterministicAndBounded) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(8);
  const SearchResult a = search(cfg, cl, small_search(8)), b = search(cfg, cl, small_search(8));
  ASSERT_EQ(a.frontier.size(), b.frontier.size());
  for (size_t i = 0; i < a.frontier.size(); ++i) EXPECT_EQ(a.frontier[i].key, b.frontier[i].key);
  SearchOptions o = small_search(8);
  o.max_candidates = 10;
  const SearchResult t = search(cfg, cl, o);
  EXPECT_TRUE(t.truncated);
  EXPECT_LE(t.timed, 10);
  o = small_search(8);
  o.max_memory_evals = 3;
  const SearchResult m = search(cfg, cl, o);
  EXPECT_TRUE(m.truncated);
  EXPECT_LE(m.memory_evaluated, 3);
  EXPECT_NE(m.truncated_why.find("max_memory_evals"), std::string::npos);
}

TEST(Search, NoValidLayoutNamesTheConstraintAndNearbyCounts) {
  const Cluster cl = cluster_from_toml(kTestCluster, "test");
  const model::ModelConfig cfg = small_model(4);
  // 5 ranks: tp = 5 does not divide 4 heads, pp = 5 exceeds 4 layers, dp = 5 the batch 8.
  SearchOptions o = small_search(5);
  try {
    search(cfg, cl, o);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("dp must divide the global batch 8"), std::string::npos) << m;
    EXPECT_NE(m.find("tp must divide n_heads=4"), std::string::npos) << m;
    EXPECT_NE(m.find("pp > n_layers=4"), std::string::npos) << m;
    EXPECT_NE(m.find("nearby: 2, 3, 4, 6"), std::string::npos) << m;
  }
  o = small_search(16);  // more than the cluster has
  EXPECT_THROW(search(cfg, cl, o), Error);
}

TEST(Search, BalancedStagesLightenTheLastStage) {
  model::ModelConfig cfg = small_model(9);
  const std::vector<int64_t> s = balanced_stage_layers(cfg, 3, 1, 32);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0] + s[1] + s[2], 9);
  EXPECT_LT(s[2], s[1]);  // the last stage also runs the head and the query layer
}

}  // namespace
}  // namespace loom::planner
