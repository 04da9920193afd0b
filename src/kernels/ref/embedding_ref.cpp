// kernels/ref/embedding_ref.cpp
#include "kernels/ref/embedding_ref.h"

#include "core/error.h"

namespace loom::kernels::ref {

namespace {
void check_ids(const int32_t* tokens, int64_t n, int64_t T, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    LOOM_CHECK(tokens[i] >= 0 && int64_t(tokens[i]) < V,
               "token id {} at position (b={}, t={}) is outside the vocabulary [0, V={})",
               tokens[i], i / T, i % T, V);
}
}  // namespace

void embedding_forward(double* out, const int32_t* tokens, const double* wte, const double* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset) {
  check_ids(tokens, B * T, T, V);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        out[(b * T + t) * C + c] =
            wte[int64_t(tokens[b * T + t]) * C + c] + wpe[(pos_offset + t) * C + c];
}

void embedding_backward(double* dwte, double* dwpe, const double* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset) {
  check_ids(tokens, B * T, T, V);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        double g = dout[(b * T + t) * C + c];
        dwte[int64_t(tokens[b * T + t]) * C + c] += g;
        if (dwpe) dwpe[(pos_offset + t) * C + c] += g;
      }
}

void position_forward(double* out, const double* table, int64_t B, int64_t T, int64_t C,
                      int64_t pos_offset) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) out[(b * T + t) * C + c] = table[(pos_offset + t) * C + c];
}

void position_backward(double* dtable, const double* dout, int64_t B, int64_t T, int64_t C,
                       int64_t pos_offset) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) dtable[(pos_offset + t) * C + c] += dout[(b * T + t) * C + c];
}

}  // namespace loom::kernels::ref
