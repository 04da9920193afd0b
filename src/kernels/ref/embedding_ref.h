// kernels/ref/embedding_ref.h: float64 references for cpu/embedding.h (same contracts, same
// token-id checks: an id outside [0, V) throws loom::Error).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void embedding_forward(double* out, const int32_t* tokens, const double* wte, const double* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset);
void embedding_backward(double* dwte, double* dwpe, const double* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset);
void position_forward(double* out, const double* table, int64_t B, int64_t T, int64_t C,
                      int64_t pos_offset);
void position_backward(double* dtable, const double* dout, int64_t B, int64_t T, int64_t C,
                       int64_t pos_offset);

}  // namespace loom::kernels::ref
