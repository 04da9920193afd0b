// Context-parallel training under mpirun (--cp G through the one executor): every layout with
// cp (cp 2, cp 4, cp 2 x dp 2 with ZeRO 0/1/2, cp 2 x tp 2, cp 2 x pp 2; zigzag and striped;
// every scheme) equals the serial run of the same global batch: losses over 10 steps within
// 1e-5 relative and parameters per tensor within 1e-5 relative L2 (and the validation loss
// when dp = 1); one step's gradient equals the serial one per tensor for every scheme; cp 2 is
// bit-identical run to run and checkpoints move between cp 2 and serial. Bad layouts get errors
// that name the values and what would work.
//
// The tiny model (configs/models/tiny.toml: 4 heads, 2 kv heads, query layer) at seq 32, so
// zigzag cp 4 has chunks of 4 tokens and every chunk boundary crosses ranks.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "dist/train/train_helpers.h"
#include "model/config.h"
#include "model/params.h"
#include "parallel/topology.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace loom;

namespace {

constexpr int64_t kGlobalBatch = 4;  // sequences per step (2 micro-batches)
constexpr int kSteps = 10;

train::TrainConfig config(const std::string& dir, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> sets = {
      "train.batch=" + std::to_string(kGlobalBatch), "train.seq=32", "train.micro_batches=2",
      "parallel.bucket_mb=0.05", "checkpoint.dir=\"" + dir + "/ckpt\"", "log.dir=\"" + dir + "\"",
      "optim.warmup_steps=2",
      // AdamW's eps at 1e-6, not 1e-8: an element whose gradient is below eps moves by
      // lr * g / eps, so its rounding noise is amplified by lr/eps = 3e5 at 1e-8. cp changes the
      // summation order inside attention (ring merges of partial softmax states, f32 partial
      // dQ/dK/dV), and a few near-zero gradient elements differ by ~1e-12 between layouts.
      // Measured at cp 2 after 1 / 5 steps: 3.2e-6 / 5.0e-6 (overall relative L2) at 1e-8,
      // 8.2e-8 / 1.3e-7 at 1e-6; gradients themselves agree to 2e-7 (GradientEqualsSerial).
      "optim.eps=1e-6"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return train::load_train_config(std::string(LOOM_SOURCE_DIR) + "/configs/train/tiny.toml", sets);
}

struct Layout {
  int dp = 1, tp = 1, pp = 1, cp = 1;
  std::string name() const {
    return "cp " + std::to_string(cp) + " x dp " + std::to_string(dp) + " x tp " +
           std::to_string(tp) + " x pp " + std::to_string(pp);
  }
};

struct TrainRun {
  std::vector<double> losses;
  std::vector<float> weights;  // logical layout
  double val = 0;              // validation loss after training (forward_eval over cp)
};

TrainRun run_serial(const std::string& dir) {
  MemoryPool pool;
  train::Trainer t(config(dir), pool);
  t.init_fresh();
  TrainRun r;
  for (int i = 0; i < kSteps; ++i) r.losses.push_back(t.train_step().loss);
  r.weights = t.full_weights();
  r.val = t.eval_loss(2);
  return r;
}

// The layout's groups on the world (order tp-cp-dp-pp, as `loom train` builds them).
TrainRun run_layout(const comm::ProcessGroup& world, const Layout& l, const std::string& dir,
                    const std::vector<std::string>& extra) {
  parallel::ParallelSizes sizes;
  sizes.dp = l.dp;
  sizes.tp = l.tp;
  sizes.pp = l.pp;
  sizes.cp = l.cp;
  const parallel::ProcessGroups g = parallel::ProcessGroups::build(
      parallel::Topology(world.size(), sizes, "tp-cp-dp-pp"), world);
  std::vector<std::string> sets = {"parallel.cp=" + std::to_string(l.cp)};
  sets.insert(sets.end(), extra.begin(), extra.end());
  MemoryPool pool;
  train::Trainer t(config(dir, sets), pool, &g.dp, &g.tp, &g.pp, &g.cp, &g.dp_cp);
  EXPECT_EQ(t.cp_size(), l.cp);
  t.init_fresh();
  TrainRun r;
  for (int i = 0; i < kSteps; ++i) {
    const train::StepStats st = t.train_step();
    r.losses.push_back(st.loss);
    // The cp kernels' scratch (outside the pool) is reported every step.
    if (i == 0) {
      EXPECT_GT(st.cp_workspace_bytes, 0) << l.name();
    }
  }
  r.weights = t.full_weights();
  r.val = t.eval_loss(2);
  return r;
}

void expect_close(const TrainRun& got, const TrainRun& want, const std::string& what) {
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (size_t i = 0; i < got.losses.size(); ++i)
    // Only the summation order differs (the ring's merge of partial softmax states, the f32
    // dQ/dK/dV partial sums, the dp x cp all-reduce): ~1e-7 relative per sum, over 10 steps.
    EXPECT_NEAR(got.losses[i], want.losses[i], 1e-5 * want.losses[i]) << what << " step " << i + 1;
  ASSERT_EQ(got.weights.size(), want.weights.size());
  // Per tensor relative L2 (see test_tensor_parallel.cpp for why not element-wise).
  model::ParamLayout layout(
      model::load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/tiny.toml"));
  for (const auto& s : layout.specs()) {
    const float* a = got.weights.data() + s.offset;
    const float* b = want.weights.data() + s.offset;
    if (s.name.find("attn.k.bias") != std::string::npos) {
      // Its gradient is identically zero (softmax cancels it): it must not move at all.
      EXPECT_EQ(std::memcmp(a, b, size_t(s.numel) * 4), 0) << what << ": " << s.name << " moved";
      continue;
    }
    EXPECT_LT(train_test::relative_l2(a, b, s.numel), 1e-5) << what << ": " << s.name;
  }
}

struct Case {
  Layout layout;
  std::vector<std::string> extra;
  std::string label;
};

void run_cases(const std::vector<Case>& cases, const std::string& tag) {
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  const std::string dir = train_test::shared_dir(world, "cp_" + tag);
  const TrainRun serial = run_serial(dir + "_s" + std::to_string(world.rank()));
  for (const Case& c : cases) {
    const std::string what = c.layout.name() + " " + c.label;
    TrainRun r = run_layout(world, c.layout, dir, c.extra);
    expect_close(r, serial, what);
    // Evaluation reads batches of the micro-batch size (b = batch / (dp x M)): comparable with
    // the serial run's when dp = 1.
    if (c.layout.dp == 1) {
      EXPECT_NEAR(r.val, serial.val, 1e-5 * serial.val) << what << " validation loss";
    }
    // Every rank ends with the same logical weights bit for bit.
    std::vector<float> other = r.weights;
    world.broadcast(comm::BufferRef(other.data(), int64_t(other.size()), DType::f32), 0).wait();
    EXPECT_EQ(r.weights, other) << what << ": ranks diverged";
  }
  world.barrier().wait();
  if (world.rank() == 0) fs::remove_all(dir);
  fs::remove_all(dir + "_s" + std::to_string(world.rank()));
}

TEST(ContextParallel, Cp2EqualsSerial) {
  if (comm::ProcessGroup::world().size() != 2) GTEST_SKIP() << "SKIP: needs 2 ranks";
  run_cases({{{1, 1, 1, 2}, {}, "burst zigzag"},
             {{1, 1, 1, 2}, {"parallel.cp_layout=\"striped\"", "parallel.cp_scheme=\"ring\""},
              "ring striped"},
             {{1, 1, 1, 2}, {"parallel.cp_scheme=\"allgather\"", "train.recompute=\"full\""},
              "allgather, recompute full"},
             {{1, 1, 1, 2}, {"parallel.cp_scheme=\"ulysses\""}, "ulysses"}},
            "np2");
}

// The gradient itself, before AdamW (which divides each element by its own RMS and so turns
// rounding noise in near-zero gradients into lr-sized steps): one step at cp 2 and serially.
TEST(ContextParallel, GradientEqualsSerial) {
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  if (world.size() != 2) GTEST_SKIP() << "SKIP: needs 2 ranks";
  const std::string dir = train_test::shared_dir(world, "cp_grad");
  for (const char* scheme : {"burst", "ring", "allgather", "ulysses"}) {
    MemoryPool sp;
    train::Trainer serial(config(dir + "_s" + std::to_string(world.rank())), sp);
    serial.init_fresh();
    const double ls = serial.train_step().loss;
    parallel::ParallelSizes sizes;
    sizes.cp = 2;
    const parallel::ProcessGroups g = parallel::ProcessGroups::build(
        parallel::Topology(2, sizes, "tp-cp-dp-pp"), world);
    MemoryPool pool;
    train::Trainer t(config(dir, {"parallel.cp=2", std::string("parallel.cp_scheme=\"") + scheme + "\""}),
                     pool, &g.dp, &g.tp, &g.pp, &g.cp, &g.dp_cp);
    t.init_fresh();
    const double l = t.train_step().loss;
    EXPECT_NEAR(l, ls, 1e-6 * ls) << scheme;
    const model::GptStage& a = t.executor().chunk(0);
    const model::GptStage& b = serial.executor().chunk(0);
    ASSERT_EQ(a.total(), b.total());
    // Summation order only (ring merges, f32 partial dQ/dK/dV, the cp all-reduce).
    const double e = train_test::relative_l2(a.grads(), b.grads(), a.total());
    if (world.rank() == 0) std::printf("cp 2 %s: loss %.9g vs serial %.9g, gradient relative L2 %.3g\n", scheme, l, ls, e);
    EXPECT_LT(e, 1e-6) << scheme;
    double worst = 0;
    std::string worst_name;
    for (const model::StageParam& p : a.params()) {
      if (p.global.name.find("attn.k.bias") != std::string::npos) continue;
      const double pe = train_test::relative_l2(a.grads() + p.local_offset,
                                                b.grads() + p.local_offset, p.global.numel);
      // Per tensor too: a wrong position row or target would stand out here.
      EXPECT_LT(pe, 1e-5) << scheme << ": " << p.global.name;
      if (pe > worst) worst = pe, worst_name = p.global.name;
    }
    if (world.rank() == 0) std::printf("  worst tensor %s %.3g\n", worst_name.c_str(), worst);
  }
  world.barrier().wait();
  if (world.rank() == 0) fs::remove_all(dir);
  fs::remove_all(dir + "_s" + std::to_string(world.rank()));
}

TEST(ContextParallel, FourRankLayoutsEqualSerial) {
  if (comm::ProcessGroup::world().size() != 4) GTEST_SKIP() << "SKIP: needs 4 ranks";
  run_cases({{{1, 1, 1, 4}, {}, "burst zigzag"},
             {{2, 1, 1, 2}, {}, "zero 0"},
             {{2, 1, 1, 2}, {"parallel.zero=1"}, "zero 1"},
             {{2, 1, 1, 2}, {"parallel.zero=2"}, "zero 2"},
             {{1, 2, 1, 2}, {}, "burst zigzag"},
             {{1, 1, 2, 2}, {}, "burst zigzag"}},
            "np4");
}

// Same layout twice: bit-identical. A checkpoint written at cp 2 resumes serially (and a serial
// one at cp 2) and continues like the uninterrupted serial run.
TEST(ContextParallel, DeterministicAndCheckpointsMoveBetweenCpAndSerial) {
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  if (world.size() != 2) GTEST_SKIP() << "SKIP: needs 2 ranks";
  const std::string dir = train_test::shared_dir(world, "cp_ckpt");
  const std::string single = dir + "_s" + std::to_string(world.rank());
  parallel::ParallelSizes sizes;
  sizes.cp = 2;
  const parallel::ProcessGroups g =
      parallel::ProcessGroups::build(parallel::Topology(2, sizes, "tp-cp-dp-pp"), world);
  const std::vector<std::string> cp2 = {"parallel.cp=2"};
  auto losses = [](train::Trainer& t, int n) {
    std::vector<double> l;
    for (int i = 0; i < n; ++i) l.push_back(t.train_step().loss);
    return l;
  };
  std::vector<double> first, serial_tail;
  {
    MemoryPool pool;
    train::Trainer t(config(dir, cp2), pool, &g.dp, &g.tp, &g.pp, &g.cp, &g.dp_cp);
    t.init_fresh();
    first = losses(t, 3);
    t.save(dir + "/cp_ckpt");
  }
  {
    MemoryPool pool;
    train::Trainer t(config(dir, cp2), pool, &g.dp, &g.tp, &g.pp, &g.cp, &g.dp_cp);
    t.init_fresh();
    EXPECT_EQ(losses(t, 3), first) << "cp 2 twice";
  }
  {
    MemoryPool pool;
    train::Trainer serial(config(single), pool);
    serial.init_fresh();
    (void)losses(serial, 3);
    serial.save(single + "/serial_ckpt");
    serial_tail = losses(serial, 3);
  }
  {
    MemoryPool pool;
    train::Trainer t(config(single), pool);
    t.resume(dir + "/cp_ckpt");
    const std::vector<double> l = losses(t, 3);
    for (size_t i = 0; i < l.size(); ++i)
      EXPECT_NEAR(l[i], serial_tail[i], 1e-5 * serial_tail[i]) << "serial from cp 2, step " << i;
  }
  {
    MemoryPool pool;
    train::Trainer t(config(dir, cp2), pool, &g.dp, &g.tp, &g.pp, &g.cp, &g.dp_cp);
    t.resume(single + "/serial_ckpt");
    const std::vector<double> l = losses(t, 3);
    for (size_t i = 0; i < l.size(); ++i)
      EXPECT_NEAR(l[i], serial_tail[i], 1e-5 * serial_tail[i]) << "cp 2 from serial, step " << i;
  }
  world.barrier().wait();
  if (world.rank() == 0) fs::remove_all(dir);
  fs::remove_all(single);
}

TEST(ContextParallel, BadLayoutsNameWhatWorks) {
  auto message = [](const std::vector<std::string>& sets, int world) -> std::string {
    try {
      train::TrainConfig c = config("/tmp/unused", sets);
      (void)train::make_train_plan(c, world);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  // zigzag needs seq divisible by 2*cp: cp 3 at seq 32 names 6 and what works.
  std::string m = message({"parallel.cp=3"}, 3);
  EXPECT_NE(m.find("seq = 32 is not divisible by 6"), std::string::npos) << m;
  EXPECT_NE(m.find("cp in {2, 4, 8, 16}"), std::string::npos) << m;
  // striped needs seq divisible by cp.
  m = message({"parallel.cp=3", "parallel.cp_layout=\"striped\""}, 3);
  EXPECT_NE(m.find("divisible by 3"), std::string::npos) << m;
  // Ulysses above the kv heads (2).
  m = message({"parallel.cp=4", "parallel.cp_scheme=\"ulysses\""}, 4);
  EXPECT_NE(m.find("must divide the kv heads"), std::string::npos) << m;
  EXPECT_NE(m.find("use cp in {1, 2}"), std::string::npos) << m;
  // cp x tp x dp x pp must be the world.
  m = message({"parallel.cp=2", "parallel.tp=2", "parallel.dp=2"}, 4);
  EXPECT_NE(m.find("cp = 2 is 8 ranks, but 4 were launched"), std::string::npos) << m;
  // Unknown names list the valid ones.
  m = message({"parallel.cp=2", "parallel.cp_scheme=\"fast\""}, 2);
  EXPECT_NE(m.find("use burst, ring, allgather or ulysses"), std::string::npos) << m;
  m = message({"parallel.cp=2", "parallel.cp_layout=\"diagonal\""}, 2);
  EXPECT_NE(m.find("use zigzag or striped"), std::string::npos) << m;
}

}  // namespace
