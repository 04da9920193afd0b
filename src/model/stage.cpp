// model/stage.cpp: the model executor (see stage.h). One chain of kernels for every layout: the
// whole model is the stage that holds everything.
//
// Glossary: B batch, T sequence, N = B*T rows, Nl = N/tp local rows, C d_model, V vocab, L blocks.
#include "model/stage.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"
#include "model/block.h"
#include "model/head.h"

namespace loom::model {

namespace K = loom::kernels;

namespace {
std::atomic<int> g_emulation_override{-1};
TpShard shard_of(const comm::ProcessGroup* tp) {
  return tp && tp->size() > 1 ? TpShard{tp->rank(), tp->size()} : TpShard{};
}
EpShard ep_shard_of(const comm::ProcessGroup* ep) {
  return ep && ep->size() > 1 ? EpShard{ep->rank(), ep->size()} : EpShard{};
}
}  // namespace

bool bf16_emulated() {
  const int o = g_emulation_override.load();
  if (o >= 0) return o != 0;
  return kernels::bf16_matmul_path() == kernels::Bf16MatmulPath::widen;
}

void set_bf16_emulation_for_testing(int mode) { g_emulation_override.store(mode); }

void split_windows(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                   std::vector<int32_t>& targets) {
  inputs.resize(size_t(B * T));
  targets.resize(size_t(B * T));
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(&inputs[size_t(b * T)], tokens + b * (T + 1), size_t(T) * 4);
    std::memcpy(&targets[size_t(b * T)], tokens + b * (T + 1) + 1, size_t(T) * 4);
  }
}

// What one micro-batch leaves for its backward.
struct GptStage::MicroStash {
  int64_t B = 0, T = 0;
  std::vector<int32_t> inputs;                         // (B,T) embedding or sparse stage
  std::vector<int32_t> domains;                        // (B,T) sparse stage (rre)
  float aux_scale = 0;                                 // topk aux gradient weight
  std::vector<std::unique_ptr<BlockStash>> blocks;     // one per held block
  std::unique_ptr<BlockStash> query;                   // query layer (head stage)
  Tensor final_in, final_mean, final_rstd, final_out;  // final norm (head stage)
  Tensor dhead;                                        // (Nl,C) d(loss)/d(head input)
};

GptStage::GptStage(const ModelConfig& cfg, const StageSpan& span, MemoryPool& pool,
                   Precision precision, const comm::ProcessGroup* tp, ParamStore* store,
                   const comm::ProcessGroup* ep, bool expert_masters_outside)
    : cfg_(cfg),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      ep_(ep && ep->size() > 1 ? ep : nullptr),
      store_(store),
      geo_(cfg, span, shard_of(tp), ep_shard_of(ep)),
      pool_(pool),
      precision_(precision),
      emulated_(precision == Precision::bf16 && !store && bf16_emulated()),
      moe_stats_(std::make_unique<MoeStats>()) {
  recompute_.assign(size_t(cfg_.n_layers), Recompute::none);
  if (expert_masters_outside) {
    LOOM_CHECK(!store_ && precision_ == Precision::bf16,
               "expert masters outside the pool need bf16 and no ParamStore (ECSS at ZeRO 0 or 1)");
    std::vector<UnitRange> h = ecss_master_holes(geo_);
    if (!h.empty()) holes_ = std::make_unique<HoleyLayout>(geo_.total(), std::move(h));
  }
  if (!store_) {
    const int64_t n = geo_.total();
    weights_ = Tensor::empty({holes_ ? holes_->size() : n}, DType::f32, pool_, MemCategory::weights);
    grads_ = Tensor::zeros({n}, DType::f32, pool_, MemCategory::grads);
    if (precision_ == Precision::bf16)
      weights_lp_ = Tensor::empty({n}, emulated_ ? DType::f32 : DType::bf16, pool_,
                                  MemCategory::weights);
  }
}

GptStage::~GptStage() = default;

