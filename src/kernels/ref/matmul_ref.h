// kernels/ref/matmul_ref.h: naive float64 matrix product, the reference for cpu/matmul.h.
// Same contract as loom::kernels::matmul_f32 (row-major, trans_a / trans_b select the stored
// layout, accumulate adds into C), in double, summing k in order 0..K-1.
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

void matmul(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K,
            bool trans_a, bool trans_b, bool accumulate);
// Same function under the fast kernel's name.
inline void matmul_f32(const double* A, const double* B, double* C, int64_t M, int64_t N,
                       int64_t K, bool trans_a, bool trans_b, bool accumulate) {
  matmul(A, B, C, M, N, K, trans_a, trans_b, accumulate);
}

}  // namespace loom::kernels::ref
