#include "model/gpt.h"

#include "model/block.h"

#include <cmath>
#include <cstring>

#include "attention/flash_attention.h"
#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"

namespace loom::model {

namespace K = loom::kernels;

// Rows of the fused head + cross-entropy per block. Each block reads and accumulates the whole
// (V,C) dwte once, so fewer, larger blocks cut that traffic (GPT-2: 154 MB per pass); the price
// is a (rows, V) f32 logits workspace (256 x 50304 x 4 B = 51 MB).
constexpr int64_t kHeadRowsPerBlock = 256;

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::selective: return "selective";
    case Recompute::full: return "full";
  }
  return "?";
}

Recompute recompute_from_name(const std::string& s) {
  if (s == "none") return Recompute::none;
  if (s == "selective") return Recompute::selective;
  if (s == "full") return Recompute::full;
  LOOM_FAIL("recompute = '{}' is not a mode; choose none, selective or full", s);
}

// What a block keeps for its backward. Which fields are set depends on the recompute mode; see
// gpt.h. Tensors named *_mm are matmul inputs: bf16 in bf16 mode, else the f32 tensor itself.

Gpt::Gpt(const ModelConfig& cfg, MemoryPool& pool, Precision precision)
    : cfg_(cfg), layout_(cfg), pool_(pool), precision_(precision) {
  weights_ = Tensor::empty({layout_.total()}, DType::f32, pool_, MemCategory::weights);
  grads_ = Tensor::zeros({layout_.total()}, DType::f32, pool_, MemCategory::grads);
  if (precision_ == Precision::bf16)
    weights_lp_ = Tensor::empty({layout_.total()}, DType::bf16, pool_, MemCategory::weights);
  recompute_.assign(size_t(cfg_.n_layers), Recompute::none);
}

Gpt::~Gpt() = default;

void Gpt::init_weights(uint64_t seed) {
  init_params(layout_, cfg_, weights(), seed);
  sync_low_precision_weights();
}

void Gpt::zero_grads() { grads_.fill_zero(); }

void Gpt::sync_low_precision_weights() {
  if (precision_ == Precision::bf16)
    convert_f32_to_bf16(weights(), weights_lp_.data<bf16>(), size_t(layout_.total()));
}

void Gpt::set_recompute(Recompute mode) { recompute_.assign(size_t(cfg_.n_layers), mode); }

void Gpt::set_recompute(const std::vector<Recompute>& per_layer) {
  LOOM_CHECK(int64_t(per_layer.size()) == cfg_.n_layers,
             "recompute list has {} entries but the model has n_layers = {}", per_layer.size(),
             cfg_.n_layers);
  recompute_ = per_layer;
}

void Gpt::check_inputs(const int32_t* tokens, int64_t B, int64_t T, int64_t row_stride) const {
  LOOM_CHECK(B >= 1 && T >= 1, "batch B={} and sequence T={} must be positive", B, T);
  LOOM_CHECK(T <= cfg_.max_seq,
             "sequence length T={} exceeds the model's max_seq={}; use T <= {} or a model with a "
             "longer position table",
             T, cfg_.max_seq, cfg_.max_seq);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < row_stride; ++t) {
      int32_t id = tokens[b * row_stride + t];
      // Targets may be negative (ignored); inputs may not.
      bool is_input = t < T;
      LOOM_CHECK(id < cfg_.vocab && (id >= 0 || !is_input),
                 "token id {} at batch row {}, position {} is outside the vocabulary [0, {})", id,
                 b, t, cfg_.vocab);
    }
}

