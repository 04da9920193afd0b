// kernels/cpu/embedding.cpp
// Glossary: B batch, T sequence, C width, V vocabulary, BT = B*T token rows.
#include "kernels/cpu/embedding.h"

#include <algorithm>

#include "core/error.h"

namespace loom::kernels {

namespace {
constexpr int64_t kColBlock = 64;  // columns of C per task in the scatter
constexpr int64_t kParallelMin = 1 << 14;
}  // namespace

void check_token_ids(const int32_t* tokens, int64_t B, int64_t T, int64_t V) {
  // Serial on purpose: it is cheap next to the lookup, and an exception must not leave an
  // OpenMP region.
  for (int64_t i = 0; i < B * T; ++i) {
    int32_t id = tokens[i];
    LOOM_CHECK(id >= 0 && int64_t(id) < V,
               "token id {} at position (b={}, t={}) is outside the vocabulary [0, V={}); the "
               "data or tokenizer does not match the model's vocab_size",
               id, i / T, i % T, V);
  }
}

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset) {
  LOOM_CHECK(pos_offset >= 0, "embedding_forward: pos_offset={} must be >= 0", pos_offset);
  check_token_ids(tokens, B, T, V);
#pragma omp parallel for schedule(static) if (B * T * C > kParallelMin)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float* e = wte + int64_t(tokens[bt]) * C;     // (C)
    const float* p = wpe + (pos_offset + bt % T) * C;   // (C)
    float* o = out + bt * C;                            // (C)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = e[c] + p[c];
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset) {
  LOOM_CHECK(pos_offset >= 0, "embedding_backward: pos_offset={} must be >= 0", pos_offset);
  check_token_ids(tokens, B, T, V);
  const int64_t n_blocks = (C + kColBlock - 1) / kColBlock;
  // dwte: repeated tokens add into the same row, so rows cannot be split across threads; columns
  // can. Each task owns columns [c0, c1) of every row and visits tokens in order.
#pragma omp parallel for schedule(static) if (B * T * C > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t c0 = blk * kColBlock, c1 = std::min(C, c0 + kColBlock);
    for (int64_t bt = 0; bt < B * T; ++bt) {
      float* d = dwte + int64_t(tokens[bt]) * C;
      const float* g = dout + bt * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
    }
  }
  if (dwpe) position_backward(dwpe, dout, B, T, C, pos_offset);
}

void position_forward(float* out, const float* table, int64_t B, int64_t T, int64_t C,
                      int64_t pos_offset) {
  LOOM_CHECK(pos_offset >= 0, "position_forward: pos_offset={} must be >= 0", pos_offset);
#pragma omp parallel for schedule(static) if (B * T * C > kParallelMin)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float* p = table + (pos_offset + bt % T) * C;
    std::copy(p, p + C, out + bt * C);
  }
}

void position_backward(float* dtable, const float* dout, int64_t B, int64_t T, int64_t C,
                       int64_t pos_offset) {
  LOOM_CHECK(pos_offset >= 0, "position_backward: pos_offset={} must be >= 0", pos_offset);
  // Each position row is owned by one iteration; the batch is summed in order b = 0..B-1.
#pragma omp parallel for schedule(static) if (B * T * C > kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* d = dtable + (pos_offset + t) * C;  // (C)
    for (int64_t b = 0; b < B; ++b) {
      const float* g = dout + (b * T + t) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) d[c] += g[c];
    }
  }
}

}  // namespace loom::kernels
