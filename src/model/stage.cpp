// model/stage.cpp: a pipeline stage of the GPT. The chain of kernels mirrors model/gpt.cpp
// (forward_trunk, backward_trunk, forward_backward) exactly, split at block boundaries, so a
// pipeline reproduces the serial model's numbers.
//
// Glossary: B batch, T sequence, N = B*T rows, C d_model, V vocab, L blocks.
#include "model/stage.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "model/block.h"
#include "model/head.h"

namespace loom::model {

namespace K = loom::kernels;

std::vector<StageSpan> split_stages(const ModelConfig& cfg, int64_t n_stages,
                                    const std::vector<int64_t>& stage_layers) {
  const int64_t L = cfg.n_layers;
  LOOM_CHECK(n_stages >= 1 && n_stages <= L,
             "{} pipeline (virtual) stages for n_layers = {}: every stage needs at least one "
             "block, so use 1 to {} stages",
             n_stages, L, L);
  std::vector<int64_t> counts = stage_layers;
  if (counts.empty()) {
    if (L % n_stages != 0) {
      std::string valid;
      for (int64_t d = 1; d <= L; ++d)
        if (L % d == 0) valid += (valid.empty() ? "" : ", ") + std::to_string(d);
      LOOM_FAIL(
          "n_layers = {} does not split evenly into {} stages; use a stage count in {{{}}} "
          "or give stage_layers (e.g. {} entries summing to {})",
          L, n_stages, valid, n_stages, L);
    }
    counts.assign(size_t(n_stages), L / n_stages);
  }
  LOOM_CHECK(int64_t(counts.size()) == n_stages,
             "stage_layers has {} entries but there are {} (virtual) stages (pp * virtual "
             "stages); give exactly {} entries",
             counts.size(), n_stages, n_stages);
  int64_t sum = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    LOOM_CHECK(counts[i] >= 1, "stage_layers[{}] = {}: every stage needs at least one block", i,
               counts[i]);
    sum += counts[i];
  }
  LOOM_CHECK(sum == L, "stage_layers sum to {} but the model has n_layers = {}", sum, L);
  std::vector<StageSpan> spans;
  int64_t first = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    StageSpan s;
    s.first_layer = first;
    s.last_layer = first + counts[i];
    s.has_embedding = i == 0;
    s.has_head = i + 1 == counts.size();
    spans.push_back(s);
    first = s.last_layer;
  }
  return spans;
}

// What one micro-batch leaves for its backward.
struct GptStage::MicroStash {
  int64_t B = 0, T = 0;
  std::vector<int32_t> inputs;                         // (B,T) embedding stage only
  std::vector<std::unique_ptr<BlockStash>> blocks;     // one per held block
  std::unique_ptr<BlockStash> query;                   // query layer (head stage)
  Tensor final_in, final_mean, final_rstd, final_out;  // final norm (head stage)
  Tensor dhead;                                        // (N,C) d(loss)/d(head input)
};