const float* GptStage::unit_w(int u) {
  return store_ ? store_->weights(u) : master_at(units()[size_t(u)].begin);
}
const float* GptStage::unit_wr(int u) {
  return emulated_ ? weights_lp_.data<float>() + units()[size_t(u)].begin : nullptr;
}
const bf16* GptStage::unit_wl(int u) {
  if (precision_ != Precision::bf16 || emulated_) return nullptr;
  return store_ ? store_->weights_lp(u) : weights_lp_.data<bf16>() + units()[size_t(u)].begin;
}
void GptStage::unit_release(int u) {
  if (store_) store_->release(u);
}
float* GptStage::unit_g(int u) {
  return store_ ? store_->grads(u) : grads() + units()[size_t(u)].begin;
}
void GptStage::unit_grads_done(int u, bool final) {
  if (store_)
    store_->grads_done(u);  // a store reduces each contribution's buffer on its own
  else if (grad_ready_ && final)
    grad_ready_(units()[size_t(u)].begin, units()[size_t(u)].end);
}
// Braced initialisation evaluates in order: weights(u) before weights_lp(u), as a store needs.
BlockCtx GptStage::ctx(int u, bool with_grads, int64_t B, int64_t T) {
  BlockCtx c{cfg_, pool_, precision_ == Precision::bf16, unit_w(u), unit_wl(u),
             with_grads ? unit_g(u) : nullptr, B, T, tp_, unit_wr(u), cp_, positions(T)};
  c.ep = ep_;
  c.wmap = holes_.get();
  c.w_begin = units()[size_t(u)].begin;
  return c;
}
BlockCtx GptStage::plain_ctx(int64_t B, int64_t T) const {
  BlockCtx c{cfg_, pool_, precision_ == Precision::bf16, nullptr, nullptr, nullptr, B, T, tp_,
             nullptr, cp_, positions(T)};
  c.ep = ep_;
  return c;
}

const int64_t* GptStage::positions(int64_t T) const {
  if (!cp_) return nullptr;
  const int G = cp_->group.size();
  if (int64_t(positions_.size()) != T)
    positions_ = attention::cp_position_ids(cp_->layout, T * G, G, cp_->group.rank());
  return positions_.data();
}

namespace {
// cp: out[b,t] (+)= table[pos[t]] for (B,T) rows of C; the backward scatters them back.
void add_position_rows(float* out, const float* table, const int64_t* pos, int64_t B, int64_t T,
                       int64_t C) {
  for (int64_t n = 0; n < B * T; ++n) {
    const float* p = table + pos[n % T] * C;  // (C)
    float* o = out + n * C;
    for (int64_t j = 0; j < C; ++j) o[j] += p[j];
  }
}
void position_rows_backward(float* dtable, const float* dout, const int64_t* pos, int64_t B,
                            int64_t T, int64_t C) {
  for (int64_t n = 0; n < B * T; ++n) {  // (b, t) order: deterministic
    float* d = dtable + pos[n % T] * C;
    const float* g = dout + n * C;
    for (int64_t j = 0; j < C; ++j) d[j] += g[j];
  }
}
}  // namespace

void GptStage::zero_grads() {
  if (grads_.defined()) grads_.fill_zero();
}

void GptStage::init_weights(uint64_t seed) {
  LOOM_CHECK(!store_, "init_weights: this stage's parameters live in its ParamStore");
  if (holes_) {
    std::vector<float> full(static_cast<size_t>(total()));
    geo_.init_range(full.data(), 0, total(), seed);
    from_full(full.data());
    return;
  }
  geo_.init_range(weights(), 0, total(), seed);
  sync_low_precision_weights();
}

void GptStage::import_weights(const float* global_weights) {
  LOOM_CHECK(!store_, "import_weights: this stage's parameters live in its ParamStore");
  if (holes_) {
    std::vector<float> full(static_cast<size_t>(total()));
    geo_.to_local(global_weights, full.data());
    from_full(full.data());
    return;
  }
  geo_.to_local(global_weights, weights());
  sync_low_precision_weights();
}

