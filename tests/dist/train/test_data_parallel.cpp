// Data parallel training under mpirun: every (dp, zero) layout of one config (train.batch is the
// global batch) equals the serial run, two runs of a layout are bit-identical, ZeRO-1 divides the optimizer bytes,
// the dp all-reduce moves the closed-form bytes, and checkpoints move between layouts.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "comm/process_group.h"
#include "dist/train/train_helpers.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace loom;

namespace {

train::TrainConfig config(int64_t batch, int64_t zero, const std::string& dir, double bucket_mb) {
  std::vector<std::string> sets = {
      "train.batch=" + std::to_string(batch), "train.seq=32", "train.micro_batches=2",
      "parallel.zero=" + std::to_string(zero), "parallel.bucket_mb=" + std::to_string(bucket_mb),
      "checkpoint.dir=\"" + dir + "/ckpt\"", "log.dir=\"" + dir + "\"", "optim.warmup_steps=2"};
  return train::load_train_config(std::string(LOOM_SOURCE_DIR) + "/configs/train/tiny.toml", sets);
}

using train_test::relative_l2;

std::string shared_dir(const comm::ProcessGroup& world, const std::string& name) {
  return train_test::shared_dir(world, "dp_" + name);
}

constexpr int kSteps = 6;
constexpr int64_t kBatch = 2;  // sequences per micro-batch and dp rank (2 micro-batches)
// The global batch (train.batch) that gives every dp rank 2 micro-batches of kBatch.
int64_t global_batch(int dp) { return kBatch * 2 * dp; }

TEST(DataParallel, EqualsSerialForEveryZeroStage) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int dp = world.size();
  std::string dir = shared_dir(world, "serial");
  // The serial reference: one rank, dp times the batch (computed on every rank, identically).
  MemoryPool serial_pool;
  train::Trainer serial(config(global_batch(dp), 0, dir + "_s" + std::to_string(world.rank()), 4),
                        serial_pool);
  serial.init_fresh();
  std::vector<double> serial_losses;
  for (int i = 0; i < kSteps; ++i) serial_losses.push_back(serial.train_step().loss);

  for (int64_t zero : {0, 1, 2, 3}) {
    // Small buckets: several reductions overlap the backward.
    MemoryPool pool;
    train::Trainer t(config(global_batch(world.size()), zero, dir, 0.05), pool, &world);
    t.init_fresh();
    for (int i = 0; i < kSteps; ++i) {
      double loss = t.train_step().loss;
      // Only the summation order differs (per-rank partial sums, then the all-reduce): f32
      // rounding of ~1e-7 relative per sum, compounded over a few steps of training.
      EXPECT_NEAR(loss, serial_losses[size_t(i)], 1e-5 * serial_losses[size_t(i)])
          << "zero " << zero << " step " << i + 1;
    }
    const int64_t n = t.executor().chunk(0).total();
    std::vector<float> mine = t.full_weights(), other(mine);
    EXPECT_LT(relative_l2(mine.data(), serial.full_weights().data(), n), 1e-5) << "zero " << zero;
    // Every rank holds the same weights bit for bit.
    world.broadcast(comm::BufferRef(other.data(), n, DType::f32), 0).wait();
    EXPECT_EQ(mine, other) << "zero " << zero << ": ranks diverged";
  }
}

TEST(DataParallel, SameLayoutTwiceIsBitIdentical) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  std::string dir = shared_dir(world, "twice");
  for (int64_t zero : {1, 3}) {
    std::vector<double> runs[2];
    std::vector<float> weights[2];
    for (int k = 0; k < 2; ++k) {
      MemoryPool pool;
      train::Trainer t(config(global_batch(world.size()), zero, dir, 0.05), pool, &world);
      t.init_fresh();
      for (int i = 0; i < 3; ++i) runs[k].push_back(t.train_step().loss);
      weights[k] = t.full_weights();
    }
    EXPECT_EQ(runs[0], runs[1]) << "zero " << zero;
    EXPECT_EQ(weights[0], weights[1]) << "zero " << zero;
  }
}

