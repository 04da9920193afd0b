// attention/vec16.h: the 16-float vector type the CPU attention kernels (flash_attention.cpp,
// paged_attention.cpp) are written in: GCC/Clang vector extensions, one AVX-512 register under
// -march=native (two AVX2 registers, or four SSE ones, elsewhere), so the kernels stay portable.
// Internal to those .cpp files: include it only there.
#pragma once

// Vectors passed by value in these inline helpers would warn that 64-byte vectors change the
// ABI without AVX-512; they never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cstdint>
#include <cstring>

namespace loom::attention::vec16 {

constexpr int64_t kLanes = 16;  // floats per vector (one AVX-512 register)

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// One broadcast instruction (Vec{} + x would add 0.0 first; a lane loop becomes 16 inserts).
inline Vec splat(float x) {
  static_assert(kLanes == 16);
  return Vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// a * b + c: GCC and Clang contract it into one FMA where the target has one (GCC's default
// -ffp-contract=fast), else two roundings; either way the same in every caller of one build.
inline Vec fmav(Vec a, Vec b, Vec c) { return a * b + c; }

}  // namespace loom::attention::vec16
