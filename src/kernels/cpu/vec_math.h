// kernels/cpu/vec_math.h: inlineable float and double math that GCC vectorises inside `omp simd`
// loops.
//
// glibc's expf/tanhf are scalar calls unless -ffast-math is on (which loom does not use, for
// reproducibility), so GELU and softmax over millions of elements would run at one element per
// call. These versions are plain arithmetic and bit manipulation, vectorise to AVX-512, and are
// deterministic (no table lookups that depend on hardware).
#pragma once

#include <cstdint>
#include <bit>

namespace loom::kernels::vec {

// exp(x) for float, max relative error ~2 ulp over [-87, 88]; inputs are clamped to that range
// (exp(-87) ~ 1.6e-38 stays a normal float; exp(88) ~ 1.65e38 stays finite).
// Method: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two constants, Cody-Waite, so r is exact
// to ~1e-11), exp(r) by a degree-7 Taylor polynomial (truncation < 6e-9 relative on that
// interval), times 2^n built in the exponent bits.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  // Round x*log2(e) to the nearest integer by adding and subtracting 1.5 * 2^23: floorf/rintf do
  // not vectorise under strict IEEE semantics (-ftrapping-math), this does. The integer n also
  // sits in the low mantissa bits of `t`, which gives the exponent without a float->int convert.
  const float kRound = 12582912.0f;  // 1.5 * 2^23
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // 1 + r + r^2/2! + ... + r^7/7!  (Horner)
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n_int = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float scale = std::bit_cast<float>(uint32_t(n_int + 127) << 23);  // 2^n
  return p * scale;
}

// exp(x) for double, relative error within a few ulp (~1e-15) over [-708, 709]. x below -708
// (and -inf) gives 0: the result would be within a factor 1.5 of the smallest normal double
// (2^-1022 ~ 2.2e-308, at x ~ -708.4) or below it, and such results are flushed. x above 709 is clamped (exp(709) ~
// 8.2e307: finite, where std::exp overflows to inf past ~709.78). NaN gives NaN.
// Method as exp_f32: x = n ln2 + r, |r| <= ln2/2 (ln2 in two parts, fdlibm's split: n * kLn2Hi is
// exact for |n| < 2^21), exp(r) by a degree-13 Taylor polynomial (truncation < 6e-18 relative on
// that interval), times 2^n built in the exponent bits. For sampling's softmax over a vocabulary
// (infer/sampling.cpp), where glibc's exp was a scalar call per token.
inline double exp_f64(double x) {
  const bool under = x < -708.0;
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double kLog2e = 1.4426950408889634074;
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double kRound = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer, see exp_f32
  const double t = x * kLog2e + kRound;
  const double n = t - kRound;
  double r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // 1 + r + r^2/2! + ... + r^13/13!  (Horner)
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t n_int = std::bit_cast<int64_t>(t) - std::bit_cast<int64_t>(kRound);
  const double scale = std::bit_cast<double>(uint64_t(n_int + 1023) << 52);  // 2^n
  return under ? 0.0 : p * scale;
}

// 1 / (1 + exp(-x)), accurate to a few ulp, saturating cleanly (0 for x < -87, 1 for x > 88).
inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

}  // namespace loom::kernels::vec
