// model/gpt.h: the whole decoder-only transformer (GPT-2 / PanGu-α / CodeGeeX) in one process:
// a thin convenience over the model executor, model::GptStage (stage.h), holding the one stage
// that spans every block, the embeddings and the head. Training of any layout goes through
// train::Executor; this class serves evaluation, generation, initialisation and tests. It adds no
// kernel chain of its own.
//
// Glossary: B batch, T sequence, V vocab.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/stage.h"

namespace loom::model {

class Gpt {
 public:
  // Allocates weights (f32 master, plus the low-precision copy in bf16 mode) and grads from
  // `pool`; weights are uninitialised until init_weights() or a checkpoint load writes them.
  // `tp` (optional): tensor parallel (see GptStage); every member calls every method collectively.
  Gpt(const ModelConfig& cfg, MemoryPool& pool, Precision precision,
      const comm::ProcessGroup* tp = nullptr);

  const ModelConfig& config() const { return stage_.config(); }
  // This tp rank's layout; the whole model's buffer is in this order.
  const ParamLayout& layout() const { return stage_.global_layout(); }
  Precision precision() const { return stage_.precision(); }
  float* weights() const { return stage_.weights(); }  // (layout().total())
  float* grads() const { return stage_.grads(); }      // (layout().total())
  void init_weights(uint64_t seed) { stage_.init_weights(seed); }
  void zero_grads() { stage_.zero_grads(); }
  void sync_low_precision_weights() { stage_.sync_low_precision_weights(); }
  void set_recompute(Recompute mode) { stage_.set_recompute(mode); }
  void set_recompute(const std::vector<Recompute>& per_layer) { stage_.set_recompute(per_layer); }
  int tp_size() const { return stage_.tp_size(); }
  GptStage& stage() { return stage_; }
  // Called with each range of grads() whose gradient got its last contribution of the running
  // forward_backward (see GptStage::set_grad_ready_hook).
  void set_grad_ready_hook(GptStage::GradReadyHook hook) { stage_.set_grad_ready_hook(std::move(hook)); }

  // tp: sums the replicated parameters' partial gradients over the tp group. No-op without tp.
  void reduce_replicated_grads();
  // Sum of squares of the whole model's gradient (tp: every tensor counted once, summed over the
  // group). Call after reduce_replicated_grads().
  double grad_sum_squares() const;

  // One micro-batch: tokens (B, T+1) int32, inputs [:, :T], targets [:, 1:] (targets < 0 are
  // ignored). Runs forward and backward, ACCUMULATING into grads() the gradient of
  // grad_scale * (summed loss). Returns the summed loss and token count. Throws loom::Error on
  // T > max_seq or token ids outside [0, V) (before anything is modified). MoE models: `domains`
  // (B,T) the input tokens' domains (see GptStage::forward; null: "other").
  LossSum forward_backward(const int32_t* tokens, int64_t B, int64_t T, float grad_scale,
                           const int32_t* domains = nullptr);
  // Forward only (evaluation): the summed loss. Allocates no gradient-sized buffers.
  LossSum forward_loss(const int32_t* tokens, int64_t B, int64_t T,
                       const int32_t* domains = nullptr);
  // Logits of the last position of each row: inputs (B, T) -> logits (B, V) f32. (Not under tp.)
  void last_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
    stage_.logits(logits, inputs, B, T, /*last_only=*/true);
  }
  // Full logits for every position: inputs (B,T) -> logits (B,T,V).
  void all_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
    stage_.logits(logits, inputs, B, T, /*last_only=*/false);
  }

 private:
  GptStage stage_;
};

}  // namespace loom::model
