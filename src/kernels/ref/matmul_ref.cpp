// kernels/ref/matmul_ref.cpp
#include "kernels/ref/matmul_ref.h"

namespace loom::kernels::ref {

void matmul(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K,
            bool trans_a, bool trans_b, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        double a = trans_a ? A[k * M + i] : A[i * K + k];  // op(A)[i,k]
        double b = trans_b ? B[j * K + k] : B[k * N + j];  // op(B)[k,j]
        s += a * b;
      }
      C[i * N + j] = accumulate ? C[i * N + j] + s : s;
    }
  }
}

}  // namespace loom::kernels::ref