void GptStage::export_weights(float* global_weights, bool include_tied_copy) const {
  LOOM_CHECK(!store_, "export_weights: this stage's parameters live in its ParamStore");
  if (holes_) {
    std::vector<float> full(static_cast<size_t>(total()));
    to_full(full.data());
    geo_.to_global(full.data(), global_weights, include_tied_copy);
    return;
  }
  geo_.to_global(weights(), global_weights, include_tied_copy);
}

void GptStage::to_low_precision(const float* src, int64_t x, int64_t n) {
  if (emulated_)
    round_f32_to_bf16(src, weights_lp_.data<float>() + x, size_t(n));
  else
    convert_f32_to_bf16(src, weights_lp_.data<bf16>() + x, size_t(n));
}

void GptStage::sync_low_precision_weights() {
  if (precision_ != Precision::bf16 || !weights_lp_.defined()) return;
  if (!holes_) {
    to_low_precision(weights(), 0, total());
    return;
  }
  const float* w = weights_.data<float>();
  for (const HoleyLayout::Kept& k : holes_->kept()) to_low_precision(w + k.packed, k.begin, k.end - k.begin);
}

void GptStage::set_hole_masters(std::function<void(const float*)> load,
                                std::function<void(float*)> save) {
  load_hole_masters_ = std::move(load);
  save_hole_masters_ = std::move(save);
}

float* GptStage::master_at(int64_t x) const {
  LOOM_ASSERT(!store_, "master_at: this stage's parameters live in its ParamStore");
  return weights_.data<float>() + (holes_ ? holes_->at(x) : x);
}

void GptStage::to_full(float* full) const {
  LOOM_CHECK(!store_, "to_full: this stage's parameters live in its ParamStore");
  const float* w = weights_.data<float>();
  if (!holes_) {
    std::memcpy(full, w, size_t(total()) * sizeof(float));
    return;
  }
  LOOM_ASSERT(bool(save_hole_masters_), "stage with holes but no host masters");
  for (const HoleyLayout::Kept& k : holes_->kept())
    std::memcpy(full + k.begin, w + k.packed, size_t(k.end - k.begin) * sizeof(float));
  // The holes: their compute copies widened first (under ZeRO-1 the store keeps the masters of
  // this rank's share only; from_full rounds these back to the same copies), then the masters.
  for (const UnitRange& h : holes_->holes()) {
    if (emulated_)
      std::memcpy(full + h.begin, weights_lp_.data<float>() + h.begin,
                  size_t(h.end - h.begin) * sizeof(float));
    else
      convert_bf16_to_f32(weights_lp_.data<bf16>() + h.begin, full + h.begin, size_t(h.end - h.begin));
  }
  save_hole_masters_(full);
}

void GptStage::from_full(const float* full) {
  LOOM_CHECK(!store_, "from_full: this stage's parameters live in its ParamStore");
  float* w = weights_.data<float>();
  if (!holes_) {
    std::memcpy(w, full, size_t(total()) * sizeof(float));
    sync_low_precision_weights();
    return;
  }
  LOOM_ASSERT(bool(load_hole_masters_), "stage with holes but no host masters");
  for (const HoleyLayout::Kept& k : holes_->kept())
    std::memcpy(w + k.packed, full + k.begin, size_t(k.end - k.begin) * sizeof(float));
  load_hole_masters_(full);
  to_low_precision(full, 0, total());
}

