// Training-window streams: determinism, exact resume, disjoint dp ranks covering the epoch,
// the synthetic Markov chain, and clear errors.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/error.h"
#include "data/shard.h"
#include "data/token_stream.h"
#include "sample_corpus.h"

namespace loom::data {
namespace {

std::vector<int32_t> take(TokenStream& s, int64_t B, int64_t T, std::vector<int32_t>* langs = nullptr) {
  std::vector<int32_t> out(static_cast<size_t>(B * (T + 1)));
  std::vector<int32_t> l(static_cast<size_t>(B));
  s.next_batch(out.data(), l.data(), B, T);
  if (langs) *langs = l;
  return out;
}

// Train shards whose token at global position p is p + 1, so a window's first token tells
// where it came from; documents of 50 tokens with language (doc % 3).
void write_shards(const std::string& dir, int64_t tokens_per_shard, int shards) {
  int64_t p = 0;
  for (int s = 0; s < shards; ++s) {
    ShardWriter w(5000, 2);
    std::vector<int32_t> doc;
    int64_t doc_index = 0;
    for (int64_t i = 0; i < tokens_per_shard; ++i, ++p) {
      doc.push_back(int32_t(p) + 1);
      if (doc.size() == 50 || i + 1 == tokens_per_shard) {
        w.add_document(doc, int32_t(doc_index++ % 3));
        doc.clear();
      }
    }
    w.write(fmt::format("{}/train_{:05d}.bin", dir, s));
  }
  testing::write_meta_for_shards(dir, 5000);
}

TEST(PermuteIndex, IsABijection) {
  for (uint64_t n : {1ull, 2ull, 3ull, 7ull, 64ull, 65ull, 1000ull, 12345ull}) {
    std::set<uint64_t> seen;
    for (uint64_t i = 0; i < n; ++i) seen.insert(permute_index(i, n, 42, 3));
    EXPECT_EQ(seen.size(), n);
    EXPECT_LT(*seen.rbegin(), n);
  }
  // Different epochs give different orders.
  int same = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += permute_index(i, 1000, 42, 0) == permute_index(i, 1000, 42, 1);
  EXPECT_LT(same, 50);
}

TEST(SyntheticStream, DeterministicAndResumable) {
  auto a = make_synthetic_stream(64, 5, 0, 1), b = make_synthetic_stream(64, 5, 0, 1);
  EXPECT_EQ(take(*a, 4, 16), take(*b, 4, 16));
  const auto state = a->state();
  const auto next = take(*a, 4, 16);
  auto c = make_synthetic_stream(64, 5, 0, 1);
  c->restore(state);
  EXPECT_EQ(take(*c, 4, 16), next);
  auto other_seed = make_synthetic_stream(64, 6, 0, 1);
  EXPECT_THROW(other_seed->restore(state), Error);
}

TEST(SyntheticStream, RanksAreDisjointAndChainIsLearnable) {
  const int64_t V = 256, T = 63;
  auto r0 = make_synthetic_stream(V, 9, 0, 2), r1 = make_synthetic_stream(V, 9, 1, 2);
  auto whole = make_synthetic_stream(V, 9, 0, 1);
  // The dp=1 stream's windows 0,1,2,3 = rank0's 0,1 and rank1's 0,1, interleaved.
  const auto w = take(*whole, 4, T), a = take(*r0, 2, T), b = take(*r1, 2, T);
  const size_t row = size_t(T + 1);
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + row, w.begin()));
  EXPECT_TRUE(std::equal(b.begin(), b.begin() + row, w.begin() + row));
  EXPECT_TRUE(std::equal(a.begin() + row, a.end(), w.begin() + 2 * row));
  EXPECT_NE(a, b);
  // Empirical conditional entropy H(next | prev) is near the chain's 1.09 nats, far below
  // log(256) = 5.55. The bound 1.5 leaves room for estimation noise over ~64k transitions and
  // for successor collisions (two of a token's 4 successors equal lowers, not raises, entropy).
  std::map<std::pair<int32_t, int32_t>, double> pair_count;
  std::map<int32_t, double> prev_count;
  auto s = make_synthetic_stream(V, 9, 0, 1);
  for (int k = 0; k < 64; ++k) {
    const auto x = take(*s, 16, T);
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t t = 0; t < T; ++t) {
        const int32_t p = x[size_t(r * (T + 1) + t)], n = x[size_t(r * (T + 1) + t + 1)];
        ASSERT_TRUE(p >= 0 && p < V && n >= 0 && n < V);
        pair_count[{p, n}] += 1;
        prev_count[p] += 1;
      }
  }
  double total = 0, h = 0;
  for (auto& [k, c] : prev_count) total += c;
  for (auto& [k, c] : pair_count) h -= c / total * std::log(c / prev_count[k.first]);
  EXPECT_LT(h, 1.5);
}

