// kernels/cpu/cross_entropy.h: tied LM head fused with softmax cross-entropy, and plain logits.
//
// Glossary: N token rows (B*T), C model width, V vocabulary, wte (V,C) the token embedding that
// doubles as the output projection.
//
// cross_entropy_head: for each row r with targets[r] >= 0,
//   logits_r = h[r] (C) @ wte^T (V)       loss_r = logsumexp(logits_r) - logits_r[targets[r]].
//   Returns the SUM of loss_r over counted rows (f64, summed in row order) and writes
//   *n_counted (may be null). Rows with targets[r] < 0 are ignored (no loss, zero gradient).
//   Backward is fused and happens only when dh or dwte is non-null:
//     dh   (N,C) is OVERWRITTEN with grad_scale * d(loss sum)/dh (ignored rows get 0);
//     dwte (V,C) is ACCUMULATED with grad_scale * d(loss sum)/dwte.
//   Callers pass grad_scale = 1 / (total counted tokens) for a mean loss.
// Memory: the (N,V) logits are never materialised. Rows go in blocks of at most rows_per_block
//   (default 64); the block's (rows_per_block, V) f32 logits (plus, for bf16, a (rows_per_block, V)
//   bf16 copy of their gradient) is the only O(V) workspace, allocated from `pool` under
//   MemCategory::workspace and released before returning.
// Numerics: matmuls through matmul_f32 / matmul_bf16 (f32 accumulation); max, exp, sum and
//   softmax in f32; the per-row log-sum-exp and loss in f64.
// Failure: a target >= V, N < 0, C <= 0, V <= 0 or rows_per_block < 1 throws loom::Error before
//   any output is written.
// Deterministic and, for a fixed thread count, bit-reproducible.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/memory_pool.h"

namespace loom::kernels {

// `round_grad_to_bf16`: round the logits gradient to bf16 values before the two backward
// products. With h and wte holding bf16 values (f32 storage), this computes exactly what
// cross_entropy_head_bf16 computes when its matmuls widen to f32 (the bf16 emulation path).
double cross_entropy_head(float* dh, float* dwte, int64_t* n_counted, const float* h,
                          const float* wte, const int32_t* targets, int64_t N, int64_t C,
                          int64_t V, float grad_scale, MemoryPool& pool, int64_t rows_per_block = 64,
                          bool round_grad_to_bf16 = false);

// bf16 variant: h and wte in bf16 (the matmul inputs); the logits gradient is rounded to bf16 for
// the two backward products (as autocast does); softmax, dh and dwte in f32.
double cross_entropy_head_bf16(float* dh, float* dwte, int64_t* n_counted, const bf16* h,
                               const bf16* wte, const int32_t* targets, int64_t N, int64_t C,
                               int64_t V, float grad_scale, MemoryPool& pool, int64_t rows_per_block = 64);

// Inference: logits (N,V) = h (N,C) @ wte^T, overwritten.
void logits_forward(float* logits, const float* h, const float* wte, int64_t N, int64_t C, int64_t V);
void logits_forward_bf16(float* logits, const bf16* h, const bf16* wte, int64_t N, int64_t C, int64_t V);

}  // namespace loom::kernels