GptStage::GptStage(const ModelConfig& cfg, const StageSpan& span, MemoryPool& pool,
                   Precision precision, const comm::ProcessGroup* tp, ParamStore* store)
    : cfg_(cfg),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      store_(store),
      global_(cfg, tp_ ? TpShard{tp_->rank(), tp_->size()} : TpShard{}),
      span_(span),
      pool_(pool),
      precision_(precision) {
  const int64_t L = cfg_.n_layers, C = cfg_.d_model;
  LOOM_CHECK(0 <= span.first_layer && span.first_layer <= span.last_layer && span.last_layer <= L,
             "stage span blocks [{}, {}) is outside the model's blocks [0, {})", span.first_layer,
             span.last_layer, L);
  LOOM_CHECK(!span.has_embedding || span.first_layer == 0,
             "the embedding stage must start at block 0, not {}", span.first_layer);
  LOOM_CHECK(!span.has_head || span.last_layer == L,
             "the head stage must end at block L = {}, not {}", L, span.last_layer);

  // Global ranges held, ascending. The layout orders embed.token, embed.position, blocks,
  // final norm, query layer, so each piece is one contiguous global range.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int64_t tok_end = global_.token_embedding() + global_.specs()[0].numel;  // (V/tp, C)
  const int64_t blocks_begin = L > 0 ? global_.block(0).norm1_w : global_.final_norm_w();
  if (span.has_embedding)
    ranges.push_back({global_.token_embedding(), blocks_begin});  // token + position
  else if (span.has_head)
    ranges.push_back({global_.token_embedding(), tok_end});  // the tied head's copy
  if (span.first_layer < span.last_layer)
    ranges.push_back(
        {global_.block(span.first_layer).norm1_w, global_.block(span.last_layer - 1).b_down + C});
  if (span.has_head) ranges.push_back({global_.final_norm_w(), global_.total()});
  for (auto [b, e] : ranges) {
    segments_.push_back({b, e, total_});
    total_ += e - b;
  }
  for (const ParamSpec& s : global_.specs()) {
    for (const Segment& g : segments_) {
      if (s.offset < g.global_begin || s.offset >= g.global_end) continue;
      StageParam p;
      p.global = s;
      p.local_offset = g.local_begin + (s.offset - g.global_begin);
      p.tied_copy = s.offset == global_.token_embedding() && !span.has_embedding;
      params_.push_back(std::move(p));
    }
  }

  if (span.has_embedding || span.has_head) tok_ = local(global_.token_embedding());
  if (span.has_embedding) pos_ = local(global_.position_embedding());
  for (int64_t l = span.first_layer; l < span.last_layer; ++l)
    blocks_.push_back(local_block(global_.block(l)));
  if (span.has_head) {
    fnw_ = local(global_.final_norm_w());
    fnb_ = local(global_.final_norm_b());
    if (cfg_.query_layer) {
      qpos_ = local(global_.query_position());
      qblock_ = local_block(global_.query_block());
    }
  }

  // Units: token embedding (or tied copy), position embedding, blocks, head; in buffer order.
  auto add_unit = [&](int64_t b, int64_t e) {
    units_.push_back({b, e});
    return int(units_.size()) - 1;
  };
  if (tok_ >= 0) u_tok_ = add_unit(tok_, tok_ + global_.specs()[0].numel);
  if (pos_ >= 0) u_pos_ = add_unit(pos_, pos_ + global_.find("embed.position.weight").numel);
  u_block0_ = int(units_.size());
  for (const BlockOffsets& o : blocks_) add_unit(o.norm1_w, o.b_down + C);
  if (span.has_head) u_head_ = add_unit(fnw_, total_);
  for (size_t i = 0; i < units_.size(); ++i)
    LOOM_ASSERT(units_[i].begin == (i ? units_[i - 1].end : 0) && units_[i].end > units_[i].begin,
                "stage units do not tile its buffer");
  LOOM_ASSERT(units_.empty() ? total_ == 0 : units_.back().end == total_,
              "stage units do not tile its buffer");

  if (!store_) {
    weights_ = Tensor::empty({total_}, DType::f32, pool_, MemCategory::weights);
    grads_ = Tensor::zeros({total_}, DType::f32, pool_, MemCategory::grads);
    if (precision_ == Precision::bf16)
      weights_lp_ = Tensor::empty({total_}, DType::bf16, pool_, MemCategory::weights);
  }
}

const float* GptStage::unit_w(int u) {
  return store_ ? store_->weights(u) : weights() + units_[size_t(u)].begin;
}
const bf16* GptStage::unit_wl(int u) {
  if (precision_ != Precision::bf16) return nullptr;
  return store_ ? store_->weights_lp(u) : weights_lp_.data<bf16>() + units_[size_t(u)].begin;
}
void GptStage::unit_release(int u) {
  if (store_) store_->release(u);
}
float* GptStage::unit_g(int u) {
  return store_ ? store_->grads(u) : grads() + units_[size_t(u)].begin;
}
void GptStage::unit_grads_done(int u, bool final) {
  if (store_)
    store_->grads_done(u);  // a store reduces each contribution's buffer on its own
  else if (grad_ready_ && final)
    grad_ready_(units_[size_t(u)].begin, units_[size_t(u)].end);
}
// Braced initialisation evaluates in order: weights(u) before weights_lp(u), as a store needs.
BlockCtx GptStage::ctx(int u, bool with_grads, int64_t B, int64_t T) {
  return BlockCtx{cfg_, pool_, precision_ == Precision::bf16, unit_w(u), unit_wl(u),
                  with_grads ? unit_g(u) : nullptr, B, T, tp_, nullptr};
}
BlockCtx GptStage::plain_ctx(int64_t B, int64_t T) const {
  return BlockCtx{cfg_, pool_, precision_ == Precision::bf16, nullptr, nullptr, nullptr, B, T, tp_,
                  nullptr};
}