int64_t GptStage::write_compute(int64_t begin, int64_t end, const float* src) {
  LOOM_CHECK(!store_, "write_compute: this stage's parameters live in its ParamStore");
  if (!holes_) {
    std::memcpy(weights_.data<float>() + begin, src, size_t(end - begin) * sizeof(float));
    return (end - begin) * int64_t(sizeof(float));
  }
  // Kept elements to the f32 buffer, hole elements to their low-precision copy only.
  const int64_t lp_size = emulated_ ? 4 : 2;
  int64_t bytes = 0;
  const auto& kept = holes_->kept();
  for (auto k = std::lower_bound(kept.begin(), kept.end(), begin,
                                 [](const HoleyLayout::Kept& r, int64_t v) { return r.end <= v; });
       k != kept.end() && k->begin < end; ++k) {
    const int64_t lo = std::max(begin, k->begin), hi = std::min(end, k->end);
    std::memcpy(weights_.data<float>() + k->packed + (lo - k->begin), src + (lo - begin),
                size_t(hi - lo) * sizeof(float));
    bytes += (hi - lo) * int64_t(sizeof(float));
  }
  const auto& holes = holes_->holes();
  for (auto h = std::lower_bound(holes.begin(), holes.end(), begin,
                                 [](const UnitRange& r, int64_t v) { return r.end <= v; });
       h != holes.end() && h->begin < end; ++h) {
    const int64_t lo = std::max(begin, h->begin), hi = std::min(end, h->end);
    to_low_precision(src + (lo - begin), lo, hi - lo);
    bytes += (hi - lo) * lp_size;
  }
  return bytes;
}

void GptStage::set_recompute(Recompute mode) { recompute_.assign(size_t(cfg_.n_layers), mode); }

void GptStage::set_recompute(const std::vector<Recompute>& per_layer) {
  LOOM_CHECK(int64_t(per_layer.size()) == cfg_.n_layers,
             "recompute list has {} entries but the model has n_layers = {}", per_layer.size(),
             cfg_.n_layers);
  recompute_ = per_layer;
}

void GptStage::check_tokens(const int32_t* ids, int64_t n, int64_t T, bool inputs) const {
  for (int64_t r = 0; r < n; ++r)
    // Targets may be negative (ignored); inputs may not.
    LOOM_CHECK(ids[r] < cfg_.vocab && (ids[r] >= 0 || !inputs),
               "{} id {} at batch row {}, position {} is outside the vocabulary [0, {})",
               inputs ? "token" : "target", ids[r], r / T, r % T, cfg_.vocab);
}

const MoeStats& GptStage::moe_stats() const { return *moe_stats_; }
void GptStage::reset_moe_stats() { *moe_stats_ = MoeStats{}; }
bool GptStage::has_sparse_blocks() const {
  for (const BlockOffsets& o : geo_.blocks())
    if (o.sparse()) return true;
  return false;
}

Tensor GptStage::forward(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x,
                         int64_t B, int64_t T, float grad_scale, LossSum* loss,
                         const int32_t* domains) {
  LOOM_CHECK(stash_.count(mb) == 0,
             "micro-batch {} is already in flight on stage blocks [{}, {}); run its backward "
             "first",
             mb, span().first_layer, span().last_layer);
  return forward_impl(mb, inputs, targets, x, B, T, grad_scale, loss, /*train=*/true, domains);
}

Tensor GptStage::forward_eval(const int32_t* inputs, const int32_t* targets, const Tensor& x,
                              int64_t B, int64_t T, LossSum* loss, const int32_t* domains) {
  return forward_impl(-1, inputs, targets, x, B, T, 0.f, loss, /*train=*/false, domains);
}

