// kernels/ref/weight_matmul_ref.h: float64 reference for cpu/weight_matmul.h.
// The weight is first expanded to doubles (f32 as is, bf16 widened, int8 as scales[n] * q[n, k],
// all exact in double), then y = x @ W^T + bias is summed in double, k in order 0..K-1.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/weight_matmul.h"

namespace loom::kernels::ref {

// W (N, K) as doubles from its storage format.
std::vector<double> weight_to_f64(const WeightView& w);

// y (M, N) with row stride ldy (0 means N) = x (M, K) @ W^T (W (N, K)) + bias (N, or null).
// Columns N..ldy-1 of y are left as they are.
void weight_matmul(double* y, int64_t ldy, const double* x, int64_t M, const double* W, int64_t N,
                   int64_t K, const double* bias);

}  // namespace loom::kernels::ref