GptStage::~GptStage() = default;

std::vector<std::pair<int64_t, int64_t>> GptStage::held_ranges() const {
  std::vector<std::pair<int64_t, int64_t>> r;
  for (const Segment& g : segments_) r.push_back({g.global_begin, g.global_end});
  return r;
}

int64_t GptStage::local(int64_t global_offset) const {
  for (const Segment& g : segments_)
    if (global_offset >= g.global_begin && global_offset < g.global_end)
      return g.local_begin + (global_offset - g.global_begin);
  LOOM_ASSERT(false, "global offset {} is not held by stage blocks [{}, {})", global_offset,
              span_.first_layer, span_.last_layer);
  return -1;
}

BlockOffsets GptStage::local_block(const BlockOffsets& g) const {
  return map_offsets(g, [this](int64_t x) { return local(x); });
}

const StageParam& GptStage::find(const std::string& name) const {
  for (const StageParam& p : params_)
    if (p.global.name == name) return p;
  LOOM_FAIL("stage with blocks [{}, {}){}{} holds no parameter named '{}'", span_.first_layer,
            span_.last_layer, span_.has_embedding ? " + embedding" : "",
            span_.has_head ? " + head" : "", name);
}

void GptStage::zero_grads() {
  if (grads_.defined()) grads_.fill_zero();
}

void GptStage::init_range(float* dst, int64_t begin, int64_t end, uint64_t seed) const {
  // Each held global range initialised by the global layout's rules at its global offsets:
  // the identical logical weights of Gpt::init_weights.
  for (const Segment& g : segments_) {
    const int64_t len = g.global_end - g.global_begin;
    const int64_t lo = std::max(begin, g.local_begin), hi = std::min(end, g.local_begin + len);
    if (lo < hi)
      init_params_range(global_, cfg_, dst + (lo - begin), g.global_begin + (lo - g.local_begin),
                        g.global_begin + (hi - g.local_begin), seed);
  }
}

void GptStage::init_weights(uint64_t seed) {
  LOOM_CHECK(!store_, "init_weights: this stage's parameters live in its ParamStore");
  init_range(weights(), 0, total_, seed);
  sync_low_precision_weights();
}

void GptStage::to_local(const float* global_buffer, float* local_buffer) const {
  for (const Segment& g : segments_)
    std::memcpy(local_buffer + g.local_begin, global_buffer + g.global_begin,
                size_t(g.global_end - g.global_begin) * sizeof(float));
}

void GptStage::to_global(const float* local_buffer, float* global_buffer,
                         bool include_tied_copy) const {
  for (const StageParam& p : params_) {
    if (p.tied_copy && !include_tied_copy) continue;
    std::memcpy(global_buffer + p.global.offset, local_buffer + p.local_offset,
                size_t(p.global.numel) * sizeof(float));
  }
}

void GptStage::import_weights(const float* global_weights) {
  LOOM_CHECK(!store_, "import_weights: this stage's parameters live in its ParamStore");
  to_local(global_weights, weights());
  sync_low_precision_weights();
}

void GptStage::export_weights(float* global_weights, bool include_tied_copy) const {
  LOOM_CHECK(!store_, "export_weights: this stage's parameters live in its ParamStore");
  to_global(weights(), global_weights, include_tied_copy);
}

void GptStage::sync_low_precision_weights() {
  if (precision_ == Precision::bf16 && weights_lp_.defined())
    convert_f32_to_bf16(weights(), weights_lp_.data<bf16>(), size_t(total_));
}

Tensor GptStage::forward(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x,
                         int64_t B, int64_t T, float grad_scale, LossSum* loss) {
  LOOM_CHECK(stash_.count(mb) == 0,
             "micro-batch {} is already in flight on stage blocks [{}, {}); run its backward "
             "first",
             mb, span_.first_layer, span_.last_layer);
  return forward_impl(mb, inputs, targets, x, B, T, grad_scale, loss, /*train=*/true);
}

Tensor GptStage::forward_eval(const int32_t* inputs, const int32_t* targets, const Tensor& x,
                              int64_t B, int64_t T, LossSum* loss) {
  return forward_impl(-1, inputs, targets, x, B, T, 0.f, loss, /*train=*/false);
}

