// Tests for kernels/cpu/weight_matmul.h against kernels/ref/weight_matmul_ref.h: every weight
// format on odd shapes (K odd, M not a multiple of the 8-row
// tile, N not a multiple of the 16-column panel), bias, ldy > N, batch invariance bit for bit (other
// rows, thread counts), NaN isolation, quantize_rows_int8's error bound, bad sizes.
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <cstring>
#include <limits>
#include <vector>

#include "common/op_check.h"
#include "core/dtype.h"
#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/amx.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/weight_matmul.h"
#include "kernels/ref/weight_matmul_ref.h"

using namespace loom;
using namespace loom::test;
using kernels::WeightFormat;
using kernels::WeightView;

namespace {

const WeightFormat kFormats[] = {WeightFormat::f32, WeightFormat::bf16, WeightFormat::int8_row};

const char* name_of(WeightFormat f) {
  return f == WeightFormat::f32 ? "f32" : f == WeightFormat::bf16 ? "bf16" : "int8_row";
}

// A random (N, K) weight held in one storage format: the rows as stored (rows_view, what the
// float64 reference reads) and packed into panels (view, the layout the fast kernel runs).
struct StoredWeight {
  WeightFormat format;
  int64_t N, K;
  std::vector<float> f32;     // (N, K) for f32
  std::vector<bf16> b16;      // (N, K) for bf16
  std::vector<int8_t> q;      // (N, K) for int8_row
  std::vector<float> scales;  // (N) for int8_row
  std::vector<char> panels;   // the rows in panel order (kernels::pack_panels)

  StoredWeight(WeightFormat f, int64_t n, int64_t k, uint64_t seed) : format(f), N(n), K(k) {
    std::vector<float> w = random_normal(N * K, seed);  // (N, K)
    if (f == WeightFormat::f32) {
      f32 = w;
    } else if (f == WeightFormat::bf16) {
      b16.resize(w.size());
      convert_f32_to_bf16(w.data(), b16.data(), w.size());
    } else {
      q.resize(w.size());
      scales.resize(size_t(N));
      kernels::quantize_rows_int8(q.data(), scales.data(), w.data(), N, K);
    }
    repack();
  }
  size_t elem() const { return format == WeightFormat::f32 ? 4 : format == WeightFormat::bf16 ? 2 : 1; }
  // After changing the rows: packs them again (the padding filled with a sentinel first, which
  // pack_panels must overwrite with zeros).
  void repack() {
    panels.assign(size_t(kernels::panels_elements(format, N, K)) * elem(), char(0x5A));
    kernels::pack_panels(panels.data(), rows_view().data, format, N, K);
  }
  WeightView rows_view() const {
    const void* d = format == WeightFormat::f32    ? static_cast<const void*>(f32.data())
                    : format == WeightFormat::bf16 ? static_cast<const void*>(b16.data())
                                                   : static_cast<const void*>(q.data());
    return WeightView{format, N, K, d, format == WeightFormat::int8_row ? scales.data() : nullptr};
  }
  WeightView view() const {
    WeightView w = rows_view();
    w.data = panels.data();
    w.layout = kernels::WeightLayout::panels;
    return w;
  }
};

using Kernel = void (*)(float*, int64_t, const float*, int64_t, const WeightView&, const float*);

// f32 dot products of length K <= 769 over N(0,1) values, against the exact product of the same
// stored weights: the rounding error of each output is ~sqrt(K) * 2^-24 relative to its terms
// (one more rounding for the int8 scale), so NMSE ~ K * 4e-15 < 4e-12. 1e-10 leaves a wide margin
// while a wrong index, a dropped tail element or a missing bias gives NMSE >= 1e-4.
constexpr double kNmse = 1e-10;

// `kernel` runs on `view` (the stored weight itself, or a repacked copy of it: the tile-order
// tests below); the reference reads the stored rows.
void check_view_against_reference(Kernel kernel, const StoredWeight& sw, const WeightView& view,
                                  int64_t M, int64_t ldy, bool with_bias, uint64_t seed,
                                  double* nmse_out) {
  const int64_t N = sw.N, K = sw.K;
  std::vector<float> x = random_normal(M * K, seed);          // (M, K)
  std::vector<float> bias = random_normal(N, seed + 1000);     // (N)
  const float pad = 12345.f;
  GuardedBuffer<float> y(M * ldy, pad);  // (M, ldy)
  kernel(y.data(), ldy, x.data(), M, view, with_bias ? bias.data() : nullptr);

  std::vector<double> W = kernels::ref::weight_to_f64(sw.rows_view());  // (N, K)
  std::vector<double> x64 = to_f64(x), b64 = to_f64(bias);
  std::vector<double> yref(size_t(M * N));  // (M, N)
  kernels::ref::weight_matmul(yref.data(), N, x64.data(), M, W.data(), N, K,
                              with_bias ? b64.data() : nullptr);
  std::vector<float> ydense(size_t(M * N));  // (M, N): y without its padding columns
  bool pad_intact = true;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) ydense[size_t(m * N + n)] = y[m * ldy + n];
    for (int64_t n = N; n < ldy; ++n) pad_intact = pad_intact && y[m * ldy + n] == pad;
  }
  EXPECT_TRUE(y.guards_intact());
  EXPECT_TRUE(pad_intact) << "columns N..ldy-1 of y were written";
  EXPECT_TRUE(all_finite(ydense));
  const double e = nmse(ydense, yref);
  EXPECT_LT(e, kNmse);
  if (nmse_out) *nmse_out = e;
}

// Runs `kernel` on y with row stride ldy inside a guarded buffer whose padding columns hold a
// sentinel, and checks against the float64 reference: NMSE, finiteness, untouched padding.
void check_against_reference(Kernel kernel, const StoredWeight& sw, int64_t M, int64_t ldy,
                             bool with_bias, uint64_t seed, double* nmse_out = nullptr) {
  check_view_against_reference(kernel, sw, sw.view(), M, ldy, with_bias, seed, nmse_out);
}

std::vector<float> run(Kernel kernel, const StoredWeight& sw, const float* x, int64_t M,
                       const float* bias) {
  // (M, N), NaN until written: an output no thread computed cannot pass as a result
  std::vector<float> y(size_t(M * sw.N), std::numeric_limits<float>::quiet_NaN());
  kernel(y.data(), 0, x, M, sw.view(), bias);
  return y;
}

bool bitwise_equal(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, size_t(n) * sizeof(float)) == 0;
}

}  // namespace

// Says which path the other tests exercised: without AVX-512, weight_matmul is the reference
// loop and the fast kernel went untested here.
TEST(KernelsWeightMatmul, FastPathAvailable) {
  if (!kernels::weight_matmul_uses_avx512())
    GTEST_SKIP() << "SKIP: this CPU lacks AVX-512 F/BW/VL; weight_matmul runs the reference loop, "
                    "so the AVX-512 kernel is not tested on this machine";
  SUCCEED();
}

// The same for int8: its panel kernel needs AVX-512 VNNI and DQ; without them every int8 test
// below compares the reference loop with itself.
TEST(KernelsWeightMatmul, Int8FastPathAvailable) {
  if (!kernels::weight_matmul_panels_fast(WeightFormat::int8_row))
    GTEST_SKIP() << "SKIP: this CPU lacks AVX-512 VNNI or DQ; int8 weight_matmul runs the "
                    "reference loop, so the VNNI kernel is not tested on this machine";
  SUCCEED();
}

