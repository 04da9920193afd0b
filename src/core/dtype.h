// core/dtype.h: element types and bf16 / f16 conversion.
//
// bf16 is the top 16 bits of an IEEE f32. Conversion f32 -> bf16 rounds to nearest even (NaN
// stays NaN); bf16 -> f32 is exact. f16 is IEEE binary16 (1 sign, 5 exponent, 10 mantissa bits;
// subnormals below 2^-14): f32 -> f16 rounds to nearest even (overflow to +-inf, NaN stays NaN,
// tiny values to subnormals or zero), f16 -> f32 is exact. Checkpoints store weights in either
// (checkpoint/sharded.h); compute never uses f16.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace loom {

// f64 exists for reading reference files (tests); training buffers never use it.
enum class DType : uint8_t { f32, bf16, i32, i64, u8, i8, f64, f16 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
    case DType::i8: return 1;
    case DType::f64: return 8;
    case DType::f16: return 2;
  }
  return 0;
}

// Names as safetensors writes them: F32, BF16, I32, I64, U8, I8, F64, F16.
std::string_view dtype_name(DType t);
// Parses a safetensors dtype name; throws loom::Error naming the accepted names otherwise.
DType dtype_from_name(std::string_view name);

struct bf16 {
  uint16_t bits = 0;
};

inline float bf16_to_f32(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return bf16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}

// IEEE half (bits) <-> f32, as described at the top.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Bulk conversions (vectorised where the compiler can).
void convert_f32_to_bf16(const float* src, bf16* dst, size_t n);
void convert_bf16_to_f32(const bf16* src, float* dst, size_t n);
// dst[i] = src[i] rounded to the nearest bf16 value, kept as f32 (dst may equal src).
void round_f32_to_bf16(const float* src, float* dst, size_t n);
void convert_f32_to_f16(const float* src, uint16_t* dst, size_t n);
void convert_f16_to_f32(const uint16_t* src, float* dst, size_t n);

}  // namespace loom
