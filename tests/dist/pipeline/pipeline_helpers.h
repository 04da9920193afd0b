// tests/dist/pipeline/pipeline_helpers.h: the tiny model, deterministic batches and the serial
// reference (one Gpt + AdamW) shared by the pipeline tests.
//
// Glossary: M micro-batches per step, B micro-batch size, T sequence, V vocab.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/memory_pool.h"
#include "kernels/cpu/grad_norm.h"
#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace loom::pipeline_test {

// The tiny-like model of the brief: d_model 32, query layer on, vocab 97 (prime, so no
// accidental alignment with any block size).
inline model::ModelConfig tiny_config(int64_t n_layers) {
  model::ModelConfig c;
  c.name = "pipeline-tiny";
  c.vocab = 97;
  c.n_layers = n_layers;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.d_ff = 64;
  c.max_seq = 16;
  c.query_layer = true;
  c.validate();
  return c;
}

inline optim::AdamWConfig test_adamw() {
  optim::AdamWConfig o;
  o.lr = 3e-3f;
  o.min_lr = 3e-4f;
  o.warmup_steps = 2;
  o.decay_steps = 6;
  // Low enough that clipping is active on some steps, so the global norm matters.
  o.clip = 0.5f;
  return o;
}

// (M, B, T+1) windows for step `step`: a fixed hash of (step, index), so every rank builds the
// same batches without communicating.
inline std::vector<int32_t> step_tokens(int step, int64_t M, int64_t B, int64_t T, int64_t V) {
  std::vector<int32_t> t(size_t(M * B * (T + 1)));
  for (size_t i = 0; i < t.size(); ++i) {
    uint64_t z = uint64_t(step) * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull + 12345;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    t[i] = int32_t(z % uint64_t(V));
  }
  return t;
}

struct SerialRun {
  std::vector<double> losses;      // (steps) mean loss per counted token
  std::vector<double> grad_norms;  // (steps) before clipping
  std::vector<float> weights;      // (layout.total()) after the steps
  double eval_loss = 0;            // forward-only mean loss of eval_tokens(...) after the steps
};

// kEvalBatches windows (kEvalBatches, B, T+1) that no training step uses.
constexpr int64_t kEvalBatches = 2;
inline std::vector<int32_t> eval_tokens(int64_t B, int64_t T, int64_t V) {
  return step_tokens(1000, kEvalBatches, B, T, V);
}

// The single-rank reference: Gpt + AdamW exactly as train/trainer.cpp runs a step.
inline SerialRun run_serial(const model::ModelConfig& cfg, int steps, int64_t M, int64_t B,
                            int64_t T, uint64_t seed, const optim::AdamWConfig& oc) {
  MemoryPool pool;
  model::Gpt gpt(cfg, pool, model::Precision::f32);
  gpt.init_weights(seed);
  optim::AdamW opt(gpt.layout().specs(), gpt.layout().total(), oc, pool);
  SerialRun r;
  const float grad_scale = 1.0f / float(B * T * M);
  for (int s = 0; s < steps; ++s) {
    std::vector<int32_t> tokens = step_tokens(s, M, B, T, cfg.vocab);
    gpt.zero_grads();
    double sum = 0;
    int64_t count = 0;
    for (int64_t mb = 0; mb < M; ++mb) {
      model::LossSum l = gpt.forward_backward(tokens.data() + mb * B * (T + 1), B, T, grad_scale);
      sum += l.sum;
      count += l.count;
    }
    const int64_t n = gpt.layout().total();
    double norm = std::sqrt(kernels::sum_squares(gpt.grads(), n));
    float factor = oc.clip > 0 ? kernels::clip_factor(norm, oc.clip) : 1.0f;
    opt.step(gpt.weights(), gpt.grads(), factor);
    r.losses.push_back(sum / double(count));
    r.grad_norms.push_back(norm);
  }
  r.weights.assign(gpt.weights(), gpt.weights() + gpt.layout().total());
  std::vector<int32_t> ev = eval_tokens(B, T, cfg.vocab);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < kEvalBatches; ++i) {
    model::LossSum l = gpt.forward_loss(ev.data() + i * B * (T + 1), B, T);
    sum += l.sum;
    count += l.count;
  }
  r.eval_loss = sum / double(count);
  return r;
}

}  // namespace loom::pipeline_test
