// Tests for core/: Philox known-answer vectors, layout independence of the RNG, memory pool
// accounting, tensor views, bf16 rounding and error messages.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "core/memory_pool.h"
#include "core/rng.h"
#include "core/tensor.h"

using namespace loom;

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors):
// counter 0 / key 0 and counter all-ones / key all-ones.
TEST(Rng, PhiloxKnownAnswers) {
  auto a = philox4x32(0, 0, 0);
  EXPECT_EQ(a[0], 0x6627e8d5u);
  EXPECT_EQ(a[1], 0xe169c58du);
  EXPECT_EQ(a[2], 0xbc57ac4cu);
  EXPECT_EQ(a[3], 0x9b00dbd8u);
  auto b = philox4x32(~0ull, ~0ull, ~0ull);
  EXPECT_EQ(b[0], 0x408f276du);
  EXPECT_EQ(b[1], 0x41c83b0eu);
  EXPECT_EQ(b[2], 0xa20bc7c6u);
  EXPECT_EQ(b[3], 0x6d5451fdu);
}

TEST(Rng, ShardsDrawTheSameLogicalValues) {
  // A weight of 1000 elements filled at once equals the same weight filled as 3 uneven shards.
  std::vector<float> whole(1000), parts(1000);
  rng_fill_normal(whole.data(), 1000, 0.f, 0.02f, 42, 7, 0);
  rng_fill_normal(parts.data(), 333, 0.f, 0.02f, 42, 7, 0);
  rng_fill_normal(parts.data() + 333, 500, 0.f, 0.02f, 42, 7, 333);
  rng_fill_normal(parts.data() + 833, 167, 0.f, 0.02f, 42, 7, 833);
  EXPECT_EQ(whole, parts);
  // Moments of 1e5 normals: mean within 5 sigma of 0 (sigma = 1/sqrt(n)), variance near 1.
  const int n = 100000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    double v = rng_normal(1, 2, i);
    s += v;
    s2 += v * v;
  }
  EXPECT_LT(std::abs(s / n), 5.0 / std::sqrt(double(n)));
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
  EXPECT_NE(rng_u64(1, 2, 3), rng_u64(1, 3, 3));
}

TEST(MemoryPool, CountsCurrentAndPeakPerCategory) {
  MemoryPool pool;
  {
    Tensor w = Tensor::empty({10, 10}, DType::f32, pool, MemCategory::weights);
    EXPECT_EQ(pool.current(MemCategory::weights), 400);
    {
      Tensor a = Tensor::empty({100}, DType::bf16, pool, MemCategory::activations);
      Tensor v = a.view(10, {5, 2});  // views share storage: no new bytes
      EXPECT_EQ(pool.current(MemCategory::activations), 200);
      EXPECT_EQ(v.numel(), 10);
      EXPECT_EQ(static_cast<char*>(v.raw()) - static_cast<char*>(a.raw()), 20);
    }
    EXPECT_EQ(pool.current(MemCategory::activations), 0);
    EXPECT_EQ(pool.peak(MemCategory::activations), 200);
    EXPECT_EQ(pool.peak_total(), 600);
    pool.reset_peaks();
    EXPECT_EQ(pool.peak(MemCategory::activations), 0);
  }
  EXPECT_EQ(pool.current_total(), 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.allocate(0, MemCategory::comm)) % 64, 0u);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f).bits, 0x3f80);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.00390625f).bits, 0x3f80);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: ties to even (1+2^-6).
  EXPECT_EQ(f32_to_bf16(1.01171875f).bits, 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
  EXPECT_EQ(dtype_from_name("BF16"), DType::bf16);
  EXPECT_THROW(dtype_from_name("F16"), Error);
}

TEST(Error, CheckNamesValues) {
  try {
    int tp = 3, heads = 32;
    LOOM_CHECK(heads % tp == 0, "tp={} must divide n_heads={}", tp, heads);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tp=3 must divide n_heads=32"), std::string::npos);
  }
  EXPECT_THROW(LOOM_ASSERT(1 == 2, "x"), InternalError);
}