class ShardStreamTest : public ::testing::Test {
 protected:
  void SetUp() override { write_shards(dir_.path(), 1000, 2); }
  testing::ScratchDir dir_{"stream"};
};

TEST_F(ShardStreamTest, DeterministicWithLanguages) {
  auto a = open_shard_stream(dir_.path(), "train", 3, 0, 1);
  auto b = open_shard_stream(dir_.path(), "train", 3, 0, 1);
  EXPECT_EQ(a->vocab_size(), 5000);
  std::vector<int32_t> la, lb;
  const int64_t T = 32;
  const auto x = take(*a, 8, T, &la), y = take(*b, 8, T, &lb);
  EXPECT_EQ(x, y);
  EXPECT_EQ(la, lb);
  for (int64_t r = 0; r < 8; ++r) {
    // Windows are consecutive tokens of the data: token values step by 1 (mod 997).
    const int32_t first = x[size_t(r * (T + 1))];
    for (int64_t t = 1; t <= T; ++t)
      EXPECT_EQ(x[size_t(r * (T + 1) + t)], first + t);
    // Global position p = first - 1; its document is (p mod 1000) / 50 in its shard.
    const int64_t in_shard = (first - 1) % 1000;
    EXPECT_EQ(la[size_t(r)], int32_t((in_shard / 50) % 3));
  }
  auto other = open_shard_stream(dir_.path(), "train", 4, 0, 1);
  EXPECT_NE(take(*other, 8, T), x);  // another seed, another order
}

TEST_F(ShardStreamTest, ExactResumeAcrossEpochs) {
  const int64_t B = 5, T = 40;  // 2 x 24 windows per epoch: several epochs in 30 batches
  auto a = open_shard_stream(dir_.path(), "train", 11, 0, 1);
  for (int k = 0; k < 7; ++k) take(*a, B, T);
  const auto state = a->state();
  std::vector<std::vector<int32_t>> expect;
  for (int k = 0; k < 23; ++k) expect.push_back(take(*a, B, T));
  auto b = open_shard_stream(dir_.path(), "train", 11, 0, 1);
  b->restore(nlohmann::json::parse(state.dump()));  // through text, as a checkpoint stores it
  for (int k = 0; k < 23; ++k) ASSERT_EQ(take(*b, B, T), expect[size_t(k)]) << "batch " << k;
  EXPECT_GE(a->state().at("epoch").get<int>(), 2);
}

TEST_F(ShardStreamTest, RanksAreDisjointAndCoverTheEpoch) {
  const int64_t T = 40;  // 24 windows per shard, 48 in all
  const int dp = 3;
  std::vector<std::unique_ptr<TokenStream>> ranks;
  for (int r = 0; r < dp; ++r) ranks.push_back(open_shard_stream(dir_.path(), "train", 2, r, dp));
  std::multiset<int32_t> firsts;
  for (int step = 0; step < 4; ++step)  // 4 steps x 4 windows x 3 ranks = 48 = one epoch
    for (auto& s : ranks) {
      const auto x = take(*s, 4, T);
      for (int64_t b = 0; b < 4; ++b) firsts.insert(x[size_t(b * (T + 1))]);
    }
  std::multiset<int32_t> all;  // the first token of every window: shard s, start w*T
  for (int s = 0; s < 2; ++s)
    for (int w = 0; w < 24; ++w) all.insert(int32_t(s * 1000 + w * T) + 1);
  EXPECT_EQ(firsts, all);
  // Every rank reports the same group-global state, and it is the next epoch's start.
  EXPECT_EQ(ranks[0]->state(), ranks[2]->state());
}

TEST_F(ShardStreamTest, IncompatibleRestoreAndBadUseAreErrors) {
  auto a = open_shard_stream(dir_.path(), "train", 1, 0, 1);
  take(*a, 2, 16);
  const auto state = a->state();
  auto other_seed = open_shard_stream(dir_.path(), "train", 2, 0, 1);
  EXPECT_THROW(other_seed->restore(state), Error);
  EXPECT_THROW(take(*a, 2, 17), Error);  // T changed
  EXPECT_THROW(a->restore(make_synthetic_stream(10, 1, 0, 1)->state()), Error);
  EXPECT_THROW(open_shard_stream(dir_.path(), "train", 1, 2, 2), Error);  // rank >= size
  EXPECT_THROW(open_shard_stream(dir_.path(), "test", 1, 0, 1), Error);
}

