// kernels/cpu/matmul.h: dense matrix products through oneDNN (f32, and bf16 with f32 accumulation).
//
// Glossary: M, N, K the product's dimensions: C (M,N) = op(A) (M,K) @ op(B) (K,N).
//
// Contract
// - Row-major, densely packed (leading dimension = row length of the stored matrix).
// - op(A) = A stored (M,K), or A^T with A stored (K,M) when trans_a.
//   op(B) = B stored (K,N), or B^T with B stored (N,K) when trans_b.
//   Transposes are expressed as memory-descriptor strides: nothing is copied.
// - accumulate: C += op(A) @ op(B) (oneDNN post-op sum with scale 1); otherwise C is overwritten.
// - Pointers are the caller's, wrapped without copies; A, B must not alias C.
// - Sizes must be >= 0 (loom::Error otherwise). K == 0 gives C = 0 (or leaves C when accumulate).
// - Deterministic: one primitive per (M, N, K, trans_a, trans_b, accumulate, dtype) is created on
//   first use and cached for the life of the process; for a fixed thread count the same inputs
//   give bit-identical outputs. The cache is guarded by a mutex, so any thread may call, but do
//   not call from inside an OpenMP parallel region (oneDNN parallelises internally).
// - oneDNN failures throw loom::Error with the oneDNN status and the shape.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace loom::kernels {

void matmul_f32(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K,
                bool trans_a, bool trans_b, bool accumulate);

// How matmul_bf16 runs: oneDNN's native bf16 kernels, or the operands widened to f32 (exact) and
// the f32 kernel. Both compute bf16 inputs with f32 accumulation (a product of two bf16 values is
// exact in f32), so they differ only in summation order. LOOM_BF16_MATMUL=native|widen|auto picks;
// auto is a fixed rule (never a timing, so every process computes the same bits): native when
// the CPU has AMX-BF16, widen otherwise (oneDNN 2.6's bf16 kernels without AMX are slower than
// its f32 ones on the widened operands).
enum class Bf16MatmulPath { native, widen };
Bf16MatmulPath bf16_matmul_path();

// bf16 inputs, f32 accumulation and f32 output.
void matmul_bf16(const bf16* A, const bf16* B, float* C, int64_t M, int64_t N, int64_t K,
                 bool trans_a, bool trans_b, bool accumulate);

// Measured peak on this machine in GFLOP/s (2*M*N*K flops per product) of the matmul kernel
// f32 mode (bf16_mode false) or bf16 mode runs: matmul_bf16 on the native path, the f32 kernel
// on the widened one (bf16 mode then feeds it bf16-rounded f32 values). Times a 2048^3 product
// in three windows of ~0.15 s after a warm-up and returns the best window's rate. Used by the
// trainer and benchmarks to report the fraction of peak. Not cached.
double measure_matmul_peak_gflops(bool bf16_mode);

// Number of distinct oneDNN matmul primitives created so far (for tests of the cache).
int64_t matmul_primitive_cache_size();

}  // namespace loom::kernels