// train: stash what backward needs under `mb` and, on the head stage, run the fused head's
// backward. Otherwise (evaluation) keep nothing and touch no gradient: each block's stash dies
// with the block, and the head only scores.
Tensor GptStage::forward_impl(int mb, const int32_t* inputs, const int32_t* targets,
                              const Tensor& x, int64_t B, int64_t T, float grad_scale,
                              LossSum* loss, bool train) {
  const int64_t N = B * T, C = cfg_.d_model;
  LOOM_CHECK(B >= 1 && T >= 1 && T <= cfg_.max_seq,
             "batch B={} and sequence T={} must be positive with T <= max_seq = {}", B, T,
             cfg_.max_seq);
  const BlockCtx pc = plain_ctx(B, T);
  LOOM_CHECK(N % pc.tp_size() == 0, "tensor parallel needs B*T = {} divisible by tp = {}", N,
             pc.tp_size());
  const int64_t Nl = pc.local_rows();  // rows of the activations here (N without tp)
  auto st = std::make_unique<MicroStash>();
  st->B = B;
  st->T = T;

  Tensor h;
  if (span_.has_embedding) {
    LOOM_CHECK(inputs != nullptr, "the embedding stage needs the input tokens (B={}, T={})", B, T);
    // h0 = wte[tokens] + wpe[0..T)                                          (Nl,C)
    const float* wte = unit_w(u_tok_);
    const float* wpe = unit_w(u_pos_);
    if (tp_) {
      h = vocab_parallel_embedding(pc, global_.specs()[0], wte, wpe, inputs);
    } else {
      h = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
      K::embedding_forward(h.data<float>(), inputs, wte, wpe, B, T, C, cfg_.vocab, 0);
    }
    unit_release(u_pos_);
    unit_release(u_tok_);
    if (train) st->inputs.assign(inputs, inputs + N);
  } else {
    LOOM_CHECK(x.defined() && x.numel() == Nl * C && x.dtype() == DType::f32,
               "stage blocks [{}, {}) needs an f32 input activation of rows*C = {}*{} elements, "
               "got {}",
               span_.first_layer, span_.last_layer, Nl, C, x.defined() ? x.numel() : 0);
    h = x;
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const int u = u_block0_ + int(i);
    st->blocks.push_back(std::make_unique<BlockStash>());
    h = block_forward(ctx(u, false, B, T), rebased(blocks_[i], units_[size_t(u)].begin), h,
                      nullptr, *st->blocks.back(), recompute_);
    if (!train) st->blocks.back().reset();
    unit_release(u);
  }
  if (!span_.has_head) {
    if (train) stash_[mb] = std::move(st);
    return h;  // (N,C)
  }

  LOOM_CHECK(targets != nullptr && loss != nullptr,
             "the head stage needs targets and a loss output (B={}, T={})", B, T);
  for (int64_t r = 0; r < N; ++r)
    LOOM_CHECK(targets[r] < cfg_.vocab,
               "target id {} at batch row {}, position {} is outside the vocabulary [0, {})",
               targets[r], r / T, r % T, cfg_.vocab);
  // final norm                                                              (Nl,C)
  const int64_t H0 = units_[size_t(u_head_)].begin;
  const BlockCtx hc = ctx(u_head_, false, B, T);
  st->final_in = h;
  st->final_out = Tensor::empty({Nl, C}, DType::f32, pool_, MemCategory::activations);
  st->final_mean = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  st->final_rstd = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  K::layernorm_forward(st->final_out.data<float>(), st->final_mean.data<float>(),
                       st->final_rstd.data<float>(), h.data<float>(), hc.W + fnw_ - H0,
                       hc.W + fnb_ - H0, Nl, C, cfg_.norm_eps);
  Tensor out = st->final_out;
  if (cfg_.query_layer) {
    // The query layer's query input: row t of its position table.                 (N,C)
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    K::position_forward(qin.data<float>(), hc.W + qpos_ - H0, B, T, C, 0);
    st->query = std::make_unique<BlockStash>();
    out = block_forward(hc, rebased(qblock_, H0), st->final_out, &qin, *st->query, recompute_);
  }
  unit_release(u_head_);
  const float* wte = unit_w(u_tok_);
  const bf16* wte_l = unit_wl(u_tok_);
  if (!train) {
    HeadWeights hw{&global_.specs()[0], wte, wte_l, nullptr, nullptr};
    *loss = tied_head_loss(pc, hw, out, targets, 1.f, nullptr);
    unit_release(u_tok_);
    return Tensor();
  }
  // Tied head + cross-entropy, fused (forward and backward at once, as Gpt does).    (Nl,C)
  st->dhead = Tensor::empty({Nl, C}, DType::f32, pool_, MemCategory::activations);
  HeadWeights hw{&global_.specs()[0], wte, wte_l, unit_g(u_tok_), nullptr};
  *loss = tied_head_loss(pc, hw, out, targets, grad_scale, &st->dhead);
  unit_release(u_tok_);
  // The head's contribution (see stage.h: Units); final unless this stage's embedding adds more.
  unit_grads_done(u_tok_, /*final=*/!span_.has_embedding);
  stash_[mb] = std::move(st);
  return Tensor();
}

