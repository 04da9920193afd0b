// Tests for kernels/cpu/grad_norm.h: sum of squares vs float64, chunk boundaries, independence of
// the thread count, clip factor.
#include <gtest/gtest.h>

#include <omp.h>

#include "common/op_check.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/ref/grad_norm_ref.h"

using namespace loom;
using namespace loom::test;

TEST(KernelsGradNorm, SumSquaresMatchesFloat64) {
  const int64_t kChunk = kernels::kSumSquaresChunk;
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(5), int64_t(13), int64_t(127), kChunk - 1,
                    kChunk, kChunk + 1, 3 * kChunk + 7}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    auto x = random_normal(n, uint64_t(n) + 1);
    double ours = kernels::sum_squares(x.data(), n);
    double ref = kernels::ref::sum_squares(to_f64(x).data(), n);
    // Both sum exact f64 squares of f32 values; only the summation order differs: relative
    // error <= n * 2^-53 ~ 2e-11 for n = 2e5.
    EXPECT_NEAR(ours, ref, 1e-10 * (1.0 + ref));
  }
}

TEST(KernelsGradNorm, SumSquaresIndependentOfThreadCount) {
  const int64_t n = 5 * kernels::kSumSquaresChunk + 3;
  auto x = random_normal(n, 3);
  int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  double one = kernels::sum_squares(x.data(), n);
  omp_set_num_threads(2);
  double two = kernels::sum_squares(x.data(), n);
  omp_set_num_threads(saved);
  EXPECT_EQ(one, two);  // bit-identical: fixed chunks summed in order
}

TEST(KernelsGradNorm, ClipFactorAsTorch) {
  EXPECT_EQ(kernels::clip_factor(0.5, 1.0f), 1.0f);  // below the limit: no clipping
  EXPECT_FLOAT_EQ(kernels::clip_factor(4.0, 1.0f), float(1.0 / (4.0 + 1e-6)));
  EXPECT_FLOAT_EQ(kernels::clip_factor(4.0, 1.0f), float(kernels::ref::clip_factor(4.0, 1.0)));
  EXPECT_EQ(kernels::clip_factor(0.0, 1.0f), 1.0f);
}