TEST(KernelsWeightMatmul, AllFormatsMatchFloat64ReferenceOnOddShapes) {
  uint64_t seed = 1;
  int variant = 0;
  for (WeightFormat f : kFormats)
    for (int64_t K : {1, 5, 7, 13, 16, 127, 769})
      for (int64_t N : {1, 3, 13, 64})
        for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17}) {
          // Alternate bias / no bias and ldy = N / ldy > N over the sweep.
          const bool with_bias = variant % 2 == 0;
          const int64_t ldy = (variant / 2) % 2 == 0 ? N : N + 3;
          ++variant;
          SCOPED_TRACE(testing::Message() << name_of(f) << " M=" << M << " N=" << N << " K=" << K
                                          << " bias=" << with_bias << " ldy=" << ldy);
          StoredWeight sw(f, N, K, seed++);
          check_against_reference(&kernels::weight_matmul, sw, M, ldy, with_bias, seed++);
          check_against_reference(&kernels::weight_matmul_reference, sw, M, ldy, with_bias,
                                  seed++);
        }
}

// Prefill-sized calls (M up to a few hundred) take the same kernel; one such shape per format.
TEST(KernelsWeightMatmul, LargeMMatchesReference) {
  for (WeightFormat f : kFormats) {
    SCOPED_TRACE(name_of(f));
    StoredWeight sw(f, 70, 100, 7);
    check_against_reference(&kernels::weight_matmul, sw, 133, 0 + 70, true, 8);
  }
}

// The AVX-512 kernel on panels computes the reference loop's arithmetic (one fma chain per output
// over ascending k, then the int8 scale, then the bias) bit for bit: every format, odd shapes
// (N not a multiple of the 16-column panel nor of the 8-panel block, M across every tile height),
// with and without bias. Without AVX-512 both calls are the reference loop.
TEST(KernelsWeightMatmul, PanelKernelEqualsReferenceBitwise) {
  uint64_t seed = 3000;
  // The blocks' width (and so the widest tiles) follows the thread count: one thread takes
  // 8-panel blocks at every N here, the default count narrower ones on a many-core machine.
  const int saved = omp_get_max_threads();
  for (int threads : {saved, 1}) {
  omp_set_num_threads(threads);
  for (WeightFormat f : kFormats)
    for (int64_t K : {1, 17, 769})
      for (int64_t N : {5, 16, 67, 300})
        // Every row-tile height 1..8 (M = 31: tiles of 8, 8, 8, 7; 36: 8, 7, 7, 7, 7; 12: 6, 6;
        // 10: 5, 5; 3 and 5 alone) and the widths each takes.
        for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 17, 31, 36, 40}) {
          SCOPED_TRACE(testing::Message() << name_of(f) << " M=" << M << " N=" << N << " K=" << K);
          StoredWeight sw(f, N, K, seed++);
          std::vector<float> x = random_normal(M * K, seed++), bias = random_normal(N, seed++);
          const float* b = M % 2 ? bias.data() : nullptr;
          std::vector<float> fast(size_t(M * N)), plain(size_t(M * N));
          kernels::weight_matmul(fast.data(), 0, x.data(), M, sw.view(), b);
          kernels::weight_matmul_reference(plain.data(), 0, x.data(), M, sw.rows_view(), b);
          EXPECT_TRUE(bitwise_equal(fast.data(), plain.data(), M * N)) << "threads " << threads;
        }
  }
  omp_set_num_threads(saved);
}

// The fused epilogue (MatmulEpilogue) equals the separate passes it replaces, bit for bit, on
// the fast kernels and the reference loop: y + residual as add_inplace adds it after the
// product, and act(y + bias) as bias_gelu_forward computes it, for every GELU kind, row tile
// height and partial last panel (N = 5, 67, 300); the residual with a row stride of its own.
TEST(KernelsWeightMatmul, EpilogueEqualsSeparatePassesBitwise) {
  uint64_t seed = 7000;
  using kernels::GeluKind;
  using kernels::MatmulEpilogue;
  for (WeightFormat f : kFormats)
    for (int64_t K : {17, 256})
      for (int64_t N : {5, 16, 67, 300})
        for (int64_t M : {1, 3, 7, 8, 13, 31}) {
          SCOPED_TRACE(testing::Message() << name_of(f) << " M=" << M << " N=" << N << " K=" << K);
          StoredWeight sw(f, N, K, seed++);
          // x scaled so that the GELUs see both tails and the middle.
          std::vector<float> x = random_normal(M * K, seed++), bias = random_normal(N, seed++);
          for (float& v : x) v *= 0.5f;
          const int64_t ldr = N + 3;
          std::vector<float> res = random_normal(M * ldr, seed++);  // (M, ldr)
          for (bool fast : {true, false}) {
            auto mm = [&](float* y, const float* b, const MatmulEpilogue& ep) {
              if (fast)
                kernels::weight_matmul(y, 0, x.data(), M, sw.view(), b, ep);
              else
                kernels::weight_matmul_reference(y, 0, x.data(), M, sw.view(), b, ep);
            };
            // Residual.
            std::vector<float> sep(size_t(M * N)), fused(size_t(M * N));
            mm(sep.data(), bias.data(), {});
            for (int64_t m = 0; m < M; ++m)
              kernels::add_inplace(sep.data() + m * N, res.data() + m * ldr, N);
            MatmulEpilogue ep;
            ep.residual = res.data();
            ep.ld_residual = ldr;
            mm(fused.data(), bias.data(), ep);
            EXPECT_TRUE(bitwise_equal(sep.data(), fused.data(), M * N))
                << "residual, " << (fast ? "weight_matmul" : "reference");
            // GELU of each kind.
            for (GeluKind kind : {GeluKind::tanh, GeluKind::fast, GeluKind::erf}) {
              std::vector<float> up(size_t(M * N)), act(size_t(M * N));
              mm(up.data(), nullptr, {});
              kernels::bias_gelu_forward(act.data(), up.data(), bias.data(), M, N, kind);
              MatmulEpilogue g;
              g.gelu = true;
              g.gelu_kind = kind;
              std::fill(fused.begin(), fused.end(), 0.f);
              mm(fused.data(), bias.data(), g);
              EXPECT_TRUE(bitwise_equal(act.data(), fused.data(), M * N))
                  << "gelu kind " << int(kind) << ", " << (fast ? "weight_matmul" : "reference");
            }
          }
        }
  // A view of rows [r0, r0 + n) of a larger weight (col0 != 0 in its span, the query layer's
  // slices), y with a row stride above N, both parts: the fused result equals the whole
  // weight's columns with the epilogue applied afterwards; and a row computed alone equals the
  // same row inside a batch of 31 (the GELU of a tile of 1 row against one of 8).
  for (WeightFormat f : kFormats) {
    SCOPED_TRACE(name_of(f));
    const int64_t r0 = 48, n = 37, R = r0 + n + 11, KK = 40, M = 31, ldy = n + 5;
    StoredWeight whole(f, R, KK, seed++);
    const WeightView slice = kernels::panels_view_rows(whole.view(), r0, n);
    std::vector<float> x = random_normal(M * KK, seed++), bias = random_normal(n, seed++);
    std::vector<float> res = random_normal(M * n, seed++);
    std::vector<float> all(size_t(M * R));
    kernels::weight_matmul(all.data(), 0, x.data(), M, whole.view(), nullptr);
    MatmulEpilogue both;
    both.residual = res.data();
    both.gelu = true;
    both.gelu_kind = GeluKind::tanh;
    std::vector<float> fused(size_t(M * ldy), 777.f);
    kernels::weight_matmul(fused.data(), ldy, x.data(), M, slice, bias.data(), both);
    for (int64_t m = 0; m < M; ++m) {
      std::vector<float> want(all.begin() + m * R + r0, all.begin() + m * R + r0 + n);
      for (int64_t c = 0; c < n; ++c) want[size_t(c)] = want[size_t(c)] + bias[size_t(c)];
      kernels::add_inplace(want.data(), res.data() + m * n, n);
      kernels::gelu_row(GeluKind::tanh, want.data(), want.data(), n);
      EXPECT_TRUE(bitwise_equal(want.data(), fused.data() + m * ldy, n)) << "row " << m;
      for (int64_t c = n; c < ldy; ++c) EXPECT_EQ(fused[size_t(m * ldy + c)], 777.f);
    }
    for (int64_t m : {0, 17, 30}) {
      MatmulEpilogue one = both;
      one.residual = res.data() + m * n;
      std::vector<float> alone(static_cast<size_t>(n));
      kernels::weight_matmul(alone.data(), 0, x.data() + m * KK, 1, slice, bias.data(), one);
      EXPECT_TRUE(bitwise_equal(alone.data(), fused.data() + m * ldy, n)) << "row " << m;
    }
  }
  // A residual row stride below N, and a residual overlapping y, are refused.
  StoredWeight sw(WeightFormat::f32, 8, 4, 1);
  std::vector<float> x(8), y(16), r(16);
  MatmulEpilogue bad;
  bad.residual = r.data();
  bad.ld_residual = 7;
  EXPECT_THROW(kernels::weight_matmul(y.data(), 0, x.data(), 2, sw.view(), nullptr, bad), Error);
  bad.residual = y.data() + 4;
  bad.ld_residual = 0;
  EXPECT_THROW(kernels::weight_matmul(y.data(), 0, x.data(), 2, sw.view(), nullptr, bad), Error);
  EXPECT_THROW(
      kernels::weight_matmul_reference(y.data(), 0, x.data(), 2, sw.view(), nullptr, bad), Error);
}

