// optim/optimizer.h: AdamW over flat f32 master buffers, learning-rate schedule, clipping.
//
// The optimizer owns m and v (category `optimizer`) for a contiguous range [begin, end) of the
// flat parameter buffer, so ZeRO can give each rank its shard. Weight decay applies per
// parameter tensor (ParamSpec::weight_decay: matrices and embeddings, never biases or norms), as
// PyTorch param groups would.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/memory_pool.h"
#include "core/tensor.h"
#include "core/param_spec.h"

namespace loom::optim {

struct AdamWConfig {
  float lr = 3e-4f;
  float min_lr = 3e-5f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float clip = 1.0f;          // max global grad norm; <= 0 disables clipping
  int64_t warmup_steps = 0;   // linear warmup from 0 to lr
  int64_t decay_steps = 0;    // cosine from lr to min_lr over [warmup, decay_steps]; 0 = constant
};

// Learning rate at 1-based step `step`: linear warmup (step/warmup * lr), then cosine decay to
// min_lr at decay_steps, then min_lr. decay_steps = 0 keeps lr constant after warmup.
float lr_at(const AdamWConfig& c, int64_t step);

struct Range {
  int64_t begin = 0, end = 0;
};

class AdamW {
 public:
  // A flat buffer of `total` elements holding the tensors `specs` (ParamSpec::offset is the
  // position in that buffer, e.g. a model's or one pipeline chunk's). Manages the union of
  // disjoint ascending `ranges` of it (ZeRO: a rank's share or its piece of every unit); m and v
  // hold them packed in range order ("compact").
  AdamW(std::vector<ParamSpec> specs, int64_t total, const AdamWConfig& cfg, MemoryPool& pool,
        std::vector<Range> ranges);
  // The whole buffer.
  AdamW(std::vector<ParamSpec> specs, int64_t total, const AdamWConfig& cfg, MemoryPool& pool)
      : AdamW(std::move(specs), total, cfg, pool, std::vector<Range>{{0, total}}) {}

  // One update of weights[begin,end) from grads[begin,end) (both indexed like the full flat
  // buffer). grad_scale multiplies every gradient (clipping factor). Increments step().
  void step(float* weights, const float* grads, float grad_scale);
  // The same with weights and grads packed like m and v (size() floats each).
  void step_compact(float* weights, const float* grads, float grad_scale);
  // The same with grads indexed like the full buffer and the weights wherever weight_at(x) says
  // element x is (contiguous within each managed range's part of one tensor): a buffer with
  // holes (model::HoleyLayout).
  void step_at(const std::function<float*(int64_t)>& weight_at, const float* grads,
               float grad_scale);

  int64_t step_count() const { return step_; }
  void set_step_count(int64_t s) { step_ = s; }
  float current_lr() const { return lr_at(cfg_, step_ + 1); }
  const AdamWConfig& config() const { return cfg_; }
  float* m() const { return m_.data<float>(); }  // (end-begin)
  float* v() const { return v_.data<float>(); }
  // Single range: its bounds. Several: the first begin and the last end.
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  const std::vector<Range>& ranges() const { return ranges_; }
  int64_t size() const { return size_; }  // managed elements

 private:
  // packed: weights/grads indexed like m and v; else like the full flat buffer.
  // weight_at (non-null): where element lo's weight is, instead of weights.
  void step_impl(float* weights, const float* grads, float grad_scale, bool packed,
                 const std::function<float*(int64_t)>* weight_at = nullptr);

  std::vector<ParamSpec> specs_;
  AdamWConfig cfg_;
  int64_t begin_, end_;
  std::vector<Range> ranges_;
  int64_t size_ = 0;
  Tensor m_, v_;
  int64_t step_ = 0;
};

// Global L2 norm of grads[0, n) (f64 accumulation, deterministic).
double grad_norm(const float* grads, int64_t n);

}  // namespace loom::optim
