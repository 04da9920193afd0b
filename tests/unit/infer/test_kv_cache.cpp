// Tests for infer/kv_cache.h: sizing from a byte budget, allocation, release, exhaustion and the
// placement of rows in blocks.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

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
  const int64_t KV = 8, HD = 4, BT = 16;
  EXPECT_EQ(c.head_stride(), BT * HD);  // head-major blocks (NKV, BT, HD)
  for (int64_t layer = 0; layer < 3; ++layer)
    for (int64_t pos : {0, 15, 16, 19}) {
      const int64_t block = c.block_table(a)[size_t(pos / BT)];
      EXPECT_EQ(c.slot_offset(a, layer, pos, 0),
                block * c.block_elems() + c.k_offset(layer) + (pos % BT) * HD);
      EXPECT_EQ(c.slot_offset(a, layer, pos, 1),
                block * c.block_elems() + c.v_offset(layer) + (pos % BT) * HD);
    }
  // Writing one sequence's rows never touches the other's; rows read back as written.
  std::vector<float> k(size_t(KV), 1.f), v(size_t(KV), 2.f), rk(static_cast<size_t>(KV)), rv(static_cast<size_t>(KV));
  for (int64_t pos = 0; pos < 20; ++pos) c.write_row(a, 1, pos, k.data(), v.data());
  for (int64_t pos = 0; pos < 5; ++pos) {
    c.read_row(b, 1, pos, rk.data(), rv.data());
    EXPECT_EQ(rk[0], 0.f);
    EXPECT_EQ(rv[0], 0.f);
  }
  c.read_row(a, 1, 19, rk.data(), rv.data());
  EXPECT_EQ(rk, k);
  EXPECT_EQ(rv, v);
}

// A bf16 pool: half the bytes per block, so twice the blocks in the same budget; rows are
// stored rounded to nearest even and read back exactly as rounded; other dtypes are refused.
TEST(KvCache, Bf16PoolHoldsTwiceTheBlocksAndRoundsRows) {
  KvCacheShape s16 = shape();
  s16.dtype = DType::bf16;
  EXPECT_EQ(2 * s16.block_bytes(), shape().block_bytes());
  const int64_t budget = 6 * shape().block_bytes();
  KvCache c32(shape(), budget, 32), c16(s16, budget, 32);
  EXPECT_EQ(c16.num_blocks(), 2 * c32.num_blocks());
  EXPECT_EQ(c16.pool_bytes(), budget);
  const int64_t a = c16.create();
  ASSERT_TRUE(c16.reserve(a, 3));
  const int64_t KV = 8;
  std::vector<float> k(static_cast<size_t>(KV)), v(static_cast<size_t>(KV)), rk(k), rv(v);
  for (int64_t e = 0; e < KV; ++e) {
    k[size_t(e)] = 1.f + float(e) / 3.f;  // not representable in bf16
    v[size_t(e)] = -0.1f * float(e + 1);
  }
  c16.write_row(a, 2, 1, k.data(), v.data());
  c16.read_row(a, 2, 1, rk.data(), rv.data());
  for (int64_t e = 0; e < KV; ++e) {
    EXPECT_EQ(rk[size_t(e)], bf16_to_f32(f32_to_bf16(k[size_t(e)])));
    EXPECT_EQ(rv[size_t(e)], bf16_to_f32(f32_to_bf16(v[size_t(e)])));
    EXPECT_LE(std::fabs(rk[size_t(e)] - k[size_t(e)]), std::fabs(k[size_t(e)]) / 256);  // 2^-8
  }
  KvCacheShape bad = shape();
  bad.dtype = DType::i8;
  EXPECT_THROW(KvCache(bad, budget, 32), Error);
}

}  // namespace
}  // namespace loom::infer