// The layout itself: every element lands where panels_index says, the padding columns are zero,
// the float64 reader and the reference loop read a panel view as the rows it was packed from,
// and a view of rows [16, 16 + n) (inference's query-layer slice: weight_rows) starts at
// panels_index(16, 0, K), computes those rows and writes nothing past its own N.
TEST(KernelsWeightMatmul, PanelLayout) {
  const int64_t N = 45, K = 9;
  StoredWeight sw(WeightFormat::bf16, N, K, 3100);
  ASSERT_EQ(kernels::panels_elements(WeightFormat::bf16, N, K), 128 * K);  // one 128-column span
  const bf16* p = reinterpret_cast<const bf16*>(sw.panels.data());
  std::vector<bool> seen(size_t(128 * K), false);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = kernels::panels_index(WeightFormat::bf16, n, k, K);
      ASSERT_TRUE(i >= 0 && i < 128 * K) << n << "," << k;
      EXPECT_FALSE(seen[size_t(i)]) << "two elements at " << i;
      seen[size_t(i)] = true;
      EXPECT_EQ(p[i].bits, sw.b16[size_t(n * K + k)].bits);
    }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) {
      EXPECT_EQ(p[i].bits, 0) << "padding at " << i;
    }
  }
  EXPECT_EQ(kernels::ref::weight_to_f64(sw.view()), kernels::ref::weight_to_f64(sw.rows_view()));
  check_view_against_reference(&kernels::weight_matmul_reference, sw, sw.view(), 5, N + 2, true,
                               3101, nullptr);
  for (WeightFormat f : kFormats) {
    SCOPED_TRACE(name_of(f));
    for (int64_t r0 : {16, 48, 64, 80, 128, 144}) {
    SCOPED_TRACE(testing::Message() << "r0=" << r0);
    const int64_t R = r0 + 24, n = 21, KK = 33;
    StoredWeight whole(f, R, KK, 3200);
    const WeightView slice = kernels::panels_view_rows(whole.view(), r0, n);
    // Spans hold 16 columns in f32, 128 in bf16, 64 in int8: a slice inside one keeps its
    // offset there.
    EXPECT_EQ(slice.col0, r0 % (f == WeightFormat::int8_row ? 64 : f == WeightFormat::bf16 ? 128 : 16));
    EXPECT_EQ(static_cast<const char*>(slice.data) - whole.panels.data(),
              kernels::panels_index(f, r0 - slice.col0, 0, KK) * int64_t(whole.elem()));
    const int64_t M = 9;
    std::vector<float> x = random_normal(M * KK, 3201);
    std::vector<float> all(size_t(M * R)), part(size_t(M * (n + 4)), 777.f);
    kernels::weight_matmul(all.data(), 0, x.data(), M, whole.view(), nullptr);
    kernels::weight_matmul(part.data(), n + 4, x.data(), M, slice, nullptr);
    for (int64_t m = 0; m < M; ++m) {
      EXPECT_TRUE(bitwise_equal(all.data() + m * R + r0, part.data() + m * (n + 4), n)) << m;
      for (int64_t c = n; c < n + 4; ++c) EXPECT_EQ(part[size_t(m * (n + 4) + c)], 777.f);
    }
    // The reference loop reads the slice where weight_element_index says (col0 included), and
    // a slice of the slice (rows [16, 16 + 5) of it) is rows r0 + 16.. of the whole.
    std::vector<float> plain(size_t(M * n));
    kernels::weight_matmul_reference(plain.data(), 0, x.data(), M, slice, nullptr);
    for (int64_t m = 0; m < M; ++m)
      EXPECT_TRUE(bitwise_equal(all.data() + m * R + r0, plain.data() + m * n, n)) << m;
    const WeightView inner = kernels::panels_view_rows(slice, 16, 5);
    std::vector<float> in5(size_t(M * 5));
    kernels::weight_matmul(in5.data(), 0, x.data(), M, inner, nullptr);
    for (int64_t m = 0; m < M; ++m)
      EXPECT_TRUE(bitwise_equal(all.data() + m * R + r0 + 16, in5.data() + m * 5, 5)) << m;
    }
  }
  EXPECT_THROW(kernels::panels_view_rows(StoredWeight(WeightFormat::f32, 40, 8, 1).view(), 8, 4),
               Error);  // not on a panel
}

// Row m of y must be the same bits whatever other rows share the call: M = 7 and 17 (tiles of
// 4 + 2 + 1 rows, and 8 + 8 + 1) against M = 1 (one row by 8 panels), and sub-batches of 3 and 5.
TEST(KernelsWeightMatmul, BatchInvariantBitwise) {
  for (WeightFormat f : kFormats)
    for (int64_t K : {13, 769}) {
      SCOPED_TRACE(testing::Message() << name_of(f) << " K=" << K);
      const int64_t N = 67;
      StoredWeight sw(f, N, K, 31);
      std::vector<float> bias = random_normal(N, 32);
      for (int64_t M : {7, 17}) {
        std::vector<float> x = random_normal(M * K, 33 + uint64_t(M));  // (M, K)
        std::vector<float> y = run(&kernels::weight_matmul, sw, x.data(), M, bias.data());
        for (int64_t m = 0; m < M; ++m) {
          std::vector<float> y1 = run(&kernels::weight_matmul, sw, x.data() + m * K, 1,
                                      bias.data());
          EXPECT_TRUE(bitwise_equal(y.data() + m * N, y1.data(), N)) << "M=" << M << " row " << m;
        }
        // Contiguous sub-batches: rows 2..4 as a call of 3, rows 2..6 as a call of 5.
        for (int64_t sub : {3, 5}) {
          std::vector<float> ys = run(&kernels::weight_matmul, sw, x.data() + 2 * K, sub,
                                      bias.data());
          EXPECT_TRUE(bitwise_equal(y.data() + 2 * N, ys.data(), sub * N))
              << "M=" << M << " sub-batch " << sub;
        }
      }
    }
}

