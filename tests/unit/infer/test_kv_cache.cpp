// Tests for infer/kv_cache.h: sizing from a byte budget, allocation, release, exhaustion and the
// placement of rows in blocks.
#include <gtest/gtest.h>

#include <set>

#include "core/error.h"
#include "infer/kv_cache.h"

namespace loom::infer {
namespace {

KvCacheShape shape() { return KvCacheShape{3, 2, 4, 16}; }  // L'=3, NKV=2, HD=4, BT=16

TEST(KvCache, SizesFromBudgetAndRefusesWhenOneSequenceCannotFit) {
  const int64_t bb = shape().block_bytes();
  EXPECT_EQ(bb, 2 * 3 * 16 * 8 * 4);
  KvCache c(shape(), 10 * bb + bb / 2, 64);
  EXPECT_EQ(c.num_blocks(), 10);
  EXPECT_EQ(c.free_blocks(), 10);
  // 65 tokens need 5 blocks: a 4-block budget must be refused with the bytes it needs.
  try {
    KvCache small(shape(), 4 * bb, 65);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(5 * bb)), std::string::npos) << e.what();
  }
}

TEST(KvCache, ReserveReleaseAndExhaustion) {
  const int64_t bb = shape().block_bytes();
  KvCache c(shape(), 6 * bb, 32);
  const int64_t a = c.create(), b = c.create();
  EXPECT_TRUE(c.reserve(a, 17));  // 2 blocks
  EXPECT_EQ(c.capacity(a), 32);
  EXPECT_TRUE(c.reserve(a, 20));  // already enough: no change
  EXPECT_EQ(c.free_blocks(), 4);
  EXPECT_TRUE(c.reserve(b, 48));  // 3 blocks
  EXPECT_EQ(c.free_blocks(), 1);
  EXPECT_FALSE(c.reserve(b, 80));  // needs 2 more, 1 free: nothing changes
  EXPECT_EQ(c.capacity(b), 48);
  EXPECT_EQ(c.free_blocks(), 1);
  // Different sequences never share a block.
  std::set<int32_t> used;
  for (int32_t p : c.block_table(a)) EXPECT_TRUE(used.insert(p).second);
  for (int32_t p : c.block_table(b)) EXPECT_TRUE(used.insert(p).second);
  c.release(a);
  EXPECT_EQ(c.free_blocks(), 3);
  EXPECT_TRUE(c.reserve(b, 80));
  EXPECT_EQ(c.free_blocks(), 1);
  c.release(b);
  c.release(b);  // unknown now: a no-op
  EXPECT_EQ(c.free_blocks(), 6);
  EXPECT_THROW(c.reserve(a, 1), Error);  // released id
}

TEST(KvCache, RowsLiveInTheirBlockAtTheDocumentedOffsets) {
  const int64_t bb = shape().block_bytes();
  KvCache c(shape(), 4 * bb, 32);
  const int64_t a = c.create(), b = c.create();
  ASSERT_TRUE(c.reserve(a, 20));
  ASSERT_TRUE(c.reserve(b, 5));
  const int64_t KV = 8, BT = 16;
  for (int64_t layer = 0; layer < 3; ++layer)
    for (int64_t pos : {0, 15, 16, 19}) {
      float* k = c.k_row(a, layer, pos);
      float* v = c.v_row(a, layer, pos);
      const int64_t block = c.block_table(a)[size_t(pos / BT)];
      EXPECT_EQ(k - c.pool(), block * c.block_floats() + c.k_offset(layer) + (pos % BT) * KV);
      EXPECT_EQ(v - c.pool(), block * c.block_floats() + c.v_offset(layer) + (pos % BT) * KV);
    }
  // Writing one sequence's rows never touches the other's.
  for (int64_t pos = 0; pos < 20; ++pos) c.k_row(a, 1, pos)[0] = 1.f;
  for (int64_t pos = 0; pos < 5; ++pos) EXPECT_EQ(c.k_row(b, 1, pos)[0], 0.f);
}

}  // namespace
}  // namespace loom::infer
