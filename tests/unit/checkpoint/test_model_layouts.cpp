// tests/unit/checkpoint/test_model_layouts.cpp: the model's own tensors through sharded
// checkpoints, as the training executor will save them: pieces described from model::ParamSpec
// (tp slices) and cut into ZeRO shares, loaded back through the pre-sharding CheckpointReader at
// other tp sizes. Also: saving copies no tensor (peak RSS), and a flat checkpoint directory can
// become a directory of checkpoints.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <deque>

#include "interop/model_checkpoint.h"
#include "checkpoint/sharded.h"
#include "core/error.h"
#include "model/config.h"
#include "model/params.h"
#include "unit/checkpoint/ck_helpers.h"

namespace loom::checkpoint::test {
using namespace loom::interop;  // the model-aware API moved to interop/
namespace {

model::ModelConfig tiny_model() {
  model::ModelConfig c;
  c.vocab = 16;
  c.n_layers = 2;
  c.d_model = 8;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.d_ff = 16;
  c.max_seq = 8;
  c.query_layer = true;
  return c;
}

// What the executor will do: for tp rank t and dp rank d of (tp x dp), each tensor's local
// slice cut into dp ZeRO shares; replicated tensors saved by tp rank 0 only.
PieceSpec piece_of(const model::ParamSpec& s, int64_t lo, int64_t hi) {
  PieceSpec p;
  p.name = s.name;
  p.global_shape = s.global_shape;
  p.shard_dim = s.shard_dim;
  p.shard_start = s.shard_start;
  p.shard_len = s.shard_dim >= 0 ? s.shape[size_t(s.shard_dim)] : 0;
  p.lo = lo;
  p.hi = hi;
  return p;
}

TEST(ModelLayouts, SavedAtTp2Zero2LoadsAtTp1AndTp2) {
  fs::path dir = temp_dir("model_tp");
  const model::ModelConfig cfg = tiny_model();
  const uint64_t seed = 7;
  const int tp = 2, dp = 2;
  std::deque<std::vector<float>> bufs;
  ShardedWriter w(dir.string(), nullptr);
  for (int t = 0; t < tp; ++t) {
    model::ParamLayout layout(cfg, {t, tp});
    bufs.emplace_back(size_t(layout.total()));
    std::vector<float>& weights = bufs.back();  // (layout.total()) this tp rank's shards
    model::init_params(layout, cfg, weights.data(), seed);
    bufs.emplace_back(weights.size());
    std::vector<float>& m = bufs.back();
    for (size_t i = 0; i < m.size(); ++i) m[i] = weights[i] * 0.5f;
    for (int d = 0; d < dp; ++d)
      for (const model::ParamSpec& s : layout.specs()) {
        if (s.replicated() && t != 0) continue;
        const int64_t lo = s.numel * d / dp, hi = s.numel * (d + 1) / dp;
        w.add("weights", piece_of(s, lo, hi), weights.data() + s.offset + lo);
        w.add("m", piece_of(s, lo, hi), m.data() + s.offset + lo);
        w.add("v", piece_of(s, lo, hi), m.data() + s.offset + lo);
      }
  }
  w.commit(cfg.to_toml(), {{"step", 3}, {"optimizer_step", 3}});

  CheckpointReader r(dir.string());
  r.expect_config(cfg);
  for (int t_load : {1, 2}) {
    for (int rank = 0; rank < t_load; ++rank) {
      model::ParamLayout layout(cfg, {rank, t_load});
      std::vector<float> expect(size_t(layout.total())), got(expect.size()), m(expect.size()),
          v(expect.size());
      model::init_params(layout, cfg, expect.data(), seed);
      r.load_weights(layout, got.data());
      EXPECT_TRUE(same_bits(got, expect)) << "tp " << t_load << " rank " << rank;
      EXPECT_EQ(r.load_optimizer(layout, m.data(), v.data()), 3);
      for (float& x : expect) x *= 0.5f;
      EXPECT_TRUE(same_bits(m, expect) && same_bits(v, expect));
      // A ZeRO-style sub-range, packed.
      const int64_t b = layout.total() / 3, e = 2 * layout.total() / 3;
      std::vector<float> part(size_t(e - b));
      r.load_weights_packed(layout, part.data(), b, e);
      model::init_params_range(layout, cfg, expect.data(), b, e, seed);
      expect.resize(size_t(e - b));
      EXPECT_TRUE(same_bits(part, expect));
    }
  }
  fs::remove_all(dir);
}

TEST(ModelLayouts, AFlatCheckpointDirectoryBecomesADirectoryOfCheckpoints) {
  fs::path dir = temp_dir("flat_then_versioned");
  const model::ModelConfig cfg = tiny_model();
  model::ParamLayout layout(cfg);
  std::vector<float> w(size_t(layout.total()));
  model::init_params(layout, cfg, w.data(), 1);
  save_checkpoint(dir.string(), cfg, layout, w.data(), {}, {{"step", 1}});
  EXPECT_EQ(CheckpointReader(dir.string()).trainer_state()["step"], 1);
  // The run resumes and saves sharded into the same directory.
  model::init_params(layout, cfg, w.data(), 2);
  ShardedWriter sw(dir.string(), nullptr);
  for (const model::ParamSpec& s : layout.specs())
    sw.add("weights", piece_of(s, 0, s.numel), w.data() + s.offset);
  sw.commit(cfg.to_toml(), {{"step", 2}});
  CheckpointReader r(dir.string());
  EXPECT_EQ(r.trainer_state()["step"], 2);
  std::vector<float> got(w.size());
  r.load_weights(layout, got.data());
  EXPECT_TRUE(same_bits(got, w));
  EXPECT_FALSE(r.has_optimizer());
  fs::remove_all(dir);
}

// Peak RSS of a child that saves 128 MiB of tensors (four of 32 MiB, 2000 small ones) grows by
// the writer's fixed buffer and bookkeeping only (about 11 MiB measured), not by a copy of any
// tensor (>= 32 MiB).
TEST(ModelLayouts, SavingCopiesNoTensor) {
  fs::path dir = temp_dir("rss");
  std::fflush(stdout);
  pid_t pid = ::fork();
  if (pid == 0) {
    const int64_t n = int64_t(32) << 20;  // 128 MiB of f32
    std::vector<float> data(size_t(n), 1.5f);
    for (size_t i = 0; i < data.size(); i += 1024) data[i] = float(i);
    struct rusage before, after;
    ::getrusage(RUSAGE_SELF, &before);
    ShardedWriter w(dir.string(), nullptr);
    // Big tensors (written straight from this memory) and many small ones (buffered).
    for (int k = 0; k < 4; ++k) {
      PieceSpec p = whole_tensor("big." + std::to_string(k), {n / 8, 2});
      w.add("weights", p, data.data() + k * (n / 4));
    }
    for (int k = 0; k < 2000; ++k)
      w.add("m", whole_tensor("small." + std::to_string(k), {7}), data.data() + k * 7);
    w.commit("", {{"step", 1}});
    ::getrusage(RUSAGE_SELF, &after);
    const long grew_kib = after.ru_maxrss - before.ru_maxrss;
    std::fprintf(stderr, "save of 128 MiB grew peak RSS by %ld KiB\n", grew_kib);
    ::_exit(grew_kib < 24 * 1024 ? 0 : 1);  // 4 MiB buffer + index + OpenSSL + slack
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "peak RSS grew by more than 24 MiB while saving 128 MiB (status " << status << ")";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loom::checkpoint::test