// Threads split N only, so 1 and 2 threads give the same bits (N spans several work chunks).
TEST(KernelsWeightMatmul, ThreadCountInvariantBitwise) {
  const int saved = omp_get_max_threads();
  for (WeightFormat f : kFormats) {
    SCOPED_TRACE(name_of(f));
    // Threads own contiguous ranges of blocks of panels and then take over each other's
    // remaining chunks (weight_matmul.cpp): 3 and 7 threads give uneven ranges and,
    // oversubscribing the cores, threads that finish others' work. The blocks' width follows
    // the thread count (fewer panels per block for small N): N = 300 (19 panels) and N = 44 (3
    // panels, the last partial, fewer than 7 threads).
    for (int64_t N : {300, 44}) {
      const int64_t K = 769, M = 9;
      StoredWeight sw(f, N, K, 41);
      std::vector<float> x = random_normal(M * K, 42), bias = random_normal(N, 43);
      omp_set_num_threads(1);
      std::vector<float> y1 = run(&kernels::weight_matmul, sw, x.data(), M, bias.data());
      for (int t : {2, 3, 7}) {
        omp_set_num_threads(t);
        std::vector<float> yt = run(&kernels::weight_matmul, sw, x.data(), M, bias.data());
        EXPECT_TRUE(bitwise_equal(y1.data(), yt.data(), M * N)) << "N=" << N << " threads=" << t;
      }
    }
  }
  omp_set_num_threads(saved);
}

// A NaN in one row of x makes that row's outputs NaN and leaves the other rows' bits alone;
// an Inf weight gives non-finite outputs in its column only.
TEST(KernelsWeightMatmul, NonFiniteValuesStayInTheirRowAndColumn) {
  const int64_t M = 6, N = 9, K = 37;
  StoredWeight sw(WeightFormat::f32, N, K, 51);
  std::vector<float> x = random_normal(M * K, 52);
  std::vector<float> clean = run(&kernels::weight_matmul, sw, x.data(), M, nullptr);
  x[size_t(3 * K + 20)] = std::numeric_limits<float>::quiet_NaN();  // row 3
  std::vector<float> y = run(&kernels::weight_matmul, sw, x.data(), M, nullptr);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float v = y[size_t(m * N + n)];
      if (m == 3) EXPECT_TRUE(std::isnan(v)) << "n=" << n;
      else EXPECT_EQ(std::memcmp(&v, &clean[size_t(m * N + n)], 4), 0) << "m=" << m << " n=" << n;
    }
  x[size_t(3 * K + 20)] = 0.5f;
  sw.f32[size_t(4 * K + 36)] = std::numeric_limits<float>::infinity();  // weight row 4, last k
  sw.repack();
  y = run(&kernels::weight_matmul, sw, x.data(), M, nullptr);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      EXPECT_EQ(std::isfinite(y[size_t(m * N + n)]), n != 4) << "m=" << m << " n=" << n;
}

namespace {
// weight_matmul.h's int8 arithmetic written out independently of the kernels: e from frexp, X
// rounded in double (exact: |x * 2^e| < 2^30), the sum in 128-bit integers.
std::vector<float> int8_by_definition(const std::vector<float>& x, int64_t M,
                                      const StoredWeight& sw, const float* bias) {
  const int64_t N = sw.N, K = sw.K;
  std::vector<float> y(size_t(M * N));
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[size_t(m * K + k)]));
    int ex = 0;
    std::frexp(amax, &ex);  // amax = f * 2^ex, f in [0.5, 1): floor(log2 amax) = ex - 1
    const int e = amax > 0.f ? 29 - (ex - 1) : 0;
    for (int64_t n = 0; n < N; ++n) {
      __int128 acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double X = std::nearbyint(std::ldexp(double(x[size_t(m * K + k)]), e));
        EXPECT_LT(std::fabs(X), 1073741824.0);  // 2^30
        acc += __int128(int64_t(X)) * sw.q[size_t(n * K + k)];
      }
      const float v = float(double(int64_t(acc)) * std::ldexp(double(sw.scales[size_t(n)]), -e));
      y[size_t(m * N + n)] = bias ? v + bias[n] : v;
    }
  }
  return y;
}
}  // namespace

// int8 computes the integer form of x (weight_matmul.h) exactly: the kernel and the reference
// loop equal a 128-bit-integer transcription of the definition bit for bit, on rows that stress
// it: ordinary values, a zero row, a row whose largest magnitude is subnormal, one near FLT_MAX,
// one mixing 1e30 with 1e-30 (the small values round to 0 in X), values at exact halves of an
// integer step (ties to even), and K not a multiple of 4 or 16.
TEST(KernelsWeightMatmul, Int8IntegerFormMatchesDefinition) {
  for (int64_t K : {1, 3, 4, 17, 64, 771}) {
    SCOPED_TRACE(testing::Message() << "K=" << K);
    const int64_t N = 37, M = 6;
    StoredWeight sw(WeightFormat::int8_row, N, K, 4000 + uint64_t(K));
    std::vector<float> x = random_normal(M * K, 4100 + uint64_t(K)), bias = random_normal(N, 7);
    for (int64_t k = 0; k < K; ++k) {
      x[size_t(1 * K + k)] = 0.f;                                        // zero row
      x[size_t(2 * K + k)] *= std::numeric_limits<float>::denorm_min() * 1000.f;  // subnormal
      x[size_t(3 * K + k)] *= 1e37f;                                     // near FLT_MAX
      x[size_t(4 * K + k)] = k % 2 ? 1e30f : -1e-30f;                   // 60 orders apart
      // Row 5: max 1.0 (e = 29), others at k + 0.5 steps of 2^-29: exact ties.
      x[size_t(5 * K + k)] = k == 0 ? 1.f : std::ldexp(float(k % 7) + 0.5f, -29) * (k % 2 ? 1 : -1);
    }
    x[size_t(3 * K)] = std::numeric_limits<float>::max();
    const std::vector<float> want = int8_by_definition(x, M, sw, bias.data());
    std::vector<float> fast(size_t(M * N)), plain(size_t(M * N));
    kernels::weight_matmul(fast.data(), 0, x.data(), M, sw.view(), bias.data());
    kernels::weight_matmul_reference(plain.data(), 0, x.data(), M, sw.rows_view(), bias.data());
    EXPECT_TRUE(bitwise_equal(fast.data(), want.data(), M * N));
    EXPECT_TRUE(bitwise_equal(plain.data(), want.data(), M * N));
    for (int64_t m = 0; m < M; ++m) {  // row 3 overflows f32 (its values reach FLT_MAX): inf
      if (m == 3) continue;
      for (int64_t n = 0; n < N; ++n) EXPECT_TRUE(std::isfinite(fast[size_t(m * N + n)]));
    }
  }
}