TEST(DataParallel, ZeroOneShardsOptimizerStateAndCountsBytes) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int w = world.size();
  std::string dir = shared_dir(world, "bytes");
  int64_t opt_bytes[2];
  for (int64_t zero : {0, 1}) {
    MemoryPool pool;
    // One bucket holding the whole gradient, so the closed form is a single all-reduce.
    train::Trainer t(config(global_batch(world.size()), zero, dir, 1024), pool, &world);
    t.init_fresh();
    opt_bytes[zero] = pool.current(MemCategory::optimizer);
    world.reset_counters();
    t.train_step();
    const int64_t N = t.executor().chunk(0).total();
    auto len = [&](int64_t total, int j) { return total / w + (j % w < total % w ? 1 : 0); };
    auto ring_all_reduce = [&](int64_t total) {
      int r = world.rank();
      return (total - len(total, r)) + (total - len(total, (r + 1) % w));
    };
    const auto& c = world.counters();
    // Gradients (f32) and the step's loss and token count (2 x f64).
    EXPECT_EQ(c[comm::CommOp::all_reduce].bytes, 4 * ring_all_reduce(N) + 8 * ring_all_reduce(2));
    EXPECT_EQ(c[comm::CommOp::all_reduce].calls, 2);
    if (zero == 1) {
      // ZeRO-1: the updated shards all-gathered in one call: (w-1) x this rank's shard.
      const int64_t shard = (N + w - 1) / w;
      int64_t mine = std::min(N, shard * (world.rank() + 1)) - std::min(N, shard * world.rank());
      EXPECT_EQ(c[comm::CommOp::all_gather].bytes, 4 * (w - 1) * mine);
      EXPECT_EQ(c[comm::CommOp::all_gather].calls, 1);
    } else {
      EXPECT_EQ(c[comm::CommOp::all_gather].calls, 0);
    }
    EXPECT_EQ(c[comm::CommOp::broadcast].calls, 0);
  }
  // m and v: the whole buffer replicated, or one ceil(N/w) shard.
  MemoryPool pool;
  const int64_t N = model::ParamLayout(config(global_batch(world.size()), 0, dir, 4).model).total();
  const int64_t shard = (N + w - 1) / w;
  EXPECT_EQ(opt_bytes[0], 8 * N);
  int64_t mine = std::min(N, shard * (world.rank() + 1)) - std::min(N, shard * world.rank());
  EXPECT_EQ(opt_bytes[1], 8 * mine);
}

// ZeRO-2 shards gradients and ZeRO-3 weights too, by the factors the pool measures; the
// reduce-scatters and all-gathers move the closed-form bytes; bf16 works through the store.
TEST(DataParallel, ZeroTwoThreeShardGradientsAndWeights) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int w = world.size();
  std::string dir = shared_dir(world, "zero23");
  for (int64_t zero : {2, 3}) {
    MemoryPool pool;
    // 8 blocks, so one unit is small against the model and the memory bounds below bite.
    train::TrainConfig cfg8 = config(global_batch(world.size()), zero, dir, 4);
    cfg8.model.n_layers = 8;
    train::Trainer t(cfg8, pool, &world);
    t.init_fresh();
    const auto& units = t.executor().chunk(0).units();
    const int tok = t.executor().chunk(0).token_unit();
    const int pos = t.executor().chunk(0).geometry().position_unit();
    const int64_t N = t.executor().chunk(0).total();
    int64_t shard = 0, padded = 0, biggest = 0, n_tok = 0, n_pos = 0;
    for (size_t i = 0; i < units.size(); ++i) {
      const auto& u = units[i];
      const int64_t len = u.end - u.begin, n = (len + w - 1) / w;
      if (int(i) == tok) n_tok = n;
      if (int(i) == pos) n_pos = n;
      shard += std::min(len, (world.rank() + 1) * n) - std::min(len, world.rank() * n);
      padded += n;
      biggest = std::max(biggest, n * w);
    }
    // Optimizer: m and v of this rank's pieces; gradients: one accumulator of the same size.
    EXPECT_EQ(pool.current(MemCategory::optimizer), 8 * shard) << "zero " << zero;
    EXPECT_EQ(pool.current(MemCategory::grads), 4 * shard) << "zero " << zero;
    EXPECT_EQ(pool.current(MemCategory::weights), 4 * (zero == 3 ? shard : N)) << "zero " << zero;
    EXPECT_LE(shard, N / w + int64_t(units.size()));
    world.reset_counters();
    pool.reset_peaks();
    t.train_step();
    // Between steps nothing gathered or in flight remains.
    EXPECT_EQ(pool.current(MemCategory::grads), 4 * shard) << "zero " << zero;
    EXPECT_EQ(pool.current(MemCategory::weights), 4 * (zero == 3 ? shard : N)) << "zero " << zero;
    if (zero == 3) {
      // Gathered units live one at a time, except the embeddings (tied head) beside the head.
      EXPECT_LE(pool.peak(MemCategory::weights), 4 * (shard + 2 * biggest));
      EXPECT_GT(pool.peak(MemCategory::weights), 4 * shard);
    }
    // Gradient peak: the accumulator, the embeddings' buffer (open from the head to the end of
    // the backward), the unit being filled and at most two reduce-scatters in flight (each with
    // its (n_u) result).
    EXPECT_LE(pool.peak(MemCategory::grads), 4 * (shard + 4 * biggest + 2 * biggest / w))
        << "zero " << zero;
    // Below a full gradient buffer once the shard is small: at dp = 2 this 8-block model's
    // in-flight units (about 4 of its 10) weigh as much as the half it saves.
    if (w >= 4) {
      EXPECT_LT(pool.peak(MemCategory::grads), 4 * N) << "zero " << zero << ": no saving";
    }
    const auto& c = world.counters();
    const int64_t M = t.plan().micro_batches;
    // Each micro-batch reduce-scatters every unit once, and the token embedding twice (the tied
    // head's contribution in the forward, the lookup's in the backward): (w-1) x n_u floats
    // sent per reduce-scatter.
    const int64_t U = int64_t(units.size());
    EXPECT_EQ(c[comm::CommOp::reduce_scatter].calls, M * (U + 1));
    EXPECT_EQ(c[comm::CommOp::reduce_scatter].bytes, M * 4 * (w - 1) * (padded + n_tok));
    // ZeRO-3 gathers every unit before its forward and again before its backward (the token
    // embedding: lookup and tied head; the position table only for the lookup, its backward
    // needs no weights), per micro-batch; ZeRO-2 gathers the updated pieces once per step.
    if (zero == 3) {
      EXPECT_EQ(c[comm::CommOp::all_gather].calls, M * (2 * U - 1));
      EXPECT_EQ(c[comm::CommOp::all_gather].bytes, M * 4 * (w - 1) * (2 * padded - n_pos));
    } else {
      EXPECT_EQ(c[comm::CommOp::all_gather].calls, U);
      EXPECT_EQ(c[comm::CommOp::all_gather].bytes, 4 * (w - 1) * padded);
    }
    EXPECT_EQ(c[comm::CommOp::all_reduce].calls, 2);  // loss and the gradient norm
  }
  // bf16 through the store equals bf16 data parallel (ZeRO-1) up to summation order.
  std::vector<double> ref, got;
  for (int64_t zero : {1, 3}) {
    MemoryPool pool;
    train::TrainConfig cfg = config(global_batch(world.size()), zero, dir, 4);
    cfg.precision = model::Precision::bf16;
    train::Trainer t(cfg, pool, &world);
    t.init_fresh();
    for (int i = 0; i < 3; ++i) (zero == 1 ? ref : got).push_back(t.train_step().loss);
  }
  for (size_t i = 0; i < ref.size(); ++i)
    // Same bf16 roundings; f32 sums in another order (reduce-scatter vs all-reduce).
    EXPECT_NEAR(got[i], ref[i], 1e-5 * ref[i]) << "bf16 step " << i + 1;
}

