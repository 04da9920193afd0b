#include "core/rng.h"

#include <cmath>

namespace loom {

// Philox4x32-10 (Salmon et al., SC'11): 10 rounds of a multiply-xor Feistel-like bijection on a
// 128-bit counter, keyed by 64 bits. Counter = (offset lo, offset hi, stream lo, stream hi),
// key = seed.
std::array<uint32_t, 4> philox4x32(uint64_t seed, uint64_t stream, uint64_t offset) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32);
  uint32_t c2 = uint32_t(stream), c3 = uint32_t(stream >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = uint64_t(kM0) * c0;
    uint64_t p1 = uint64_t(kM1) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = uint32_t(p1);
    uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = uint32_t(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

float rng_uniform(uint64_t seed, uint64_t stream, uint64_t offset) {
  return float(philox4x32(seed, stream, offset)[0] >> 8) * (1.0f / 16777216.0f);
}

uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t offset) {
  auto r = philox4x32(seed, stream, offset);
  return (uint64_t(r[1]) << 32) | r[0];
}

float rng_normal(uint64_t seed, uint64_t stream, uint64_t offset) {
  auto r = philox4x32(seed, stream, offset);
  // u1 in (0, 1] so log(u1) is finite; 32-bit resolution from two words each.
  double u1 = (double(r[0]) + 1.0) / 4294967296.0;
  double u2 = double(r[1]) / 4294967296.0;
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

void rng_fill_normal(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream,
                     uint64_t first_offset) {
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i) out[i] = mean + std * rng_normal(seed, stream, first_offset + i);
}

void rng_fill_uniform(float* out, int64_t n, float lo, float hi, uint64_t seed, uint64_t stream,
                      uint64_t first_offset) {
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i)
    out[i] = lo + (hi - lo) * rng_uniform(seed, stream, first_offset + i);
}

uint64_t rng_stream_id(const char* name) {
  uint64_t h = 1469598103934665603ull;
  for (const char* p = name; *p; ++p) {
    h ^= uint8_t(*p);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace loom