Tensor GptStage::run_trunk(const int32_t* inputs, const int32_t* domains, const Tensor& x,
                           int64_t B, int64_t T, float grad_scale, MicroStash* st) {
  const int64_t N = B * T, C = cfg_.d_model;
  const BlockCtx pc = plain_ctx(B, T);
  const int64_t Nl = pc.local_rows();  // rows of the activations here (N without tp)
  const StageSpan& sp = span();
  Tensor h;
  if (sp.has_embedding) {
    // h0 = wte[tokens] + wpe[0..T)                                          (Nl,C)
    const float* wte = unit_w(geo_.token_unit());
    const float* wpe = unit_w(geo_.position_unit());
    if (tp_) {
      h = vocab_parallel_embedding(pc, global_layout().specs()[0], wte, wpe, inputs);
    } else {
      h = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
      if (cp_) {  // wte[tokens] + wpe[global position of each local row]
        for (int64_t n = 0; n < N; ++n)
          std::memcpy(h.data<float>() + n * C, wte + int64_t(inputs[n]) * C, size_t(C) * 4);
        add_position_rows(h.data<float>(), wpe, pc.pos, B, T, C);
      } else {
        K::embedding_forward(h.data<float>(), inputs, wte, wpe, B, T, C, cfg_.vocab, 0);
      }
    }
    unit_release(geo_.position_unit());
    unit_release(geo_.token_unit());
  } else {
    LOOM_CHECK(x.defined() && x.numel() == Nl * C && x.dtype() == DType::f32,
               "stage blocks [{}, {}) needs an f32 input activation of rows*C = {}*{} elements, "
               "got {}",
               sp.first_layer, sp.last_layer, Nl, C, x.defined() ? x.numel() : 0);
    h = x;
  }
  // Sparse blocks route by token id and domain (null domains: every token in "other").
  std::vector<int32_t> other;
  const bool sparse = has_sparse_blocks();
  if (sparse && !domains && cfg_.moe.router == Router::rre) {
    other.assign(size_t(N), int32_t(cfg_.moe.other_domain()));
    domains = other.data();
  }
  if (st && (sp.has_embedding || sparse)) st->inputs.assign(inputs, inputs + N);
  if (st && sparse && domains) st->domains.assign(domains, domains + N);
  if (st) st->aux_scale = grad_scale * float(N);
  const std::vector<UnitRange>& us = units();
  for (size_t i = 0; i < geo_.blocks().size(); ++i) {
    const int u = geo_.first_block_unit() + int(i);
    // Evaluation keeps nothing: full mode stashes only the block input, dropped below.
    const Recompute mode =
        st ? recompute_[size_t(sp.first_layer) + i] : Recompute::full;
    auto bs = std::make_unique<BlockStash>();
    BlockCtx bc = ctx(u, false, B, T);
    if (geo_.blocks()[i].sparse()) {
      bc.tokens = inputs;
      bc.domains = domains;
      bc.moe_aux_scale = grad_scale * float(N);
      bc.moe_stats = st ? moe_stats_.get() : nullptr;
      bc.moe_layer = sp.first_layer + int64_t(i);
    }
    h = block_forward(bc, rebased(geo_.blocks()[i], us[size_t(u)].begin), h, nullptr, *bs, mode);
    unit_release(u);
    if (st) st->blocks.push_back(std::move(bs));
  }
  if (!sp.has_head) return h;  // (Nl,C)

  // final norm                                                              (Nl,C)
  const int uh = geo_.head_unit();
  const int64_t H0 = us[size_t(uh)].begin;
  const BlockCtx hc = ctx(uh, false, B, T);
  Tensor final_out = Tensor::empty({Nl, C}, DType::f32, pool_, MemCategory::activations);
  Tensor mean = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  Tensor rstd = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  K::layernorm_forward(final_out.data<float>(), mean.data<float>(), rstd.data<float>(),
                       h.data<float>(), hc.W + geo_.final_norm_w() - H0,
                       hc.W + geo_.final_norm_b() - H0, Nl, C, cfg_.norm_eps);
  if (st) {
    st->final_in = h;
    st->final_mean = mean;
    st->final_rstd = rstd;
    st->final_out = final_out;
  }
  h = Tensor();
  mean = rstd = Tensor();
  Tensor out = final_out;
  if (cfg_.query_layer) {
    // The query layer's query input: row t of its position table.                 (N,C)
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    if (cp_) {
      qin.fill_zero();
      add_position_rows(qin.data<float>(), hc.W + geo_.query_position() - H0, hc.pos, B, T, C);
    } else {
      K::position_forward(qin.data<float>(), hc.W + geo_.query_position() - H0, B, T, C, 0);
    }
    auto qs = std::make_unique<BlockStash>();
    const Recompute mode = st ? (recompute_.empty() ? Recompute::none : recompute_.back())
                              : Recompute::full;
    out = block_forward(hc, rebased(geo_.query_block(), H0), final_out, &qin, *qs, mode);
    if (st) st->query = std::move(qs);
  }
  unit_release(uh);
  return out;  // (Nl,C) head input
}

