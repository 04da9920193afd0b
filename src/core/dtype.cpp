#include "core/dtype.h"

#include "core/error.h"

namespace loom {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
    case DType::i8: return "I8";
    case DType::f64: return "F64";
    case DType::f16: return "F16";
  }
  return "?";
}

DType dtype_from_name(std::string_view name) {
  for (DType t : {DType::f32, DType::bf16, DType::i32, DType::i64, DType::u8, DType::i8, DType::f64,
                  DType::f16})
    if (dtype_name(t) == name) return t;
  LOOM_FAIL("unknown dtype '{}'; loom reads F32, BF16, F16, I32, I64, U8, I8, F64", name);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u)  // inf stays inf; NaN stays a (quiet) NaN
    return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal (or zero) in f16, units of 2^-24
    if (a < 0x33000000u) return sign;  // below 2^-25 (half the smallest subnormal): 0
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;  // value = m * 2^(e-150)
    const uint32_t shift = 126 - e;  // value / 2^-24 = m >> (126 - e)
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);  // q = 0x400 (carry into the exponent) is the right bits too
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even (a carry
  // into the exponent, up to inf, is the right result).
  uint32_t r = a - 0x38000000u;  // exponent - 112
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

// Element-wise conversions: split over the threads above 64 Ki elements. Below, a plain loop and
// no parallel region at all: `#pragma omp parallel ... if (false)` still enters the OpenMP
// runtime (a team of one), which cost ~0.3 us a call and ~1.3% of a batch-8 decode step, whose
// KV-cache writes convert 2 x 768 elements a row (session 23).
namespace {
constexpr size_t kParallelConvert = 65536;
template <typename F>
inline void convert_each(size_t n, F f) {
  if (n > kParallelConvert) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) f(i);
  } else {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) f(i);
  }
}
}  // namespace

void convert_f32_to_bf16(const float* src, bf16* dst, size_t n) {
  convert_each(n, [&](size_t i) { dst[i] = f32_to_bf16(src[i]); });
}

void convert_bf16_to_f32(const bf16* src, float* dst, size_t n) {
  convert_each(n, [&](size_t i) { dst[i] = bf16_to_f32(src[i]); });
}

void convert_f32_to_f16(const float* src, uint16_t* dst, size_t n) {
  convert_each(n, [&](size_t i) { dst[i] = f32_to_f16(src[i]); });
}

void convert_f16_to_f32(const uint16_t* src, float* dst, size_t n) {
  convert_each(n, [&](size_t i) { dst[i] = f16_to_f32(src[i]); });
}

void round_f32_to_bf16(const float* src, float* dst, size_t n) {
  convert_each(n, [&](size_t i) { dst[i] = bf16_to_f32(f32_to_bf16(src[i])); });
}

}  // namespace loom
