// tests/dist/checkpoint/test_sharded_dist.cpp: ShardedWriter as a collective. Each rank writes
// only its own pieces (tp slices and ZeRO ranges dealt out over the ranks); every rank reads the
// checkpoint back at other layouts bit-exactly; an error on one rank fails the save on every
// rank, naming that rank and its file, and leaves the previous checkpoint and no temporary.
#include <gtest/gtest.h>

#include <cstdlib>
#include <deque>
#include <set>

#include "checkpoint/commit.h"
#include "checkpoint/sharded.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "unit/checkpoint/ck_helpers.h"

namespace loom::checkpoint::test {
namespace {

comm::ProcessGroup world() {
  static comm::ProcessGroup w = [] {
    comm::GroupOptions o;
    o.timeout_s = 30;  // fail in seconds, not the 300 s default, if something hangs
    return comm::ProcessGroup::world(o);
  }();
  return w;
}

const char* kKinds[] = {"weights", "m", "v"};

// The same directory on every rank (rank 0's pid names it).
fs::path shared_dir(const std::string& name) {
  int64_t pid = ::getpid();
  world().broadcast(comm::BufferRef(&pid, 1, DType::i64), 0).wait();
  fs::path p = fs::temp_directory_path() / ("loom_ckd_" + name + "_" + std::to_string(pid));
  if (world().rank() == 0) fs::remove_all(p);
  world().barrier().wait();
  return p;
}

// Piece j of `layout` goes to rank j % w.
CommitResult save_dealt(const fs::path& dir, const std::string& layout, int version,
                        bool duplicate = false) {
  const comm::ProcessGroup g = world();
  std::deque<std::vector<float>> bufs;
  ShardedWriter w(dir.string(), &g);
  for (const char* kind : kKinds)
    for (const TestTensor& t : test_tensors()) {
      std::vector<float> full = logical_values(version, kind, t);
      std::vector<PieceSpec> pieces = layout_pieces(layout, t);
      for (size_t j = 0; j < pieces.size(); ++j)
        if (int(j % size_t(g.size())) == g.rank() || (duplicate && j == 0)) {
          bufs.push_back(reference_slice(pieces[j], full));
          w.add(kind, pieces[j], bufs.back().data());
        }
    }
  return w.commit("model = \"dist\"\n", {{"step", version}, {"version", version}});
}

void expect_reads_as(const fs::path& dir, int version) {
  ShardedReader r(dir.string());
  EXPECT_EQ(r.trainer_state()["version"].get<int>(), version);
  for (const char* layout : {"whole", "rows:3:2", "cols:2:1", "flat:4"})
    for (const char* kind : kKinds)
      for (const TestTensor& t : test_tensors())
        for (const PieceSpec& p : layout_pieces(layout, t)) {
          std::vector<float> got(size_t(p.hi - p.lo));
          r.read(kind, p, got.data());
          ASSERT_TRUE(same_bits(got, reference_slice(p, logical_values(version, kind, t))))
              << kind << " " << t.name << " read as " << layout;
        }
}

TEST(ShardedDist, EachRankWritesItsPiecesAndAnyLayoutReadsThem) {
  const int w = world().size();
  fs::path dir = shared_dir("roundtrip");
  CommitResult a = save_dealt(dir, "rows:2:2", 1);
  EXPECT_EQ(a.dir, (dir / "step-00000001").string());
  EXPECT_TRUE(fs::exists(fs::path(a.dir) / fmt::format("shard-{:05d}-of-{:05d}.safetensors",
                                                        world().rank(), w)));
  expect_reads_as(dir, 1);
  save_dealt(dir, "cols:2:3", 2);
  expect_reads_as(dir, 2);
  world().barrier().wait();
  if (world().rank() == 0) fs::remove_all(dir);
}

TEST(ShardedDist, AnErrorOnOneRankFailsTheSaveOnEveryRank) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  fs::path dir = shared_dir("fail");
  save_dealt(dir, "rows:2:2", 1);
  // Rank 1's second step (the first write(2) of its shard) fails as a full disk would.
  ::setenv("LOOM_CKPT_FAIL_AT", "1:2", 1);
  std::string err;
  try {
    save_dealt(dir, "rows:2:2", 2);
  } catch (const Error& e) {
    err = e.what();
  }
  ::unsetenv("LOOM_CKPT_FAIL_AT");
  EXPECT_NE(err.find("[rank 1/"), std::string::npos) << err;
  EXPECT_NE(err.find(fmt::format("shard-00001-of-{:05d}.safetensors", world().size())),
            std::string::npos) << err;
  EXPECT_NE(err.find("No space left on device"), std::string::npos) << err;
  expect_reads_as(dir, 1);
  // Pieces saved twice (by rank 0 and by the rank that owns them) are refused on every rank.
  err.clear();
  try {
    save_dealt(dir, "rows:2:2", 3, /*duplicate=*/true);
  } catch (const Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("saved twice, by rank 0"), std::string::npos) << err;
  expect_reads_as(dir, 1);
  world().barrier().wait();
  if (world().rank() == 0) {
    std::set<std::string> names;
    for (auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
    EXPECT_EQ(names, (std::set<std::string>{"latest", "step-00000001"}));
    fs::remove_all(dir);
  }
}

}  // namespace
}  // namespace loom::checkpoint::test