// train: stash what backward needs under `mb` and, on the head stage, run the fused head's
// backward. Otherwise (evaluation) keep nothing and touch no gradient.
Tensor GptStage::forward_impl(int mb, const int32_t* inputs, const int32_t* targets,
                              const Tensor& x, int64_t B, int64_t T, float grad_scale,
                              LossSum* loss, bool train, const int32_t* domains) {
  const int64_t N = B * T;
  LOOM_CHECK(B >= 1 && T >= 1, "batch B={} and sequence T={} must be positive", B, T);
  LOOM_CHECK(T * cp_size() <= cfg_.max_seq,
             "sequence length T={} exceeds the model's max_seq={}; use T <= {} or a model with a "
             "longer position table",
             T * cp_size(), cfg_.max_seq, cfg_.max_seq);
  LOOM_CHECK(N % tp_size() == 0,
             "tensor parallel splits the B*T = {}*{} = {} token rows over tp = {} ranks "
             "(sequence parallel): choose B*T divisible by {}",
             B, T, N, tp_size(), tp_size());
  const StageSpan& sp = span();
  if (sp.has_embedding || has_sparse_blocks()) {
    LOOM_CHECK(inputs != nullptr,
               "the {} needs the input tokens (B={}, T={})",
               sp.has_embedding ? "embedding stage" : "stage with sparse (MoE) blocks", B, T);
    check_tokens(inputs, N, T, true);
  }
  if (domains && has_sparse_blocks() && cfg_.moe.router == Router::rre)
    for (int64_t r = 0; r < N; ++r)
      LOOM_CHECK(domains[r] >= 0 && domains[r] < cfg_.moe.num_domains(),
                 "domain {} at batch row {}, position {} is outside [0, {}) (domains: {})",
                 domains[r], r / T, r % T, cfg_.moe.num_domains(), cfg_.moe.num_domains());
  if (sp.has_head) {
    LOOM_CHECK(targets != nullptr && loss != nullptr,
               "the head stage needs targets and a loss output (B={}, T={})", B, T);
    check_tokens(targets, N, T, false);
  }
  auto st = train ? std::make_unique<MicroStash>() : nullptr;
  if (st) {
    st->B = B;
    st->T = T;
  }
  Tensor out = run_trunk(inputs, domains, x, B, T, grad_scale, st.get());
  if (!sp.has_head) {
    if (train) stash_[mb] = std::move(st);
    return out;  // (Nl,C)
  }
  const int ut = geo_.token_unit();
  const float* wte = unit_w(ut);  // first: a store gathers the unit here
  const float* wte_r = unit_wr(ut);
  const bf16* wte_l = unit_wl(ut);
  BlockCtx pc = plain_ctx(B, T);
  pc.Wr = wte_r;  // emulated bf16: the head's gathered input is rounded like the weights
  if (!train) {
    HeadWeights hw{&global_layout().specs()[0], wte, wte_l, nullptr, wte_r};
    *loss = tied_head_loss(pc, hw, out, targets, 1.f, nullptr);
    unit_release(ut);
    return Tensor();
  }
  // Tied head + cross-entropy, fused (forward and backward at once).               (Nl,C)
  st->dhead = Tensor::empty(out.shape(), DType::f32, pool_, MemCategory::activations);
  HeadWeights hw{&global_layout().specs()[0], wte, wte_l, unit_g(ut), wte_r};
  *loss = tied_head_loss(pc, hw, out, targets, grad_scale, &st->dhead);
  unit_release(ut);
  // The head's contribution (see stage.h: Units); final unless this stage's embedding adds more.
  unit_grads_done(ut, /*final=*/!sp.has_embedding);
  stash_[mb] = std::move(st);
  return Tensor();
}

