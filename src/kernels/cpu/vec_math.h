// kernels/cpu/vec_math.h: inlineable float math that GCC vectorises inside `omp simd` loops.
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

// 1 / (1 + exp(-x)), accurate to a few ulp, saturating cleanly (0 for x < -87, 1 for x > 88).
inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

}  // namespace loom::kernels::vec