// The largest K the VNNI kernel takes (65536) with every weight +-127 and x chosen so that every
// base-256 digit of X is -128 or near it: the int32 digit sums reach 2.1e9 without wrapping
// (a wrap would differ from the reference's int64 sum). K = 65537 runs the reference loop.
TEST(KernelsWeightMatmul, Int8LargestKStaysExact) {
  for (int64_t K : {65536, 65537}) {
    SCOPED_TRACE(testing::Message() << "K=" << K);
    const int64_t N = 20, M = 2;
    StoredWeight sw(WeightFormat::int8_row, N, K, 4200);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) sw.q[size_t(n * K + k)] = int8_t(n % 2 ? 127 : -127);
    sw.q[size_t(2 * K + 5)] = 3;  // one column not uniform
    sw.repack();
    std::vector<float> x(size_t(M * K));
    // X = 0x3F808080 has digits (-128, -127, -127, 64): x = X * 2^-29 gives e = 29 (x < 2).
    const float big = std::ldexp(float(0x3F808080), -29);
    for (int64_t k = 0; k < K; ++k) {
      x[size_t(k)] = big;
      x[size_t(K + k)] = k % 3 ? big : -big;
    }
    std::vector<float> fast(size_t(M * N)), plain(size_t(M * N));
    kernels::weight_matmul(fast.data(), 0, x.data(), M, sw.view(), nullptr);
    kernels::weight_matmul_reference(plain.data(), 0, x.data(), M, sw.rows_view(), nullptr);
    EXPECT_TRUE(bitwise_equal(fast.data(), plain.data(), M * N));
    // And the value: row 0, column 1 is sum_k X * 127 * s * 2^-29 = K * big * 127 * s.
    const double want = double(K) * big * 127.0 * sw.scales[1];
    EXPECT_NEAR(fast[1], want, std::fabs(want) * 1e-6);
  }
}

// A row of x holding a NaN or an infinity takes the f32 formula (the integer form has no NaN):
// its outputs are non-finite, the reference loop's bits, and the other rows keep theirs.
TEST(KernelsWeightMatmul, Int8NonFiniteRowsTakeTheFloatFormula) {
  const int64_t M = 5, N = 40, K = 70;
  StoredWeight sw(WeightFormat::int8_row, N, K, 4300);
  std::vector<float> x = random_normal(M * K, 4301);
  std::vector<float> clean(size_t(M * N));
  kernels::weight_matmul(clean.data(), 0, x.data(), M, sw.view(), nullptr);
  x[size_t(1 * K + 9)] = std::numeric_limits<float>::quiet_NaN();
  x[size_t(3 * K + 69)] = -std::numeric_limits<float>::infinity();
  std::vector<float> fast(size_t(M * N)), plain(size_t(M * N));
  kernels::weight_matmul(fast.data(), 0, x.data(), M, sw.view(), nullptr);
  kernels::weight_matmul_reference(plain.data(), 0, x.data(), M, sw.rows_view(), nullptr);
  EXPECT_TRUE(bitwise_equal(fast.data(), plain.data(), M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float v = fast[size_t(m * N + n)];
      if (m == 1 || m == 3) EXPECT_FALSE(std::isfinite(v)) << m << "," << n;
      else EXPECT_EQ(std::memcmp(&v, &clean[size_t(m * N + n)], 4), 0) << m << "," << n;
    }
}

TEST(KernelsWeightMatmul, EmptySizes) {
  StoredWeight sw(WeightFormat::f32, 3, 4, 61);
  std::vector<float> x(8, 1.f), y(6, 7.f), bias = {1.f, 2.f, 3.f};
  kernels::weight_matmul(y.data(), 0, x.data(), 0, sw.view(), nullptr);  // M = 0: nothing written
  for (float v : y) EXPECT_EQ(v, 7.f);
  WeightView k0{WeightFormat::f32, 3, 0, nullptr, nullptr};  // K = 0: y = bias
  kernels::weight_matmul(y.data(), 0, nullptr, 2, k0, bias.data());
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t n = 0; n < 3; ++n) EXPECT_EQ(y[size_t(m * 3 + n)], bias[size_t(n)]);
  WeightView k0p = k0;  // the same through the panel kernel
  k0p.layout = kernels::WeightLayout::panels;
  std::fill(y.begin(), y.end(), 7.f);
  kernels::weight_matmul(y.data(), 0, nullptr, 2, k0p, bias.data());
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t n = 0; n < 3; ++n) EXPECT_EQ(y[size_t(m * 3 + n)], bias[size_t(n)]);
  for (WeightFormat f : {WeightFormat::bf16, WeightFormat::int8_row}) {  // K = 0 in panels
    const std::vector<float> ones(3, 1.f);
    WeightView kp{f, 3, 0, nullptr, f == WeightFormat::int8_row ? ones.data() : nullptr};
    kp.layout = kernels::WeightLayout::panels;
    std::fill(y.begin(), y.end(), 7.f);
    kernels::weight_matmul(y.data(), 0, nullptr, 2, kp, bias.data());
    for (int64_t m = 0; m < 2; ++m)
      for (int64_t n = 0; n < 3; ++n) EXPECT_EQ(y[size_t(m * 3 + n)], bias[size_t(n)]) << int(f);
  }
  WeightView n0{WeightFormat::bf16, 0, 4, nullptr, nullptr};  // N = 0: nothing to do
  kernels::weight_matmul(nullptr, 0, x.data(), 2, n0, nullptr);
}

TEST(KernelsWeightMatmul, BadArgumentsThrow) {
  StoredWeight sw(WeightFormat::int8_row, 3, 4, 71);
  std::vector<float> x(8), y(12);
  WeightView w = sw.view();
  for (Kernel kernel : {Kernel(&kernels::weight_matmul), Kernel(&kernels::weight_matmul_reference)}) {
    EXPECT_THROW(kernel(y.data(), 0, x.data(), -1, w, nullptr), Error);       // M < 0
    EXPECT_THROW(kernel(y.data(), 2, x.data(), 2, w, nullptr), Error);        // ldy < N
    EXPECT_THROW(kernel(y.data(), 0, nullptr, 2, w, nullptr), Error);         // null x
    EXPECT_THROW(kernel(nullptr, 0, x.data(), 2, w, nullptr), Error);         // null y
    WeightView no_scales = w;
    no_scales.scales = nullptr;
    EXPECT_THROW(kernel(y.data(), 0, x.data(), 2, no_scales, nullptr), Error);
    WeightView no_data = w;
    no_data.data = nullptr;
    EXPECT_THROW(kernel(y.data(), 0, x.data(), 2, no_data, nullptr), Error);
    WeightView neg = w;
    neg.K = -4;
    EXPECT_THROW(kernel(y.data(), 0, x.data(), 2, neg, nullptr), Error);
    WeightView off = w;  // a column offset inside a span: a multiple of 16 below 64 (int8)
    off.col0 = 64;
    EXPECT_THROW(kernel(y.data(), 0, x.data(), 2, off, nullptr), Error);
    off.col0 = 8;
    EXPECT_THROW(kernel(y.data(), 0, x.data(), 2, off, nullptr), Error);
  }
  try {
    kernels::weight_matmul(y.data(), 2, x.data(), 2, w, nullptr);
    FAIL() << "expected loom::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ldy=2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("N=3"), std::string::npos) << e.what();
  }
}

