// Tests for core/: Philox known-answer vectors, layout independence of the RNG, memory pool
// accounting, tensor views, bf16 rounding and error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <omp.h>
#include <sys/resource.h>
#include <vector>

#include "core/aligned.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/memory_pool.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "core/threads.h"

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

// AlignedVector: data() on a cache line (glibc's malloc returns page + 16 for large blocks), on a
// 2 MiB boundary from 4 MiB up, across growth and for odd element sizes.
TEST(AlignedVector, DataIsLineAlignedAndHugePageAlignedWhenLarge) {
  for (size_t n : {size_t(1), size_t(3), size_t(1000), size_t(1) << 20, size_t(5) << 20}) {
    AlignedVector<char> c(n, 'x');
    EXPECT_EQ(reinterpret_cast<uintptr_t>(c.data()) % 64, 0u) << n;
    if (n >= (size_t(4) << 20)) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(c.data()) % (2 << 20), 0u) << n;
    }
    EXPECT_EQ(c[n - 1], 'x');
  }
  AlignedVector<float> f;
  for (int i = 0; i < 100000; ++i) {
    f.push_back(float(i));
    ASSERT_EQ(reinterpret_cast<uintptr_t>(f.data()) % 64, 0u) << i;
  }
  EXPECT_EQ(f[99999], 99999.f);
  struct Odd {
    char b[3];
  };
  AlignedVector<Odd> o(7);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(o.data()) % 64, 0u);
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
  EXPECT_EQ(dtype_from_name("F16"), DType::f16);
  EXPECT_THROW(dtype_from_name("F8_E4M3"), Error);
}

// f16: every one of the 65536 bit patterns widens exactly and narrows back to itself (NaNs to a
// NaN); f32 -> f16 is the nearest f16 (ties to even) for random f32 across the whole range,
// checked against the two neighbouring f16 values computed in double; overflow, underflow and
// subnormal edges.
TEST(DType, F16RoundTripsAndRoundsToNearestEven) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), uint16_t(h)) << "pattern " << h;
    // The exact value: sign * mantissa * 2^exp from the bit fields.
    const int e = int(h >> 10 & 0x1f), m = int(h & 0x3ff);
    const double mag = e == 0 ? std::ldexp(double(m), -24)
                       : e == 31 ? INFINITY
                                 : std::ldexp(double(m + 1024), e - 25);
    ASSERT_EQ(double(f), (h & 0x8000) ? -mag : mag) << "pattern " << h;
  }
  uint64_t x = 88172645463325252ull;
  for (int i = 0; i < 200000; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    uint32_t u = uint32_t(x);
    // Exponents around f16's range (2^-27 .. 2^17) most of the time, anything otherwise.
    if (i % 4) u = (u & 0x807fffffu) | (uint32_t(100 + (x >> 40) % 45) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const uint16_t h = f32_to_f16(f);
    const double v = double(f), got = double(f16_to_f32(h));
    if (!std::isinf(got)) {
      ASSERT_LT(std::fabs(v), 65520.0) << f << " should overflow to inf";
    }
    // Neighbours of the result: no f16 value may be closer, and a tie must pick the even one.
    for (int d : {-1, 1}) {
      const uint16_t n = uint16_t(int(h & 0x7fff) + d) | (h & 0x8000);
      if ((h & 0x7fff) == 0 && d < 0) continue;
      if ((n & 0x7c00) == 0x7c00 && (n & 0x3ff)) continue;  // past inf
      const double other = double(f16_to_f32(n));
      if (std::isinf(got)) {
        ASSERT_GE(std::fabs(v), 65520.0) << f;  // overflow only at or past the rounding midpoint
        continue;
      }
      ASSERT_LE(std::fabs(got - v), std::fabs(other - v)) << f << " -> " << got;
      if (std::fabs(got - v) == std::fabs(other - v)) {
        ASSERT_EQ(h & 1, 0) << "tie to even " << f;
      }
    }
  }
  EXPECT_EQ(f32_to_f16(65504.f), 0x7bff);          // max f16
  EXPECT_EQ(f32_to_f16(65519.996f), 0x7bff);       // below the midpoint to inf
  EXPECT_EQ(f32_to_f16(65520.f), 0x7c00);          // the midpoint ties to even: inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -24)), 1);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -25)), 0);  // half of it: tie to even 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 1);
  EXPECT_EQ(f32_to_f16(-0.f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.f + std::ldexp(1.f, -11)), 0x3c00);  // tie between 1 and 1+2^-10
  EXPECT_EQ(f32_to_f16(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);
  std::vector<float> a = {0.1f, -3.f, 7e4f}, b(3);
  std::vector<uint16_t> hb(3);
  convert_f32_to_f16(a.data(), hb.data(), 3);
  convert_f16_to_f32(hb.data(), b.data(), 3);
  EXPECT_EQ(b[1], -3.f);
  EXPECT_TRUE(std::isinf(b[2]));
  EXPECT_EQ(hb[0], f32_to_f16(0.1f));
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

// release_thread_pool: after this thread has run a parallel region on every core (its workers
// stay), a second thread's team must still spin at its barriers instead of sleeping in the
// kernel at every one. With libgomp, workers beyond the cores throttle the spin to ~1000
// iterations: without the release, 2000 small regions cost ~4000 voluntary context switches
// (2 cores: 4005); with it, ~0.
TEST(Threads, ReleasedPoolDoesNotThrottleAnotherThreadsTeam) {
  for (const char* v : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
    if (std::getenv(v))
      GTEST_SKIP() << "SKIP: " << v << " is set; the test needs libgomp's default spin";
  const int cores = loom::available_cores();
  if (cores < 2) GTEST_SKIP() << "SKIP: one core: a team of two is throttled whatever the pools";
  double sink = 0;  // written with omp atomic: the threads' results only need to go somewhere
#pragma omp parallel num_threads(cores)
  {
#pragma omp atomic write
    sink = 1.0;
  }
  loom::release_thread_pool();
  auto switches = [] {
    rusage r{};
    getrusage(RUSAGE_SELF, &r);
    return r.ru_nvcsw;
  };
  const long before = switches();
  std::thread t([&] {
    for (int i = 0; i < 2000; ++i) {
#pragma omp parallel num_threads(2)
      {
        double s = 0;
        for (int k = 0; k < 2000; ++k) s += k * 1e-9;
#pragma omp atomic write
        sink = s;
      }
      double s = 0;  // a serial gap between regions, as a decode step has
      for (int k = 0; k < 20000; ++k) s += k * 1e-9;
#pragma omp atomic write
      sink = s;
    }
  });
  t.join();
  const long n = switches() - before;
  std::printf("2000 regions on a second thread: %ld voluntary context switches (%d cores)\n", n,
              cores);
  // Well under one per region; a preempted spinner on a busy machine may still sleep now and
  // then.
  EXPECT_LT(n, 400) << "the second thread's team slept at its barriers";
}
