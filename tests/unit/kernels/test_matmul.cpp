// Tests for kernels/cpu/matmul.h against kernels/ref/matmul_ref.h: odd shapes, all four transpose
// combinations, accumulate, guard bytes, K = 0, the bf16 error rule, the primitive cache and
// bit-reproducibility.
#include <gtest/gtest.h>

#include <vector>

#include <omp.h>

#include "common/op_check.h"
#include "core/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/ref/matmul_ref.h"

using namespace loom;
using namespace loom::test;

namespace {

struct Shape3 {
  int64_t M, N, K;
};

// Odd sizes (5, 7, 13, 127) and non-multiples of 16 in every position, plus one shape large
// enough to take oneDNN's blocked (brgemm) path.
const std::vector<Shape3> kShapes = {{1, 1, 1},    {5, 7, 13},    {13, 5, 7},    {7, 13, 5},
                                     {127, 33, 65}, {17, 127, 31}, {64, 48, 129}, {200, 300, 257}};

// f32 products with K <= 300 of N(0,1) values: each output's rounding error is ~sqrt(K) * 2^-24
// relative to the terms' magnitude, so NMSE ~ K * 4e-15 < 2e-12. 1e-10 leaves 50x margin while a
// wrong index or a missing transpose gives NMSE ~ 1.
constexpr double kF32Nmse = 1e-10;

// Plain bf16 loop: inputs rounded to bf16, f32 accumulation in k order, f32 output.
std::vector<float> plain_bf16_matmul(const std::vector<bf16>& A, const std::vector<bf16>& B,
                                     int64_t M, int64_t N, int64_t K, bool ta, bool tb) {
  std::vector<float> C(static_cast<size_t>(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        float a = bf16_to_f32(ta ? A[size_t(k * M + i)] : A[size_t(i * K + k)]);
        float b = bf16_to_f32(tb ? B[size_t(j * K + k)] : B[size_t(k * N + j)]);
        s += a * b;
      }
      C[size_t(i * N + j)] = s;
    }
  return C;
}

}  // namespace

TEST(KernelsMatmul, F32MatchesReferenceAllTransposesAndAccumulate) {
  uint64_t seed = 1;
  for (const Shape3& s : kShapes) {
    for (int flags = 0; flags < 8; ++flags) {
      const bool ta = flags & 1, tb = flags & 2, acc = flags & 4;
      SCOPED_TRACE(testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K
                                      << " trans_a=" << ta << " trans_b=" << tb
                                      << " accumulate=" << acc);
      auto A = random_normal(s.M * s.K, seed++);
      auto B = random_normal(s.K * s.N, seed++);
      auto C0 = random_normal(s.M * s.N, seed++);
      GuardedBuffer<float> C(s.M * s.N);
      C.assign(C0);
      kernels::matmul_f32(A.data(), B.data(), C.data(), s.M, s.N, s.K, ta, tb, acc);
      auto Cref = to_f64(C0);
      auto A64 = to_f64(A), B64 = to_f64(B);
      kernels::ref::matmul(A64.data(), B64.data(), Cref.data(), s.M, s.N, s.K, ta, tb, acc);
      EXPECT_TRUE(C.guards_intact());
      EXPECT_TRUE(all_finite(C.data(), C.size()));
      EXPECT_LT(nmse(C.data(), Cref.data(), C.size()), kF32Nmse);
    }
  }
}

TEST(KernelsMatmul, ZeroSizedReductionAndEmptyOutputs) {
  std::vector<float> A(1), B(1);
  GuardedBuffer<float> C(6, 3.0f);
  kernels::matmul_f32(A.data(), B.data(), C.data(), 2, 3, 0, false, false, true);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(C[i], 3.0f);  // accumulate of an empty sum: unchanged
  kernels::matmul_f32(A.data(), B.data(), C.data(), 2, 3, 0, false, false, false);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(C[i], 0.0f);  // overwrite: zeros
  kernels::matmul_f32(A.data(), B.data(), C.data(), 0, 3, 4, false, false, false);  // no-op
  EXPECT_TRUE(C.guards_intact());
  EXPECT_THROW(kernels::matmul_f32(A.data(), B.data(), C.data(), -1, 3, 4, false, false, false),
               Error);
}

// Gradients of a product expressed through the transposes: for L = sum(G .* (A @ B)),
// dL/dA = G @ B^T and dL/dB = A^T @ G. The reference's transposed products are checked against
// float64 central differences of L, then the f32 kernel's against the reference's.
TEST(KernelsMatmul, GradientsThroughTransposesMatchFiniteDifferences) {
  const int64_t M = 5, N = 7, K = 13;
  auto A = to_f64(random_normal(M * K, 11)), B = to_f64(random_normal(K * N, 12));
  auto G = to_f64(random_normal(M * N, 13));
  auto loss_of_A = [&](const std::vector<double>& a) {
    std::vector<double> C(static_cast<size_t>(M * N));
    kernels::ref::matmul(a.data(), B.data(), C.data(), M, N, K, false, false, false);
    return dot(C, G);
  };
  auto loss_of_B = [&](const std::vector<double>& b) {
    std::vector<double> C(static_cast<size_t>(M * N));
    kernels::ref::matmul(A.data(), b.data(), C.data(), M, N, K, false, false, false);
    return dot(C, G);
  };
  std::vector<double> dA(static_cast<size_t>(M * K)), dB(static_cast<size_t>(K * N));
  kernels::ref::matmul(G.data(), B.data(), dA.data(), M, K, N, false, true, false);
  kernels::ref::matmul(A.data(), G.data(), dB.data(), K, N, M, true, false, false);
  // L is bilinear, so central differences are exact up to rounding (~1e-10 relative with h=1e-6).
  EXPECT_LT(nmse(dA, fd_gradient(loss_of_A, A)), 1e-16);
  EXPECT_LT(nmse(dB, fd_gradient(loss_of_B, B)), 1e-16);

  auto Af = to_f32(A), Bf = to_f32(B), Gf = to_f32(G);
  GuardedBuffer<float> dAf(M * K), dBf(K * N);
  kernels::matmul_f32(Gf.data(), Bf.data(), dAf.data(), M, K, N, false, true, false);
  kernels::matmul_f32(Af.data(), Gf.data(), dBf.data(), K, N, M, true, false, false);
  EXPECT_LT(nmse(dAf.data(), dA.data(), M * K), kF32Nmse);
  EXPECT_LT(nmse(dBf.data(), dB.data(), K * N), kF32Nmse);
  EXPECT_TRUE(dAf.guards_intact() && dBf.guards_intact());
}