// |W - s*q| <= s/2 elementwise, with s = max|W_row| / 127, q in [-127, 127], the row's largest
// magnitude mapped to +-127, and an all-zero row giving s = 0 and q = 0. The bound gets 127 * s *
// 2^-24 of slack: q rounds the f32 quotient W/s, which carries one rounding of relative 2^-24.
TEST(KernelsWeightMatmul, QuantizeRowsInt8ErrorBound) {
  const int64_t N = 6, K = 131;
  std::vector<float> W = random_normal(N * K, 81);  // (N, K)
  for (int64_t k = 0; k < K; ++k) {
    W[size_t(1 * K + k)] *= 1e-6f;  // a tiny row
    W[size_t(2 * K + k)] *= 1e4f;   // a large row
    W[size_t(3 * K + k)] = 0.f;     // a zero row
  }
  W[size_t(4 * K + 5)] = -50.f;  // an outlier dominating its row's scale
  std::vector<int8_t> q(static_cast<size_t>(N * K));
  std::vector<float> s(static_cast<size_t>(N));
  kernels::quantize_rows_int8(q.data(), s.data(), W.data(), N, K);
  for (int64_t n = 0; n < N; ++n) {
    SCOPED_TRACE(testing::Message() << "row " << n);
    double amax = 0;
    int qmax = 0;
    for (int64_t k = 0; k < K; ++k) {
      amax = std::max(amax, std::fabs(double(W[size_t(n * K + k)])));
      qmax = std::max(qmax, std::abs(int(q[size_t(n * K + k)])));
    }
    EXPECT_EQ(s[size_t(n)], float(amax) / 127.f);
    const double bound = double(s[size_t(n)]) * (0.5 + 127.0 * std::ldexp(1.0, -24));
    for (int64_t k = 0; k < K; ++k) {
      const int qi = q[size_t(n * K + k)];
      EXPECT_LE(std::abs(qi), 127);
      EXPECT_LE(std::fabs(double(W[size_t(n * K + k)]) - double(s[size_t(n)]) * qi), bound)
          << "k=" << k;
    }
    if (n == 3) {
      EXPECT_EQ(s[size_t(n)], 0.f);
      EXPECT_EQ(qmax, 0);
    } else {
      EXPECT_EQ(qmax, 127);
    }
  }
}

TEST(KernelsWeightMatmul, QuantizeRowsInt8BadInput) {
  std::vector<float> W = {1.f, 2.f, std::numeric_limits<float>::infinity(), 4.f};
  std::vector<int8_t> q(4);
  std::vector<float> s(2);
  EXPECT_THROW(kernels::quantize_rows_int8(q.data(), s.data(), W.data(), 2, 2), Error);
  EXPECT_THROW(kernels::quantize_rows_int8(q.data(), s.data(), W.data(), -1, 2), Error);
  EXPECT_THROW(kernels::quantize_rows_int8(q.data(), nullptr, W.data(), 2, 2), Error);
  EXPECT_THROW(kernels::quantize_rows_int8(q.data(), s.data(), nullptr, 2, 2), Error);
}

// ---------------------------------------------------------------------------------------------
// bf16 weights in AMX tile order (WeightLayout::amx_tiles): weight_matmul runs them on AMX tiles
// at every M >= 2 where the CPU has them (M = 1 on vector loads with the reference's bits, unless
// the view sets batch_invariant), else the reference loop. These sweep the kernel's blocking
// (N tails: partial 32-row blocks; M below 16 rows, one and two 16-row blocks and past them) and
// hold it to the same bounds as the row-order paths.

namespace {
bool amx_or_skip() { return kernels::amx_bf16_usable(); }

// A StoredWeight's bf16 rows packed into tile order; view() describes the packed copy.
struct TiledWeight {
  StoredWeight rows;
  std::vector<bf16> tiles;
  TiledWeight(int64_t N, int64_t K, uint64_t seed) : rows(WeightFormat::bf16, N, K, seed) {
    repack();
  }
  void repack() {
    tiles.assign(size_t(kernels::amx_tiles_elements(rows.N, rows.K)), f32_to_bf16(7.f));
    kernels::pack_amx_tiles(tiles.data(), rows.b16.data(), rows.N, rows.K);
  }
  WeightView view(bool batch_invariant = false) const {
    WeightView w = rows.view();
    w.data = tiles.data();
    w.layout = kernels::WeightLayout::amx_tiles;
    w.batch_invariant = batch_invariant;
    return w;
  }
};

// check_against_reference for a tiled weight: the stored rows are the reference's weights, the
// kernel sees the tiled view.
void check_tiled(Kernel kernel, const TiledWeight& tw, int64_t M, int64_t ldy, bool with_bias,
                 uint64_t seed, double* nmse_out = nullptr) {
  check_view_against_reference(kernel, tw.rows, tw.view(), M, ldy, with_bias, seed, nmse_out);
}

std::vector<float> run_tiled(const TiledWeight& tw, const float* x, int64_t M, const float* bias,
                             bool batch_invariant = false) {
  std::vector<float> y(size_t(M * tw.rows.N));  // (M, N)
  kernels::weight_matmul(y.data(), 0, x, M, tw.view(batch_invariant), bias);
  return y;
}
}  // namespace

// The layout itself: every element lands where amx_tiles_index says, padding rows are zero, and
// the float64 reader and the reference loop read a tiled view as the rows it was packed from.
TEST(KernelsWeightMatmulAmx, TileOrderLayout) {
  const int64_t N = 45, K = 96;
  TiledWeight tw(N, K, 401);
  ASSERT_EQ(kernels::amx_tiles_elements(N, K), 64 * K);
  std::vector<bool> seen(tw.tiles.size(), false);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = kernels::amx_tiles_index(n, k, K);
      ASSERT_TRUE(i >= 0 && i < int64_t(tw.tiles.size())) << n << "," << k;
      EXPECT_FALSE(seen[size_t(i)]) << "two elements at " << i;
      seen[size_t(i)] = true;
      EXPECT_EQ(tw.tiles[size_t(i)].bits, tw.rows.b16[size_t(n * K + k)].bits);
    }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) {
      EXPECT_EQ(tw.tiles[i].bits, 0) << "padding at " << i;
    }
  }
  EXPECT_EQ(kernels::ref::weight_to_f64(tw.view()),
            kernels::ref::weight_to_f64(tw.rows.rows_view()));
  check_tiled(&kernels::weight_matmul_reference, tw, 5, N + 2, true, 402);
  EXPECT_THROW(kernels::pack_amx_tiles(tw.tiles.data(), tw.rows.b16.data(), N, 48), Error);
  WeightView bad = tw.view();
  bad.K = 48;  // a tile-order view needs K % 32 == 0
  std::vector<float> x(48), y(static_cast<size_t>(N));
  EXPECT_THROW(kernels::weight_matmul(y.data(), 0, x.data(), 1, bad, nullptr), Error);
}

TEST(KernelsWeightMatmulAmx, MatchesFloat64ReferenceAcrossBlockings) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  uint64_t seed = 500;
  for (int64_t K : {32, 96, 768})
    for (int64_t N : {1, 31, 32, 67})
      for (int64_t M : {1, 8, 15, 16, 17, 33, 40, 70}) {
        SCOPED_TRACE(testing::Message() << "M=" << M << " N=" << N << " K=" << K);
        TiledWeight tw(N, K, seed++);
        ASSERT_TRUE(kernels::weight_matmul_uses_amx(tw.view()));
        check_tiled(&kernels::weight_matmul, tw, M, M % 2 ? N + 5 : N, M % 3 == 0, seed++);
      }
}

