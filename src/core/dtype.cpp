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
  }
  return "?";
}

DType dtype_from_name(std::string_view name) {
  for (DType t : {DType::f32, DType::bf16, DType::i32, DType::i64, DType::u8, DType::i8, DType::f64})
    if (dtype_name(t) == name) return t;
  LOOM_FAIL("unknown dtype '{}'; loom reads F32, BF16, I32, I64, U8, I8, F64", name);
}

void convert_f32_to_bf16(const float* src, bf16* dst, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void convert_bf16_to_f32(const bf16* src, float* dst, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void round_f32_to_bf16(const float* src, float* dst, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(f32_to_bf16(src[i]));
}

}  // namespace loom
