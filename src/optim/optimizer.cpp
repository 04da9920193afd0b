#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/grad_norm.h"

namespace loom::optim {

float lr_at(const AdamWConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps)
    return c.lr * float(step) / float(c.warmup_steps);
  if (c.decay_steps <= 0) return c.lr;
  if (step >= c.decay_steps) return c.min_lr;
  double span = double(std::max<int64_t>(1, c.decay_steps - c.warmup_steps));
  double progress = double(step - c.warmup_steps) / span;
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return float(c.min_lr + (c.lr - c.min_lr) * cosine);
}

AdamW::AdamW(const model::ParamLayout& layout, const AdamWConfig& cfg, MemoryPool& pool,
             int64_t begin, int64_t end)
    : layout_(layout), cfg_(cfg), begin_(begin), end_(end) {
  LOOM_CHECK(0 <= begin && begin <= end && end <= layout.total(),
             "optimizer range [{}, {}) outside the {} parameters", begin, end, layout.total());
  LOOM_CHECK(cfg.lr > 0 && cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1 &&
                 cfg.eps > 0 && cfg.weight_decay >= 0,
             "invalid AdamW settings lr={} beta1={} beta2={} eps={} weight_decay={}: need lr > 0, "
             "0 <= beta < 1, eps > 0, weight_decay >= 0",
             cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
  m_ = Tensor::zeros({end - begin}, DType::f32, pool, MemCategory::optimizer);
  v_ = Tensor::zeros({end - begin}, DType::f32, pool, MemCategory::optimizer);
}

void AdamW::step(float* weights, const float* grads, float grad_scale) {
  ++step_;
  const float lr = lr_at(cfg_, step_);
  // Walk the parameter tensors overlapping [begin, end): decay differs per tensor.
  for (const model::ParamSpec& s : layout_.specs()) {
    int64_t lo = std::max(s.offset, begin_), hi = std::min(s.offset + s.numel, end_);
    if (lo >= hi) continue;
    kernels::adamw_step(weights + lo, grads + lo, m() + (lo - begin_), v() + (lo - begin_),
                        hi - lo, lr, cfg_.beta1, cfg_.beta2, cfg_.eps,
                        s.weight_decay ? cfg_.weight_decay : 0.f, step_, grad_scale);
  }
}

double grad_norm(const float* grads, int64_t n) { return std::sqrt(kernels::sum_squares(grads, n)); }

}  // namespace loom::optim