Tensor GptStage::backward(int mb, Tensor& dy) {
  auto it = stash_.find(mb);
  LOOM_CHECK(it != stash_.end(),
             "backward of micro-batch {} on stage blocks [{}, {}) without its forward", mb,
             span().first_layer, span().last_layer);
  MicroStash& st = *it->second;
  const int64_t B = st.B, T = st.T, N = B * T, C = cfg_.d_model;
  const BlockCtx pc = plain_ctx(B, T);
  const int64_t Nl = pc.local_rows();
  const std::vector<UnitRange>& us = units();
  const StageSpan& sp = span();

  Tensor dh;
  if (sp.has_head) {
    const int uh = geo_.head_unit();
    const int64_t H0 = us[size_t(uh)].begin;
    const BlockCtx hc = ctx(uh, true, B, T);
    Tensor d_fin = st.dhead;
    if (cfg_.query_layer) {
      Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
      if (cp_) {
        qin.fill_zero();
        add_position_rows(qin.data<float>(), hc.W + geo_.query_position() - H0, hc.pos, B, T, C);
      } else {
        K::position_forward(qin.data<float>(), hc.W + geo_.query_position() - H0, B, T, C, 0);
      }
      d_fin = block_backward(hc, rebased(geo_.query_block(), H0), st.dhead, &qin, *st.query);
      if (cp_)
        position_rows_backward(hc.G + geo_.query_position() - H0, st.query->q.data<float>(),
                               hc.pos, B, T, C);
      else
        K::position_backward(hc.G + geo_.query_position() - H0, st.query->q.data<float>(), B, T,
                             C, 0);
      st.query.reset();
    }
    // final norm: dh = LNf'(d_fin), accumulated into zeros                      (Nl,C)
    dh = Tensor::zeros({Nl, C}, DType::f32, pool_, MemCategory::workspace);
    K::layernorm_backward(dh.data<float>(), hc.G + geo_.final_norm_w() - H0,
                          hc.G + geo_.final_norm_b() - H0, d_fin.data<float>(),
                          st.final_in.data<float>(), hc.W + geo_.final_norm_w() - H0,
                          st.final_mean.data<float>(), st.final_rstd.data<float>(), Nl, C);
    d_fin = Tensor();
    st.dhead = st.final_in = st.final_out = st.final_mean = st.final_rstd = Tensor();
    unit_release(uh);
    unit_grads_done(uh);
  } else {
    LOOM_CHECK(dy.defined() && dy.numel() == Nl * C && dy.dtype() == DType::f32,
               "stage blocks [{}, {}) needs an f32 output gradient of rows*C = {}*{} elements, "
               "got {}",
               sp.first_layer, sp.last_layer, Nl, C, dy.defined() ? dy.numel() : 0);
    dh = dy;
  }
  for (size_t i = geo_.blocks().size(); i-- > 0;) {
    const int u = geo_.first_block_unit() + int(i);
    BlockCtx bc = ctx(u, true, B, T);
    if (geo_.blocks()[i].sparse()) {  // full recompute routes again
      bc.tokens = st.inputs.data();
      bc.domains = st.domains.empty() ? nullptr : st.domains.data();
      bc.moe_aux_scale = st.aux_scale;
    }
    dh = block_backward(bc, rebased(geo_.blocks()[i], us[size_t(u)].begin), dh, nullptr,
                        *st.blocks[i]);
    st.blocks[i].reset();
    unit_release(u);
    unit_grads_done(u);
  }
  if (sp.has_embedding) {
    // The token embedding's gradient buffer was opened by the head when this stage holds both.
    float* g_tok = unit_g(geo_.token_unit());
    float* g_pos = unit_g(geo_.position_unit());
    if (tp_)
      vocab_parallel_embedding_backward(pc, global_layout().specs()[0], g_tok, g_pos, dh,
                                        st.inputs.data());
    else if (cp_) {
      K::embedding_backward(g_tok, nullptr, dh.data<float>(), st.inputs.data(), B, T, C,
                            cfg_.vocab, 0);
      position_rows_backward(g_pos, dh.data<float>(), pc.pos, B, T, C);
    } else
      K::embedding_backward(g_tok, g_pos, dh.data<float>(), st.inputs.data(), B, T, C,
                            cfg_.vocab, 0);
    // Back to front (position table after the token table in the buffer), so reported ranges
    // arrive in descending order.
    unit_grads_done(geo_.position_unit());
    unit_grads_done(geo_.token_unit());
    dh = Tensor();
  }
  stash_.erase(it);
  return dh;  // (Nl,C) or undefined on the embedding stage
}