Tensor Gpt::forward_trunk(const int32_t* inputs, int64_t B, int64_t T, bool keep_stash) {
  const int64_t N = B * T, C = cfg_.d_model;
  BlockCtx c{cfg_, pool_, precision_ == Precision::bf16, weights(),
        precision_ == Precision::bf16 ? weights_lp_.data<bf16>() : nullptr, grads(), B, T};
  const float* W = weights();

  // h0 = wte[tokens] + wpe[0..T)                                            (N,C)
  Tensor h = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
  K::embedding_forward(h.data<float>(), inputs, W + layout_.token_embedding(),
                       W + layout_.position_embedding(), B, T, C, cfg_.vocab, 0);

  stashes_.clear();
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    stashes_.push_back(std::make_unique<BlockStash>());
    // Evaluation keeps nothing but block inputs (and drops even those below).
    Recompute mode = keep_stash ? recompute_[size_t(l)] : Recompute::full;
    h = block_forward(c, layout_.block(l), h, nullptr, *stashes_.back(), mode);
    if (!keep_stash) stashes_.back()->x = Tensor();
  }

  // final norm                                                               (N,C)
  final_in_ = h;
  final_out_ = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
  final_mean_ = Tensor::empty({N}, DType::f32, pool_, MemCategory::activations);
  final_rstd_ = Tensor::empty({N}, DType::f32, pool_, MemCategory::activations);
  K::layernorm_forward(final_out_.data<float>(), final_mean_.data<float>(),
                       final_rstd_.data<float>(), h.data<float>(), W + layout_.final_norm_w(),
                       W + layout_.final_norm_b(), N, C, cfg_.norm_eps);
  Tensor out = final_out_;
  if (cfg_.query_layer) {
    // The query layer's query input: row t of its position table for the input at position t.
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    K::position_forward(qin.data<float>(), W + layout_.query_position(), B, T, C, 0);
    stashes_.push_back(std::make_unique<BlockStash>());
    Recompute mode = keep_stash ? recompute_.back() : Recompute::full;
    out = block_forward(c, layout_.query_block(), final_out_, &qin, *stashes_.back(), mode);
  }
  if (!keep_stash) {
    stashes_.clear();
    final_in_ = Tensor();
    final_mean_ = Tensor();
    final_rstd_ = Tensor();
    if (cfg_.query_layer) final_out_ = Tensor();
  }
  return out;
}

void Gpt::backward_trunk(Tensor& dout, const int32_t* inputs, int64_t B, int64_t T) {
  const int64_t N = B * T, C = cfg_.d_model;
  BlockCtx c{cfg_, pool_, precision_ == Precision::bf16, weights(),
        precision_ == Precision::bf16 ? weights_lp_.data<bf16>() : nullptr, grads(), B, T};
  float* G = grads();
  const float* W = weights();

  Tensor d_fin = dout;
  if (cfg_.query_layer) {
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    K::position_forward(qin.data<float>(), W + layout_.query_position(), B, T, C, 0);
    BlockStash& st = *stashes_.back();
    d_fin = block_backward(c, layout_.query_block(), dout, &qin, st);
    K::position_backward(G + layout_.query_position(), st.q.data<float>(), B, T, C, 0);
    stashes_.pop_back();
    if (grad_ready_) grad_ready_(layout_.query_position(), layout_.total());
  }
  // final norm: dh = LNf'(d_fin)
  Tensor dh = Tensor::zeros({N, C}, DType::f32, pool_, MemCategory::workspace);
  K::layernorm_backward(dh.data<float>(), G + layout_.final_norm_w(), G + layout_.final_norm_b(),
                        d_fin.data<float>(), final_in_.data<float>(), W + layout_.final_norm_w(),
                        final_mean_.data<float>(), final_rstd_.data<float>(), N, C);
  d_fin = Tensor();
  final_in_ = final_out_ = final_mean_ = final_rstd_ = Tensor();
  if (grad_ready_) grad_ready_(layout_.final_norm_w(), layout_.final_norm_b() + C);
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    dh = block_backward(c, layout_.block(l), dh, nullptr, *stashes_[size_t(l)]);
    stashes_.pop_back();
    if (grad_ready_) grad_ready_(layout_.block(l).norm1_w, layout_.block(l).b_down + C);
  }
  K::embedding_backward(G + layout_.token_embedding(), G + layout_.position_embedding(),
                        dh.data<float>(), inputs, B, T, C, cfg_.vocab, 0);
  if (grad_ready_) grad_ready_(layout_.token_embedding(), layout_.block(0).norm1_w);
}