// Trainer state is a file a user can edit: every value is range-checked, named by its key.
TEST_F(ShardStreamTest, RestoreRejectsOutOfRangeState) {
  auto a = open_shard_stream(dir_.path(), "train", 1, 0, 1);
  take(*a, 2, 16);
  const auto good = a->state();
  auto expect_bad = [&](const char* key, nlohmann::json value, const std::string& what) {
    auto s = good;
    s[key] = value;
    auto b = open_shard_stream(dir_.path(), "train", 1, 0, 1);
    try {
      b->restore(s);
      FAIL() << key << "=" << value.dump() << " accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("key '") + key + "'"), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
  };
  expect_bad("position", -5, "must be a non-negative integer, found -5");
  expect_bad("position", 1e18, "must be a non-negative integer");  // a float in JSON
  expect_bad("position", uint64_t(1000000000000000000ull), "outside [0, ");
  expect_bad("position", "3", "must be a non-negative integer, found \"3\"");
  expect_bad("epoch", -1, "must be a non-negative integer");
  expect_bad("T", -16, "must be a non-negative integer");
  // The good state still restores.
  auto c = open_shard_stream(dir_.path(), "train", 1, 0, 1);
  c->restore(good);
  EXPECT_EQ(take(*c, 2, 16), take(*a, 2, 16));
}

class DataMetaTest : public ShardStreamTest {
 protected:
  void write_meta(const std::string& text) {
    std::ofstream(dir_.path() + "/meta.json") << text;
  }
  void expect_open_fails(const std::string& what) {
    try {
      open_shard_stream(dir_.path(), "train", 1, 0, 1);
      FAIL() << "opened with bad meta.json, expected: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  }
};

TEST_F(DataMetaTest, MissingGarbageOrEscapingMetaIsRejected) {
  const std::string meta_path = dir_.path() + "/meta.json";
  std::filesystem::remove(meta_path);
  expect_open_fails("meta.json' is missing");
  write_meta("this is not json");
  expect_open_fails("meta.json' is not valid JSON");
  write_meta("[1, 2]");
  expect_open_fails("must hold a JSON object");
  write_meta(R"({"format": "loom-token-shards", "shard_version": 1, "vocab_size": 5000,
                 "shards": {"train": [{"file": "../../../../etc/passwd"}]}})");
  expect_open_fails("key 'shards.train[0].file': '../../../../etc/passwd' contains '..'");
  write_meta(R"({"format": "loom-token-shards", "shard_version": 1, "vocab_size": 5000,
                 "shards": {"train": [{"file": "/etc/passwd"}]}})");
  expect_open_fails("must be a non-empty path relative to the data directory");
  write_meta(R"({"format": "loom-token-shards", "shard_version": 1, "vocab_size": 5000,
                 "tokenizer_dir": "../x", "shards": {}})");
  expect_open_fails("key 'tokenizer_dir'");
  write_meta(R"({"format": "loom-token-shards", "shard_version": "1", "vocab_size": 5000,
                 "shards": {}})");
  expect_open_fails("key 'shard_version' must be an integer, found \"1\"");
  // A symlink inside the directory that leads out of it.
  std::filesystem::create_directory_symlink("/etc", dir_.path() + "/link");
  write_meta(R"({"format": "loom-token-shards", "shard_version": 1, "vocab_size": 5000,
                 "shards": {"train": [{"file": "link/passwd"}]}})");
  expect_open_fails("outside the data directory");
}

TEST_F(DataMetaTest, StrayOrMissingShardIsRejected) {
  // Listed but absent.
  testing::write_meta_for_shards(dir_.path(), 5000);
  std::filesystem::rename(dir_.path() + "/train_00001.bin", dir_.path() + "/elsewhere.bin");
  expect_open_fails("lists train shard 'train_00001.bin'");
  // On disk but not listed.
  testing::write_meta_for_shards(dir_.path(), 5000);
  std::filesystem::rename(dir_.path() + "/elsewhere.bin", dir_.path() + "/train_00001.bin");
  expect_open_fails("is not listed in");
  // Wrong vocab in meta.
  testing::write_meta_for_shards(dir_.path(), 4000);
  expect_open_fails("says vocab_size 4000");
}

TEST(ShardStreamErrors, DirectoryWithoutShards) {
  testing::ScratchDir dir("noshards");
  try {
    open_shard_stream(dir.path(), "train", 1, 0, 1);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no 'train_*.bin' shards"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(open_shard_stream(dir.path() + "/missing", "train", 1, 0, 1), Error);
}

}  // namespace
}  // namespace loom::data
