#include "model/memory.h"

#include <algorithm>

#include "model/stage.h"

namespace loom::model {

namespace {

// Bytes one block keeps after its forward in `mode`, including its output (N,C) f32, which the
// next block keeps as its input. Mirrors block_forward in gpt.cpp.
int64_t block_kept_bytes(const ModelConfig& cfg, int64_t B, int64_t T, bool bf, Recompute mode) {
  const int64_t N = B * T, C = cfg.d_model, KV = cfg.kv_dim(), F = cfg.d_ff, NH = cfg.n_heads;
  // Matmul-input copies: bf16 (2 bytes), or f32 holding bf16 values when bf16 is emulated.
  const int64_t f = 4, h = bf16_emulated() ? 4 : 2;
  int64_t out = N * C * f;
  if (mode == Recompute::full) return out;
  // selective: norm statistics, q|k|v, attention output and lse, mid residual, pre-activation
  int64_t sel = 4 * N * f + N * (C + 2 * KV) * f + N * C * f + N * NH * f + N * C * f +
                N * F * f + out;
  if (mode == Recompute::selective) return sel;
  // none: also the matmul inputs (norm outputs, attention output copy in bf16, activation)
  if (bf) return sel + N * C * h + N * C * h + N * C * h + N * F * h;
  return sel + N * C * f + N * C * f + N * F * f;
}

}  // namespace

MemoryEstimate estimate_training_memory(const ModelConfig& cfg, int64_t B, int64_t T,
                                        Precision precision, Recompute recompute) {
  const bool bf = precision == Precision::bf16;
  const int64_t P = cfg.num_params(), N = B * T, C = cfg.d_model;
  MemoryEstimate m;
  m.weights = P * 4 + (bf ? P * (bf16_emulated() ? 4 : 2) : 0);
  m.grads = P * 4;
  m.optimizer = 2 * P * 4;
  // End of forward: embedding output, every block's stash, the final norm (output and
  // statistics), the query layer's stash, and d(head input) (N,C), which the fused head +
  // cross-entropy computes in the forward and the backward consumes.
  int64_t forward_end = N * C * 4 + cfg.n_layers * block_kept_bytes(cfg, B, T, bf, recompute) +
                        N * C * 4 + 2 * N * 4 + N * C * 4;
  if (cfg.query_layer) forward_end += block_kept_bytes(cfg, B, T, bf, recompute);
  int64_t peak = forward_end;
  if (recompute == Recompute::full) {
    // Backward of the top block re-runs its forward keeping everything. By then the head input
    // has been freed; without a query layer so have the final norm's buffers and the last block's
    // output (only the final norm held them).
    int64_t freed = cfg.query_layer ? N * C * 4 : N * C * 4 + 2 * N * 4 + N * C * 4;
    peak = std::max(peak, forward_end - freed + block_kept_bytes(cfg, B, T, bf, Recompute::none));
  }
  m.activations = peak;
  return m;
}

}  // namespace loom::model
