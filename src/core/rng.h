// core/rng.h: counter-based random numbers (Philox4x32-10).
//
// A value depends only on (seed, stream, offset), never on which rank or thread draws it, so
// every parallel layout initialises identical logical weights: a shard of a weight draws the
// offsets of its logical elements. Streams separate independent uses (one per parameter tensor,
// one for data, one for dropout, ...).
#pragma once

#include <array>
#include <cstdint>

namespace loom {

// The raw generator: 4 x 32 random bits for counter `offset` in (seed, stream).
std::array<uint32_t, 4> philox4x32(uint64_t seed, uint64_t stream, uint64_t offset);

// Uniform in [0, 1) with 24 random bits, for element `offset`.
float rng_uniform(uint64_t seed, uint64_t stream, uint64_t offset);
// Standard normal (Box-Muller on one Philox block), for element `offset`.
float rng_normal(uint64_t seed, uint64_t stream, uint64_t offset);
// Uniform 64-bit integer for element `offset`.
uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t offset);

// out[i] = mean + std * normal(seed, stream, first_offset + i), for i in [0, n).
void rng_fill_normal(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream,
                     uint64_t first_offset);
// out[i] = lo + (hi - lo) * uniform(seed, stream, first_offset + i).
void rng_fill_uniform(float* out, int64_t n, float lo, float hi, uint64_t seed, uint64_t stream,
                      uint64_t first_offset);

// A stable 64-bit stream id from a name (FNV-1a), e.g. rng_stream_id("blocks.3.attn.q.weight").
uint64_t rng_stream_id(const char* name);

}  // namespace loom