// x is split into three bf16 parts so that no activation is rounded: the error stays that of an
// f32 dot product (at most 2x the plain loop's). Rounding x to bf16
// would give NMSE ~1e-6, four orders above.
TEST(KernelsWeightMatmulAmx, KeepsActivationsExact) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  for (int64_t K : {64, 768, 3072})
    for (int64_t M : {3, 19}) {
      SCOPED_TRACE(testing::Message() << "K=" << K << " M=" << M);
      TiledWeight tw(45, K, 700 + uint64_t(K));
      double fast = 0, plain = 0;
      check_tiled(&kernels::weight_matmul, tw, M, 45, true, 9, &fast);
      check_against_reference(&kernels::weight_matmul_reference, tw.rows, M, 45, true, 9,
                              &plain);
      EXPECT_LE(fast, 2.0 * plain + 1e-15) << "amx " << fast << " plain " << plain;
    }
}

// One kernel at every M >= 2: a row's bits do not depend on the rows beside it (a ragged batch, a
// prefill of several 16-row blocks) nor on the thread count; with batch_invariant also decode's
// one row.
TEST(KernelsWeightMatmulAmx, BatchAndThreadInvariantBitwise) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  const int64_t N = 99, K = 160, M = 70;
  TiledWeight tw(N, K, 801);
  std::vector<float> x = random_normal(M * K, 802), bias = random_normal(N, 803);
  for (bool inv : {false, true}) {
    SCOPED_TRACE(testing::Message() << "batch_invariant " << inv);
    std::vector<float> y = run_tiled(tw, x.data(), M, bias.data(), inv);
    for (int64_t sub : {1, 2, 5, 8, 15, 16, 20, 33, 40}) {
      if (sub == 1 && !inv) continue;  // the vector path: OneRowEqualsReferenceBitwise
      std::vector<float> ys = run_tiled(tw, x.data() + 3 * K, sub, bias.data(), inv);
      EXPECT_TRUE(bitwise_equal(y.data() + 3 * N, ys.data(), sub * N)) << "sub-batch " << sub;
    }
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    std::vector<float> y_one = run_tiled(tw, x.data(), M, bias.data(), inv);
    std::vector<float> r_one = run_tiled(tw, x.data() + 5 * K, 1, bias.data(), inv);
    omp_set_num_threads(saved);
    EXPECT_TRUE(bitwise_equal(y.data(), y_one.data(), M * N));
    std::vector<float> r = run_tiled(tw, x.data() + 5 * K, 1, bias.data(), inv);
    EXPECT_TRUE(bitwise_equal(r.data(), r_one.data(), N)) << "one row, 1 thread against all";
  }
}

// One row (batch-1 decode) without batch_invariant reads the tile-order weights with vector
// loads and computes weight_matmul_reference's fma chain over k ascending: the same bits as the
// reference on the rows the tiles were packed from, for partial 32-row blocks (N 1, 31, 67, 99),
// one chunk of k to K = 3072, with and without bias, y with a row stride; and the epilogue
// (EpilogueEqualsSeparatePassesBitwise covers M = 1 too). Non-finite inputs give non-finite
// outputs where the reference's are (NaN bits are not compared: their payloads follow operand
// order, which the compiler picks).
TEST(KernelsWeightMatmulAmx, OneRowEqualsReferenceBitwise) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  uint64_t seed = 1100;
  for (int64_t K : {32, 96, 768, 3072})
    for (int64_t N : {1, 31, 32, 67, 99}) {
      SCOPED_TRACE(testing::Message() << "N=" << N << " K=" << K);
      TiledWeight tw(N, K, seed++);
      std::vector<float> x = random_normal(K, seed++), bias = random_normal(N, seed++);
      for (bool with_bias : {false, true}) {
        const float* b = with_bias ? bias.data() : nullptr;
        std::vector<float> want(static_cast<size_t>(N)), got(static_cast<size_t>(N + 3), 555.f);
        kernels::weight_matmul_reference(want.data(), 0, x.data(), 1, tw.rows.rows_view(), b);
        kernels::weight_matmul(got.data(), N + 3, x.data(), 1, tw.view(), b);
        EXPECT_TRUE(bitwise_equal(want.data(), got.data(), N)) << "bias " << with_bias;
        for (int64_t c = N; c < N + 3; ++c) EXPECT_EQ(got[size_t(c)], 555.f);
      }
    }
  // A view whose data is not 64-byte aligned (the kernel's loads take any address).
  {
    TiledWeight tw(67, 96, 1180);
    std::vector<bf16> shifted(tw.tiles.size() + 1);
    std::copy(tw.tiles.begin(), tw.tiles.end(), shifted.begin() + 1);
    WeightView v = tw.view();
    v.data = shifted.data() + 1;  // 2 bytes past an allocation's alignment
    std::vector<float> x = random_normal(96, 1181);
    std::vector<float> want(static_cast<size_t>(67)), got(static_cast<size_t>(67));
    kernels::weight_matmul_reference(want.data(), 0, x.data(), 1, tw.rows.rows_view(), nullptr);
    kernels::weight_matmul(got.data(), 0, x.data(), 1, v, nullptr);
    EXPECT_TRUE(bitwise_equal(want.data(), got.data(), 67)) << "unaligned view";
  }
  // Non-finite x and weights (k = 0 and the last k, a chunk's odd k: both halves of a pair).
  const int64_t N = 40, K = 96;
  TiledWeight tw(N, K, 1190);
  tw.rows.b16[size_t(7 * K + 95)] = f32_to_bf16(std::numeric_limits<float>::infinity());
  tw.rows.b16[size_t(9 * K + 0)] = f32_to_bf16(-std::numeric_limits<float>::infinity());
  tw.repack();
  std::vector<float> x = random_normal(K, 1191);
  for (int trial = 0; trial < 3; ++trial) {
    if (trial == 1) x[33] = std::numeric_limits<float>::quiet_NaN();
    if (trial == 2) {
      x[33] = 1.f;
      x[95] = 0.f;  // 0 * inf: NaN in column 7
    }
    std::vector<float> want(static_cast<size_t>(N)), got(static_cast<size_t>(N));
    kernels::weight_matmul_reference(want.data(), 0, x.data(), 1, tw.rows.rows_view(), nullptr);
    kernels::weight_matmul(got.data(), 0, x.data(), 1, tw.view(), nullptr);
    for (int64_t n = 0; n < N; ++n) {
      const float a = want[size_t(n)], g = got[size_t(n)];
      if (std::isnan(a)) EXPECT_TRUE(std::isnan(g)) << "trial " << trial << " n=" << n;
      else
        EXPECT_EQ(std::memcmp(&a, &g, 4), 0)
            << "trial " << trial << " n=" << n << ": " << a << " vs " << g;
    }
    EXPECT_FALSE(std::isfinite(want[7]));
    EXPECT_FALSE(std::isfinite(want[9]));
  }
}