void GptStage::logits(float* out, const int32_t* inputs, int64_t B, int64_t T, bool last_only,
                      const int32_t* domains) {
  LOOM_CHECK(!tp_, "logits are not available under tensor parallelism (tp = {})", tp_size());
  LOOM_CHECK(!cp_, "logits are not available under context parallelism (cp = {})", cp_size());
  LOOM_CHECK(span().has_embedding && span().has_head,
             "logits need the whole model; this stage holds blocks [{}, {})", span().first_layer,
             span().last_layer);
  LOOM_CHECK(B >= 1 && T >= 1 && T <= cfg_.max_seq,
             "batch B={} and sequence T={} must be positive with T <= max_seq = {}", B, T,
             cfg_.max_seq);
  check_tokens(inputs, B * T, T, true);
  const int64_t C = cfg_.d_model;
  Tensor h = run_trunk(inputs, domains, Tensor(), B, T, 0.f, nullptr);  // (N,C)
  const int ut = geo_.token_unit();
  const float* wte = unit_w(ut);
  if (last_only) {
    Tensor last = Tensor::empty({B, C}, DType::f32, pool_, MemCategory::workspace);  // (B,C)
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(last.data<float>() + b * C, h.data<float>() + ((b + 1) * T - 1) * C,
                  size_t(C) * 4);
    K::logits_forward(out, last.data<float>(), wte, B, C, cfg_.vocab);
  } else {
    K::logits_forward(out, h.data<float>(), wte, B * T, C, cfg_.vocab);
  }
  unit_release(ut);
}

void sum_replicated_grads(const std::vector<ParamSpec>& specs, float* grads, int64_t begin,
                          int64_t end, const comm::ProcessGroup& tp) {
  auto inside = [&](const ParamSpec& s) {
    return s.replicated() && s.offset >= begin && s.offset + s.numel <= end;
  };
  int64_t n = 0;
  for (const ParamSpec& s : specs)
    if (inside(s)) n += s.numel;
  if (n == 0) return;
  std::vector<float> buf(static_cast<size_t>(n));
  float* p = buf.data();
  for (const ParamSpec& s : specs)
    if (inside(s)) p = std::copy_n(grads + (s.offset - begin), s.numel, p);
  tp.all_reduce(comm::BufferRef(buf.data(), n, DType::f32)).wait();
  p = buf.data();
  for (const ParamSpec& s : specs)
    if (inside(s)) {
      std::copy_n(p, s.numel, grads + (s.offset - begin));
      p += s.numel;
    }
}

// tp: the logical (tp = 1) flat buffer from every tp rank's shard buffer `local` (all ranks
// receive it). Each rank's shard layout is known from its tp rank, so one all-gather of the
// equal-size local buffers suffices.
std::vector<float> gather_tp_buffer(const ModelConfig& cfg, const ParamLayout& mine,
                                    const float* local, const comm::ProcessGroup& tp) {
  const int P = tp.size();
  const int64_t n = mine.total();
  std::vector<float> all(size_t(n * P));
  tp.all_gather(comm::BufferRef(const_cast<float*>(local), n, DType::f32),
                comm::BufferRef(all.data(), n * P, DType::f32))
      .wait();
  ParamLayout full(cfg);
  std::vector<float> out(size_t(full.total()));
  for (int r = 0; r < P; ++r) {
    ParamLayout lr(cfg, TpShard{r, P});
    const float* src = all.data() + int64_t(r) * n;
    for (const ParamSpec& s : lr.specs()) {
      if (s.replicated() && r != 0) continue;
      float* dst = out.data() + full.find(s.name).offset;
      for_each_global_run(s, 0, s.numel, [&](int64_t l, int64_t g, int64_t len) {
        std::copy(src + s.offset + l, src + s.offset + l + len, dst + g);
      });
    }
  }
  return out;
}

}  // namespace loom::model
