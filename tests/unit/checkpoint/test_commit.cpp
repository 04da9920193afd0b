// tests/unit/checkpoint/test_commit.cpp: the commit protocol under faults. A child process is
// SIGKILLed at every protocol step of a save (LOOM_CKPT_KILL_AT); every step is made to fail as
// a full disk would (LOOM_CKPT_FAIL_AT). Each time the newest complete checkpoint must load and
// equal the old or the new one bit for bit, and a failed save must leave no temporary.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <csignal>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <set>

#include "interop/model_checkpoint.h"
#include "checkpoint/commit.h"
#include "checkpoint/sharded.h"
#include "core/error.h"
#include "model/config.h"
#include "model/params.h"
#include "unit/checkpoint/ck_helpers.h"

namespace loom::checkpoint::test {
using namespace loom::interop;  // the model-aware API moved to interop/
namespace {

const char* kKinds[] = {"weights", "m", "v"};

CommitResult save_version(const fs::path& dir, int version, WriterOptions opt = {}) {
  std::deque<std::vector<float>> bufs;
  ShardedWriter w(dir.string(), nullptr, opt);
  for (const char* kind : kKinds)
    for (const TestTensor& t : test_tensors()) {
      std::vector<float> g = logical_values(version, kind, t);
      for (const PieceSpec& p : layout_pieces("rows:2:2", t)) {
        bufs.push_back(reference_slice(p, g));
        w.add(kind, p, bufs.back().data());
      }
    }
  return w.commit("model = \"test\"\n", {{"step", version}, {"version", version}},
                  [](const std::string& staging) {
                    fs::create_directories(staging + "/tokenizer");
                    std::ofstream(staging + "/tokenizer/vocab.txt") << "a\nb\n";
                  });
}

// The checkpoint under `dir` is complete and holds `version`'s values, read at two layouts.
int loaded_version(const fs::path& dir) {
  ShardedReader r(dir.string());
  r.verify_all();
  const int v = r.trainer_state()["version"].get<int>();
  for (const char* layout : {"whole", "cols:2:3"})
    for (const char* kind : kKinds)
      for (const TestTensor& t : test_tensors())
        for (const PieceSpec& p : layout_pieces(layout, t)) {
          std::vector<float> got(size_t(p.hi - p.lo));
          r.read(kind, p, got.data());
          EXPECT_TRUE(same_bits(got, reference_slice(p, logical_values(v, kind, t))))
              << "version " << v << " " << kind << " " << t.name;
        }
  return v;
}

// Runs f in a child process with env var=value; returns its wait status.
int in_child(const char* var, const std::string& value, const std::function<void()>& f) {
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv(var, value.c_str(), 1);
    int rc = 0;
    try {
      f();
    } catch (...) {
      rc = 3;
    }
    ::_exit(rc);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

bool killed(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL; }

// Only committed checkpoints and `latest` remain (no staging, trash, latest.tmp or uncommitted
// step directory).
void expect_no_temporaries(const fs::path& dir) {
  std::vector<std::string> listed = read_latest(dir.string());
  std::set<std::string> ok(listed.begin(), listed.end());
  ok.insert("latest");
  for (auto& e : fs::directory_iterator(dir))
    EXPECT_TRUE(ok.count(e.path().filename().string())) << "left behind: " << e.path();
}

TEST(Commit, KillAtEveryStepLeavesTheOldOrTheNewCheckpoint) {
  fs::path dir = temp_dir("kill");
  save_version(dir, 1);
  const int64_t n_steps = save_version(dir, 2).steps;
  ASSERT_GE(n_steps, 10) << "a save should have at least 10 protocol steps";
  int prev = 2;
  bool seen_new = false;
  for (int64_t k = 1; k <= n_steps; ++k) {
    const int next = 100 + int(k);
    int status = in_child("LOOM_CKPT_KILL_AT", std::to_string(k), [&] { save_version(dir, next); });
    ASSERT_TRUE(killed(status)) << "step " << k << ": the child was not killed (status "
                                << status << ")";
    const int v = loaded_version(dir);
    EXPECT_TRUE(v == prev || v == next) << "step " << k << ": loaded " << v << ", expected "
                                        << prev << " or " << next;
    // One switch: once a kill at step k leaves the new checkpoint, so does every later one.
    if (seen_new) {
      EXPECT_EQ(v, next) << "step " << k;
    }
    seen_new = seen_new || (v == next && k > 1);
    prev = v;
  }
  EXPECT_TRUE(seen_new) << "no kill point left the new checkpoint: the switch is not counted";
  // Past the last step the save completes; afterwards nothing stale is left.
  int status = in_child("LOOM_CKPT_KILL_AT", std::to_string(n_steps + 1),
                        [&] { save_version(dir, 999); });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(loaded_version(dir), 999);
  save_version(dir, 1000, {.keep = 3});
  expect_no_temporaries(dir);
  EXPECT_EQ(read_latest(dir.string()).size(), 3u);
  fs::remove_all(dir);
}

TEST(Commit, FullDiskAtEveryStepLeavesThePreviousCheckpointAndNoTemporary) {
  fs::path dir = temp_dir("enospc");
  save_version(dir, 1);
  const int64_t n_steps = save_version(dir, 2).steps;
  int prev = 2;
  int committed = 0;
  for (int64_t k = 1; k <= n_steps; ++k) {
    const int next = 100 + int(k);
    ::setenv("LOOM_CKPT_FAIL_AT", std::to_string(k).c_str(), 1);
    std::string err;
    try {
      save_version(dir, next);
    } catch (const Error& e) {
      err = e.what();
    }
    ::unsetenv("LOOM_CKPT_FAIL_AT");
    const int v = loaded_version(dir);
    if (err.empty()) {
      // Only the fsync after the switch may fail without failing the save.
      EXPECT_EQ(k, n_steps) << "step " << k << " failed silently";
      EXPECT_EQ(v, next);
      ++committed;
    } else {
      EXPECT_NE(err.find("No space left on device"), std::string::npos) << err;
      EXPECT_NE(err.find(dir.string()), std::string::npos) << "the error names no file: " << err;
      EXPECT_NE(err.find("previous checkpoint is unchanged"), std::string::npos) << err;
      EXPECT_EQ(v, prev) << "step " << k << ": " << err;
    }
    expect_no_temporaries(dir);
    prev = v;
  }
  EXPECT_EQ(committed, 1);
  fs::remove_all(dir);
}

TEST(Commit, FaultVariablesAreCheckedAndRankSpecific) {
  ::setenv("LOOM_CKPT_KILL_AT", "soon", 1);
  EXPECT_THROW(ProtocolSteps(0), Error);
  ::setenv("LOOM_CKPT_KILL_AT", "1:3", 1);
  ProtocolSteps other(0);  // applies to rank 1 only
  for (int i = 0; i < 5; ++i) EXPECT_EQ(other.next("test", "x"), 0);
  ::unsetenv("LOOM_CKPT_KILL_AT");
  ::setenv("LOOM_CKPT_FAIL_AT", "0:2", 1);
  ProtocolSteps mine(0);
  EXPECT_EQ(mine.next("test", "x"), 0);
  EXPECT_EQ(mine.next("test", "x"), ENOSPC);
  ::unsetenv("LOOM_CKPT_FAIL_AT");
}

// The pre-sharding save_checkpoint (flat layout, RENAME_EXCHANGE switch) under the same faults.
model::ModelConfig tiny_model() {
  model::ModelConfig c;
  c.vocab = 16;
  c.n_layers = 1;
  c.d_model = 8;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.d_ff = 16;
  c.max_seq = 8;
  return c;
}

std::vector<float> flat_weights(const model::ParamLayout& layout, int version) {
  std::vector<float> w(size_t(layout.total()));
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(version) + float(i) * 1e-3f;
  return w;
}

void save_flat(const fs::path& dir, int version) {
  model::ModelConfig cfg = tiny_model();
  model::ParamLayout layout(cfg);
  std::vector<float> w = flat_weights(layout, version), m(w.size(), 0.5f), v(w.size(), 0.25f);
  save_checkpoint(dir.string(), cfg, layout, w.data(), {m.data(), v.data(), version},
                  {{"step", version}}, [](const std::string& staging) {
                    std::ofstream(staging + "/tokenizer.txt") << "x";
                  });
}

int flat_version(const fs::path& dir) {
  CheckpointReader r(dir.string());
  model::ParamLayout layout(tiny_model());
  const int v = r.trainer_state()["step"].get<int>();
  std::vector<float> w(size_t(layout.total())), m(w.size()), vv(w.size());
  r.load_weights(layout, w.data());
  EXPECT_EQ(r.load_optimizer(layout, m.data(), vv.data()), v);
  EXPECT_TRUE(same_bits(w, flat_weights(layout, v))) << "version " << v;
  // A tp shard reads its slice of the flat checkpoint.
  model::ParamLayout half(tiny_model(), {1, 2});
  std::vector<float> hw(size_t(half.total()));
  r.load_weights(half, hw.data());
  return v;
}

TEST(Commit, FlatSaveSurvivesAKillAtEveryStep) {
  fs::path run = temp_dir("flat");
  fs::path dir = run / "ckpt";
  save_flat(dir, 1);
  int64_t n_steps = 0;
  {
    // Kill at step 1, 2, ... until a child completes: that counts the steps of one save.
    for (int64_t k = 1; k < 200; ++k) {
      int status = in_child("LOOM_CKPT_KILL_AT", std::to_string(k), [&] { save_flat(dir, 1000 + int(k)); });
      if (!killed(status)) {
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
        n_steps = k - 1;
        break;
      }
      const int v = flat_version(dir);
      EXPECT_TRUE(v == 1 || v >= 1000) << "step " << k << ": loaded " << v;
    }
  }
  EXPECT_GE(n_steps, 10);
  // No staging sibling or old-protocol leftover survives the next save.
  fs::create_directories(run / "ckpt.tmp-999999");
  save_flat(dir, 7);
  EXPECT_EQ(flat_version(dir), 7);
  for (auto& e : fs::directory_iterator(run))
    EXPECT_EQ(e.path().filename(), "ckpt") << "left behind: " << e.path();
  // A full disk at every step: the previous checkpoint stays, nothing is left behind.
  for (int64_t k = 1; k <= n_steps; ++k) {
    ::setenv("LOOM_CKPT_FAIL_AT", std::to_string(k).c_str(), 1);
    bool threw = false;
    try {
      save_flat(dir, 8);
    } catch (const Error& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find("No space left on device"), std::string::npos);
    }
    ::unsetenv("LOOM_CKPT_FAIL_AT");
    EXPECT_EQ(flat_version(dir), threw ? 7 : 8) << "step " << k;
    if (!threw) save_flat(dir, 7);
    for (auto& e : fs::directory_iterator(run))
      EXPECT_EQ(e.path().filename(), "ckpt") << "step " << k << " left behind: " << e.path();
  }
  fs::remove_all(run);
}

TEST(Commit, FlatSaveNeverReplacesADirectoryThatIsNotACheckpoint) {
  fs::path run = temp_dir("notckpt");
  std::ofstream(run / "notes.txt") << "precious";
  try {
    save_flat(run, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exists and is not a loom checkpoint"),
              std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::exists(run / "notes.txt"));
  fs::remove_all(run);
}

TEST(Commit, OldProtocolLeftoverIsRecovered) {
  // The old save killed between its two renames left only ckpt.old-PID: it still loads, and the
  // next save replaces it.
  fs::path run = temp_dir("oldleft");
  save_flat(run / "ckpt", 3);
  fs::rename(run / "ckpt", run / "ckpt.old-4242");
  EXPECT_EQ(flat_version(run / "ckpt"), 3);
  save_flat(run / "ckpt", 4);
  EXPECT_EQ(flat_version(run / "ckpt"), 4);
  EXPECT_FALSE(fs::exists(run / "ckpt.old-4242"));
  fs::remove_all(run);
}

}  // namespace
}  // namespace loom::checkpoint::test