// flash-attention's rule for low precision: against the float64 product of the ORIGINAL f32
// inputs, our bf16 error must be at most 2x that of a plain bf16 loop (bf16 inputs, f32
// accumulation). Both are dominated by rounding the inputs to bf16 (~2^-9 relative), so the ratio
// is ~1 unless our kernel adds error of its own (e.g. rounding the output or accumulating in bf16).
// Separately, against the float64 product of the bf16-ROUNDED inputs, only f32 accumulation error
// remains, so NMSE must be at the f32 level.
TEST(KernelsMatmul, Bf16ErrorAtMostTwicePlainBf16Loop) {
  uint64_t seed = 100;
  for (const Shape3& s : kShapes) {
    for (int flags = 0; flags < 8; ++flags) {
      const bool ta = flags & 1, tb = flags & 2, acc = flags & 4;
      SCOPED_TRACE(testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K
                                      << " trans_a=" << ta << " trans_b=" << tb
                                      << " accumulate=" << acc);
      auto A = random_normal(s.M * s.K, seed++);
      auto B = random_normal(s.K * s.N, seed++);
      auto C0 = random_normal(s.M * s.N, seed++);
      auto Ah = to_bf16(A), Bh = to_bf16(B);
      GuardedBuffer<float> C(s.M * s.N);
      C.assign(C0);
      kernels::matmul_bf16(Ah.data(), Bh.data(), C.data(), s.M, s.N, s.K, ta, tb, acc);
      EXPECT_TRUE(C.guards_intact());
      EXPECT_TRUE(all_finite(C.data(), C.size()));

      std::vector<float> plain = plain_bf16_matmul(Ah, Bh, s.M, s.N, s.K, ta, tb);
      if (acc)
        for (size_t i = 0; i < plain.size(); ++i) plain[i] += C0[i];

      auto exact = to_f64(C0);  // float64 product of the original inputs
      kernels::ref::matmul(to_f64(A).data(), to_f64(B).data(), exact.data(), s.M, s.N, s.K, ta,
                           tb, acc);
      double ours = nmse(C.data(), exact.data(), C.size());
      double base = nmse(plain.data(), exact.data(), C.size());
      EXPECT_LE(ours, 2.0 * base) << "ours " << ours << " plain bf16 loop " << base;

      auto rounded = to_f64(C0);  // float64 product of the bf16 inputs
      kernels::ref::matmul(to_f64(Ah).data(), to_f64(Bh).data(), rounded.data(), s.M, s.N, s.K,
                           ta, tb, acc);
      EXPECT_LT(nmse(C.data(), rounded.data(), C.size()), kF32Nmse);
    }
  }
}

TEST(KernelsMatmul, PrimitivesAreCachedAndResultsBitReproducible) {
  const int64_t M = 96, N = 80, K = 112;
  auto A = random_normal(M * K, 7), B = random_normal(K * N, 8);
  std::vector<float> C1(static_cast<size_t>(M * N)), C2(static_cast<size_t>(M * N));
  kernels::matmul_f32(A.data(), B.data(), C1.data(), M, N, K, false, true, false);
  int64_t cached = kernels::matmul_primitive_cache_size();
  kernels::matmul_f32(A.data(), B.data(), C2.data(), M, N, K, false, true, false);
  EXPECT_EQ(kernels::matmul_primitive_cache_size(), cached);  // same key: no new primitive
  EXPECT_EQ(C1, C2);
  kernels::matmul_f32(A.data(), B.data(), C2.data(), M, N, K, false, true, true);
  EXPECT_EQ(kernels::matmul_primitive_cache_size(), cached + 1);  // accumulate is part of the key
  // So is the thread count: oneDNN fixes a primitive's thread decomposition when it is built, so
  // one built for a one-thread process must not serve a two-thread one (matmul.cpp).
  const int saved = omp_get_max_threads();
  omp_set_num_threads(saved == 1 ? 2 : 1);
  std::vector<float> C3(static_cast<size_t>(M * N));
  kernels::matmul_f32(A.data(), B.data(), C3.data(), M, N, K, false, true, false);
  EXPECT_EQ(kernels::matmul_primitive_cache_size(), cached + 2);
  omp_set_num_threads(saved);
  kernels::matmul_f32(A.data(), B.data(), C3.data(), M, N, K, false, true, false);
  EXPECT_EQ(kernels::matmul_primitive_cache_size(), cached + 2);
  EXPECT_EQ(C1, C3);
}