Tensor GptStage::backward(int mb, Tensor& dy) {
  auto it = stash_.find(mb);
  LOOM_CHECK(it != stash_.end(),
             "backward of micro-batch {} on stage blocks [{}, {}) without its forward", mb,
             span_.first_layer, span_.last_layer);
  MicroStash& st = *it->second;
  const int64_t B = st.B, T = st.T, N = B * T, C = cfg_.d_model;
  const BlockCtx pc = plain_ctx(B, T);
  const int64_t Nl = pc.local_rows();

  Tensor dh;
  if (span_.has_head) {
    const int64_t H0 = units_[size_t(u_head_)].begin;
    const BlockCtx hc = ctx(u_head_, true, B, T);
    Tensor d_fin = st.dhead;
    if (cfg_.query_layer) {
      Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
      K::position_forward(qin.data<float>(), hc.W + qpos_ - H0, B, T, C, 0);
      d_fin = block_backward(hc, rebased(qblock_, H0), st.dhead, &qin, *st.query);
      K::position_backward(hc.G + qpos_ - H0, st.query->q.data<float>(), B, T, C, 0);
      st.query.reset();
    }
    // final norm: dh = LNf'(d_fin), accumulated into zeros                      (Nl,C)
    dh = Tensor::zeros({Nl, C}, DType::f32, pool_, MemCategory::workspace);
    K::layernorm_backward(dh.data<float>(), hc.G + fnw_ - H0, hc.G + fnb_ - H0,
                          d_fin.data<float>(), st.final_in.data<float>(), hc.W + fnw_ - H0,
                          st.final_mean.data<float>(), st.final_rstd.data<float>(), Nl, C);
    st.dhead = st.final_in = st.final_out = st.final_mean = st.final_rstd = Tensor();
    unit_release(u_head_);
    unit_grads_done(u_head_);
  } else {
    LOOM_CHECK(dy.defined() && dy.numel() == Nl * C && dy.dtype() == DType::f32,
               "stage blocks [{}, {}) needs an f32 output gradient of rows*C = {}*{} elements, "
               "got {}",
               span_.first_layer, span_.last_layer, Nl, C, dy.defined() ? dy.numel() : 0);
    dh = dy;
  }
  for (size_t i = blocks_.size(); i-- > 0;) {
    const int u = u_block0_ + int(i);
    dh = block_backward(ctx(u, true, B, T), rebased(blocks_[i], units_[size_t(u)].begin), dh,
                        nullptr, *st.blocks[i]);
    st.blocks[i].reset();
    unit_release(u);
    unit_grads_done(u);
  }
  if (span_.has_embedding) {
    float* g_tok = unit_g(u_tok_);
    float* g_pos = unit_g(u_pos_);
    if (tp_)
      vocab_parallel_embedding_backward(pc, global_.specs()[0], g_tok, g_pos, dh,
                                        st.inputs.data());
    else
      K::embedding_backward(g_tok, g_pos, dh.data<float>(), st.inputs.data(), B, T, C,
                            cfg_.vocab, 0);
    unit_grads_done(u_tok_);
    unit_grads_done(u_pos_);
    dh = Tensor();
  }
  stash_.erase(it);
  return dh;  // (N,C) or undefined on the embedding stage
}

}  // namespace loom::model
