// model/gpt.cpp: the whole model as one GptStage (see gpt.h).
#include "model/gpt.h"

#include "core/error.h"
#include "kernels/cpu/grad_norm.h"

namespace loom::model {

Gpt::Gpt(const ModelConfig& cfg, MemoryPool& pool, Precision precision,
         const comm::ProcessGroup* tp)
    : stage_(cfg, whole_model_span(cfg), pool, precision, tp) {}

void Gpt::reduce_replicated_grads() {
  if (stage_.tp())
    sum_replicated_grads(layout().specs(), grads(), 0, layout().total(), *stage_.tp());
}

double Gpt::grad_sum_squares() const {
  if (!stage_.tp()) return kernels::sum_squares(grads(), layout().total());
  // Shards are disjoint across tp; replicated tensors are counted on tp rank 0 only.
  double ss = 0;
  for (const ParamSpec& s : layout().specs())
    if (!s.replicated() || stage_.tp()->rank() == 0)
      ss += kernels::sum_squares(grads() + s.offset, s.numel);
  stage_.tp()->all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
  return ss;
}

LossSum Gpt::forward_backward(const int32_t* tokens, int64_t B, int64_t T, float grad_scale,
                              const int32_t* domains) {
  LOOM_CHECK(B >= 1 && T >= 1, "batch B={} and sequence T={} must be positive", B, T);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  LossSum l;
  stage_.forward(0, inputs.data(), targets.data(), Tensor(), B, T, grad_scale, &l, domains);
  Tensor none;
  stage_.backward(0, none);
  return l;
}

LossSum Gpt::forward_loss(const int32_t* tokens, int64_t B, int64_t T, const int32_t* domains) {
  LOOM_CHECK(B >= 1 && T >= 1, "batch B={} and sequence T={} must be positive", B, T);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  LossSum l;
  stage_.forward_eval(inputs.data(), targets.data(), Tensor(), B, T, &l, domains);
  return l;
}

}  // namespace loom::model