// Recompute composes with ZeRO-3: full recompute gathers each unit again for the re-run forward
// and computes the identical bits.
TEST(DataParallel, RecomputeComposesWithZeroThree) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  std::string dir = shared_dir(world, "zero3rc");
  std::vector<double> losses[3];
  std::vector<float> weights[3];
  int k = 0;
  for (const char* mode : {"none", "selective", "full"}) {
    MemoryPool pool;
    train::TrainConfig cfg = config(global_batch(world.size()), 3, dir, 0.05);
    cfg.parallel.recompute = mode;
    train::Trainer t(cfg, pool, &world);
    t.init_fresh();
    for (int i = 0; i < 3; ++i) losses[k].push_back(t.train_step().loss);
    weights[k++] = t.full_weights();
  }
  for (int i = 1; i < 3; ++i) {
    EXPECT_EQ(losses[i], losses[0]) << i;
    EXPECT_EQ(weights[i], weights[0]) << i;
  }
}

TEST(DataParallel, CheckpointMovesBetweenLayouts) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int dp = world.size();
  std::string dir = shared_dir(world, "ckpt");
  // Train 3 steps at (dp, zero 3), save, 3 more steps: the uninterrupted reference.
  std::vector<double> uninterrupted;
  {
    MemoryPool pool;
    train::Trainer t(config(global_batch(world.size()), 3, dir, 0.05), pool, &world);
    t.init_fresh();
    for (int i = 0; i < 3; ++i) t.train_step();
    t.save(dir + "/ckpt");
    for (int i = 0; i < 3; ++i) uninterrupted.push_back(t.train_step().loss);
  }
  // Resume at (dp, zero 0, 1, 2) and on a single rank, with the same config.
  for (int64_t zero : {0, 1, 2}) {
    MemoryPool pool;
    train::Trainer t(config(global_batch(world.size()), zero, dir, 0.05), pool, &world);
    t.resume(dir + "/ckpt");
    for (int i = 0; i < 3; ++i)
      EXPECT_NEAR(t.train_step().loss, uninterrupted[size_t(i)], 1e-5 * uninterrupted[size_t(i)])
          << "zero " << zero;
  }
  {
    MemoryPool pool;
    train::Trainer t(config(global_batch(dp), 0, dir + "_single" + std::to_string(world.rank()), 4), pool);
    t.resume(dir + "/ckpt");
    for (int i = 0; i < 3; ++i)
      EXPECT_NEAR(t.train_step().loss, uninterrupted[size_t(i)], 1e-5 * uninterrupted[size_t(i)]);
  }
  world.barrier().wait();
  if (world.rank() == 0) fs::remove_all(dir);
  fs::remove_all(dir + "_single" + std::to_string(world.rank()));
}

}  // namespace
