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

AdamW::AdamW(std::vector<ParamSpec> specs, int64_t total, const AdamWConfig& cfg,
             MemoryPool& pool, std::vector<Range> ranges)
    : specs_(std::move(specs)), cfg_(cfg), ranges_(std::move(ranges)) {
  LOOM_CHECK(!ranges_.empty(), "optimizer needs at least one range");
  int64_t prev = 0;
  for (const Range& r : ranges_) {
    LOOM_CHECK(prev <= r.begin && r.begin <= r.end && r.end <= total,
               "optimizer range [{}, {}) is outside the {} parameters or out of order", r.begin,
               r.end, total);
    prev = r.end;
    size_ += r.end - r.begin;
  }
  begin_ = ranges_.front().begin;
  end_ = ranges_.back().end;
  LOOM_CHECK(cfg.lr > 0 && cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1 &&
                 cfg.eps > 0 && cfg.weight_decay >= 0,
             "invalid AdamW settings lr={} beta1={} beta2={} eps={} weight_decay={}: need lr > 0, "
             "0 <= beta < 1, eps > 0, weight_decay >= 0",
             cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
  m_ = Tensor::zeros({size_}, DType::f32, pool, MemCategory::optimizer);
  v_ = Tensor::zeros({size_}, DType::f32, pool, MemCategory::optimizer);
}

namespace {
// Walks the parameter tensors overlapping each range (decay differs per tensor): f(lo, hi,
// packed offset of lo, spec).
template <class F>
void for_each_piece(const std::vector<ParamSpec>& specs, const std::vector<Range>& ranges,
                    F&& f) {
  int64_t packed = 0;
  for (const Range& r : ranges) {
    for (const ParamSpec& s : specs) {
      int64_t lo = std::max(s.offset, r.begin), hi = std::min(s.offset + s.numel, r.end);
      if (lo < hi) f(lo, hi, packed + (lo - r.begin), s);
    }
    packed += r.end - r.begin;
  }
}
}  // namespace

void AdamW::step(float* weights, const float* grads, float grad_scale) {
  step_impl(weights, grads, grad_scale, /*packed=*/false);
}

void AdamW::step_compact(float* weights, const float* grads, float grad_scale) {
  step_impl(weights, grads, grad_scale, /*packed=*/true);
}

void AdamW::step_at(const std::function<float*(int64_t)>& weight_at, const float* grads,
                    float grad_scale) {
  step_impl(nullptr, grads, grad_scale, /*packed=*/false, &weight_at);
}

void AdamW::step_impl(float* weights, const float* grads, float grad_scale, bool packed,
                      const std::function<float*(int64_t)>* weight_at) {
  ++step_;
  const float lr = lr_at(cfg_, step_);
  for_each_piece(specs_, ranges_, [&](int64_t lo, int64_t hi, int64_t p, const ParamSpec& s) {
    if (!s.trainable) return;  // frozen buffers (rre tables) keep their values and zero moments
    const int64_t at = packed ? p : lo;  // where weights/grads hold element lo
    float* w = weight_at ? (*weight_at)(lo) : weights + at;
    kernels::adamw_step(w, grads + at, m() + p, v() + p, hi - lo, lr, cfg_.beta1,
                        cfg_.beta2, cfg_.eps, s.weight_decay ? cfg_.weight_decay : 0.f, step_,
                        grad_scale);
  });
}

double grad_norm(const float* grads, int64_t n) { return std::sqrt(kernels::sum_squares(grads, n)); }

}  // namespace loom::optim