// The epilogue on AMX tiles (applied per 32-column block as the kernel writes it) equals the
// separate passes on the same product, bit for bit: + residual (a row stride of its own), each
// GELU kind, partial last blocks (N = 99), one and two 16-row m blocks and more (M 1, 8, 16, 40),
// y with ldy > N.
TEST(KernelsWeightMatmulAmx, EpilogueEqualsSeparatePassesBitwise) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  using kernels::GeluKind;
  using kernels::MatmulEpilogue;
  const int64_t N = 99, K = 96;
  TiledWeight tw(N, K, 901);
  uint64_t seed = 902;
  for (int64_t M : {1, 8, 16, 40}) {
    SCOPED_TRACE(testing::Message() << "M=" << M);
    std::vector<float> x = random_normal(M * K, seed++), bias = random_normal(N, seed++);
    for (float& v : x) v *= 0.5f;
    const int64_t ldr = N + 3, ldy = N + 5;
    std::vector<float> res = random_normal(M * ldr, seed++);
    std::vector<float> plain(size_t(M * N)), up(size_t(M * N));
    kernels::weight_matmul(plain.data(), 0, x.data(), M, tw.view(), bias.data());
    kernels::weight_matmul(up.data(), 0, x.data(), M, tw.view(), nullptr);
    for (GeluKind kind : {GeluKind::tanh, GeluKind::fast, GeluKind::erf}) {
      for (bool with_res : {false, true}) {
        MatmulEpilogue ep;
        ep.gelu = true;
        ep.gelu_kind = kind;
        if (with_res) {
          ep.residual = res.data();
          ep.ld_residual = ldr;
        }
        std::vector<float> want(size_t(M * N));
        if (with_res) {
          want = plain;
          for (int64_t m = 0; m < M; ++m) {
            kernels::add_inplace(want.data() + m * N, res.data() + m * ldr, N);
            kernels::gelu_row(kind, want.data() + m * N, want.data() + m * N, N);
          }
        } else {
          std::vector<float> pre = up;  // bias_gelu_forward adds the bias in place
          kernels::bias_gelu_forward(want.data(), pre.data(), bias.data(), M, N, kind);
        }
        std::vector<float> fused(size_t(M * ldy), 777.f);
        kernels::weight_matmul(fused.data(), ldy, x.data(), M, tw.view(), bias.data(), ep);
        for (int64_t m = 0; m < M; ++m) {
          EXPECT_TRUE(bitwise_equal(want.data() + m * N, fused.data() + m * ldy, N))
              << "row " << m << " gelu " << int(kind) << " residual " << with_res;
          for (int64_t c = N; c < ldy; ++c) ASSERT_EQ(fused[size_t(m * ldy + c)], 777.f);
        }
      }
    }
    MatmulEpilogue r;  // residual alone
    r.residual = res.data();
    r.ld_residual = ldr;
    std::vector<float> want = plain, fused(size_t(M * N));
    for (int64_t m = 0; m < M; ++m)
      kernels::add_inplace(want.data() + m * N, res.data() + m * ldr, N);
    kernels::weight_matmul(fused.data(), 0, x.data(), M, tw.view(), bias.data(), r);
    EXPECT_TRUE(bitwise_equal(want.data(), fused.data(), M * N)) << "residual";
  }
}

// Calls of up to 16 rows stage each thread's finished outputs (64 weight blocks of 32 at a time)
// and copy them into y afterwards; larger calls write y as they go. A row's outputs must be the
// same bits either way: rows of a 2-, 8- and 16-row call (staged) against the same rows in a
// 40-row call, with the whole epilogue (bias, residual, GELU), y with a row stride whose padding
// stays untouched, over N = 4141 (130 blocks, the last partial), so that one thread flushes its
// staging buffer twice before the end; on 1 thread and on all.
TEST(KernelsWeightMatmulAmx, StagedOutputsEqualUnstagedBitwise) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  const int64_t N = 4141, K = 64, M = 40, first = 5;
  TiledWeight tw(N, K, 1001);
  std::vector<float> x = random_normal(M * K, 1002), bias = random_normal(N, 1003);
  const int64_t ldr = N + 3, ldy = N + 5;
  std::vector<float> res = random_normal(M * ldr, 1004);
  kernels::MatmulEpilogue ep;
  ep.residual = res.data();
  ep.ld_residual = ldr;
  ep.gelu = true;
  std::vector<float> all(size_t(M * ldy), 777.f);
  kernels::weight_matmul(all.data(), ldy, x.data(), M, tw.view(), bias.data(), ep);
  kernels::MatmulEpilogue ep_sub = ep;
  ep_sub.residual = res.data() + first * ldr;
  const int saved = omp_get_max_threads();
  for (int64_t sub : {2, 8, 16})
  for (int threads : {1, saved}) {
    SCOPED_TRACE(testing::Message() << "rows " << sub << " threads " << threads);
    omp_set_num_threads(threads);
    std::vector<float> part(size_t(sub * ldy), 777.f);
    kernels::weight_matmul(part.data(), ldy, x.data() + first * K, sub, tw.view(), bias.data(),
                           ep_sub);
    omp_set_num_threads(saved);
    for (int64_t m = 0; m < sub; ++m) {
      EXPECT_TRUE(bitwise_equal(all.data() + (first + m) * ldy, part.data() + m * ldy, N))
          << "row " << m;
      for (int64_t c = N; c < ldy; ++c) ASSERT_EQ(part[size_t(m * ldy + c)], 777.f);
    }
  }
}

TEST(KernelsWeightMatmulAmx, NaNStaysInItsRowAndInfWeightInItsColumn) {
  if (!amx_or_skip()) GTEST_SKIP() << "SKIP: no AMX-BF16 tiles here (or LOOM_AMX=0)";
  const int64_t N = 40, K = 64;
  for (int64_t M : {5, 18}) {
    SCOPED_TRACE(testing::Message() << "M=" << M);
    TiledWeight tw(N, K, 901);
    std::vector<float> x = random_normal(M * K, 902);
    std::vector<float> clean = run_tiled(tw, x.data(), M, nullptr);
    x[size_t(3 * K + 20)] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> y = run_tiled(tw, x.data(), M, nullptr);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float v = y[size_t(m * N + n)];
        if (m == 3) EXPECT_TRUE(std::isnan(v)) << "n=" << n;
        else EXPECT_EQ(std::memcmp(&v, &clean[size_t(m * N + n)], 4), 0) << "m=" << m << " n=" << n;
      }
    x[size_t(3 * K + 20)] = 0.5f;
    tw.rows.b16[size_t(35 * K + 63)] = f32_to_bf16(std::numeric_limits<float>::infinity());
    tw.repack();  // row 35: in the tail block
    y = run_tiled(tw, x.data(), M, nullptr);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        EXPECT_EQ(std::isfinite(y[size_t(m * N + n)]), n != 35) << "m=" << m << " n=" << n;
  }
}

// Row-order bf16 views never take the tiles.
TEST(KernelsWeightMatmulAmx, RowOrderViewsStayOffTiles) {
  const kernels::WeightView w{WeightFormat::bf16, 64, 64, nullptr, nullptr};
  EXPECT_FALSE(kernels::weight_matmul_uses_amx(w));
  EXPECT_FALSE(kernels::amx_tiles_available(48));  // K not a multiple of 32
  if (amx_or_skip()) {
    const char* env = std::getenv("LOOM_AMX_WEIGHTS");
    EXPECT_EQ(kernels::amx_tiles_available(64), !(env && std::string(env) == "0"));
  }
}