namespace {
// Splits (B, T+1) windows into inputs (B,T) and targets (B,T).
void split_windows(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                   std::vector<int32_t>& targets) {
  inputs.resize(size_t(B * T));
  targets.resize(size_t(B * T));
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(&inputs[size_t(b * T)], tokens + b * (T + 1), size_t(T) * 4);
    std::memcpy(&targets[size_t(b * T)], tokens + b * (T + 1) + 1, size_t(T) * 4);
  }
}
}  // namespace

LossSum Gpt::forward_backward(const int32_t* tokens, int64_t B, int64_t T, float grad_scale) {
  check_inputs(tokens, B, T, T + 1);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  const int64_t N = B * T, C = cfg_.d_model;
  Tensor out = forward_trunk(inputs.data(), B, T, /*keep_stash=*/true);

  // Tied head + cross-entropy, fused: dout (N,C), grads of embed.token accumulate.
  Tensor dout = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
  LossSum r;
  float* dwte = grads() + layout_.token_embedding();
  if (precision_ == Precision::bf16) {
    Tensor out_lp = Tensor::empty({N, C}, DType::bf16, pool_, MemCategory::workspace);
    convert_f32_to_bf16(out.data<float>(), out_lp.data<bf16>(), size_t(N * C));
    r.sum = K::cross_entropy_head_bf16(dout.data<float>(), dwte, &r.count, out_lp.data<bf16>(),
                                       weights_lp_.data<bf16>() + layout_.token_embedding(),
                                       targets.data(), N, C, cfg_.vocab, grad_scale, pool_,
                                       kHeadRowsPerBlock);
  } else {
    r.sum = K::cross_entropy_head(dout.data<float>(), dwte, &r.count, out.data<float>(),
                                  weights() + layout_.token_embedding(), targets.data(), N, C,
                                  cfg_.vocab, grad_scale, pool_, kHeadRowsPerBlock);
  }
  out = Tensor();
  backward_trunk(dout, inputs.data(), B, T);
  return r;
}

LossSum Gpt::forward_loss(const int32_t* tokens, int64_t B, int64_t T) {
  check_inputs(tokens, B, T, T + 1);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  const int64_t N = B * T, C = cfg_.d_model;
  Tensor out = forward_trunk(inputs.data(), B, T, /*keep_stash=*/false);
  LossSum r;
  if (precision_ == Precision::bf16) {
    Tensor out_lp = Tensor::empty({N, C}, DType::bf16, pool_, MemCategory::workspace);
    convert_f32_to_bf16(out.data<float>(), out_lp.data<bf16>(), size_t(N * C));
    r.sum = K::cross_entropy_head_bf16(nullptr, nullptr, &r.count, out_lp.data<bf16>(),
                                       weights_lp_.data<bf16>() + layout_.token_embedding(),
                                       targets.data(), N, C, cfg_.vocab, 1.f, pool_);
  } else {
    r.sum = K::cross_entropy_head(nullptr, nullptr, &r.count, out.data<float>(),
                                  weights() + layout_.token_embedding(), targets.data(), N, C,
                                  cfg_.vocab, 1.f, pool_);
  }
  final_out_ = Tensor();
  return r;
}

void Gpt::all_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
  check_inputs(inputs, B, T, T);
  Tensor out = forward_trunk(inputs, B, T, /*keep_stash=*/false);
  K::logits_forward(logits, out.data<float>(), weights() + layout_.token_embedding(), B * T,
                    cfg_.d_model, cfg_.vocab);
  final_out_ = Tensor();
}

void Gpt::last_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
  check_inputs(inputs, B, T, T);
  const int64_t C = cfg_.d_model;
  Tensor out = forward_trunk(inputs, B, T, /*keep_stash=*/false);
  Tensor last = Tensor::empty({B, C}, DType::f32, pool_, MemCategory::workspace);  // (B,C)
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(last.data<float>() + b * C, out.data<float>() + ((b + 1) * T - 1) * C,
                size_t(C) * 4);
  K::logits_forward(logits, last.data<float>(), weights() + layout_.token_embedding(), B, C,
                    cfg_.vocab);
  final_out_ = Tensor();
}

}  // namespace loom::model
