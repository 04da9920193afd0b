#include "model/gpt.h"

#include "model/block.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "attention/flash_attention.h"
#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cpu/vec_math.h"

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

namespace {
TpShard shard_of(const comm::ProcessGroup* tp) {
  return tp && tp->size() > 1 ? TpShard{tp->rank(), tp->size()} : TpShard{};
}
}  // namespace

std::vector<UnitRange> param_units(const ModelConfig& cfg, const ParamLayout& layout) {
  std::vector<UnitRange> u;
  u.push_back({layout.token_embedding(), layout.block(0).norm1_w});
  for (int64_t l = 0; l < cfg.n_layers; ++l)
    u.push_back({layout.block(l).norm1_w, layout.block(l).b_down + cfg.d_model});
  u.push_back({layout.final_norm_w(), layout.total()});
  LOOM_ASSERT(u.front().begin == 0 && u.back().end == layout.total(), "units do not tile the layout");
  for (size_t i = 1; i < u.size(); ++i)
    LOOM_ASSERT(u[i].begin == u[i - 1].end, "units do not tile the layout");
  return u;
}

Gpt::Gpt(const ModelConfig& cfg, MemoryPool& pool, Precision precision,
         const comm::ProcessGroup* tp, ParamStore* store)
    : cfg_(cfg),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      layout_(cfg, shard_of(tp)),
      store_(store),
      pool_(pool),
      precision_(precision) {
  units_ = param_units(cfg_, layout_);
  if (!store_) {
    weights_ = Tensor::empty({layout_.total()}, DType::f32, pool_, MemCategory::weights);
    grads_ = Tensor::zeros({layout_.total()}, DType::f32, pool_, MemCategory::grads);
    if (precision_ == Precision::bf16)
      weights_lp_ = Tensor::empty({layout_.total()}, DType::bf16, pool_, MemCategory::weights);
  }
  recompute_.assign(size_t(cfg_.n_layers), Recompute::none);
}

Gpt::~Gpt() = default;

void Gpt::init_weights(uint64_t seed) {
  LOOM_CHECK(!store_, "init_weights: this model's parameters live in its ParamStore");
  init_params(layout_, cfg_, weights(), seed);
  sync_low_precision_weights();
}

void Gpt::zero_grads() {
  if (grads_.defined()) grads_.fill_zero();
}

void Gpt::sync_low_precision_weights() {
  if (precision_ == Precision::bf16 && weights_lp_.defined())
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

const float* Gpt::unit_w(int u) {
  return store_ ? store_->weights(u) : weights() + units_[size_t(u)].begin;
}
const bf16* Gpt::unit_wl(int u) {
  if (precision_ != Precision::bf16) return nullptr;
  return store_ ? store_->weights_lp(u) : weights_lp_.data<bf16>() + units_[size_t(u)].begin;
}
void Gpt::unit_release(int u) {
  if (store_) store_->release(u);
}
float* Gpt::unit_g(int u) { return store_ ? store_->grads(u) : grads() + units_[size_t(u)].begin; }
void Gpt::unit_grads_done(int u) {
  if (store_)
    store_->grads_done(u);
  else if (grad_ready_)
    grad_ready_(units_[size_t(u)].begin, units_[size_t(u)].end);
}

// A block context whose W/Wl/G point at unit u's first element (offsets rebased to match).
BlockCtx Gpt::block_ctx(int u, bool with_grads, int64_t B, int64_t T) {
  return BlockCtx{cfg_,       pool_, precision_ == Precision::bf16,    unit_w(u), unit_wl(u),
                  with_grads ? unit_g(u) : nullptr, B, T, tp_};
}

Tensor Gpt::forward_trunk(const int32_t* inputs, int64_t B, int64_t T, bool keep_stash) {
  const int64_t N = B * T, C = cfg_.d_model;
  const int L = int(cfg_.n_layers), kHead = L + 1;
  const int64_t H0 = units_[size_t(kHead)].begin;

  // h0 = wte[tokens] + wpe[0..T)                                  (N,C); tp: this rank's rows
  Tensor h;
  {
    const float* E = unit_w(0);
    if (tp_) {
      h = embed_tp(E, inputs, B, T);
    } else {
      h = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
      K::embedding_forward(h.data<float>(), inputs, E + layout_.token_embedding(),
                           E + layout_.position_embedding(), B, T, C, cfg_.vocab, 0);
    }
    unit_release(0);
  }

  stashes_.clear();
  for (int l = 0; l < L; ++l) {
    stashes_.push_back(std::make_unique<BlockStash>());
    // Evaluation keeps nothing but block inputs (and drops even those below).
    Recompute mode = keep_stash ? recompute_[size_t(l)] : Recompute::full;
    BlockCtx c = block_ctx(1 + l, false, B, T);
    h = block_forward(c, rebased(layout_.block(l), units_[size_t(1 + l)].begin), h, nullptr,
                      *stashes_.back(), mode);
    unit_release(1 + l);
    if (!keep_stash) stashes_.back()->x = Tensor();
  }

  // final norm                                                         (Nl,C), Nl local rows
  BlockCtx c = block_ctx(kHead, false, B, T);
  const float* W = c.W;
  const int64_t Nl = c.local_rows();
  final_in_ = h;
  final_out_ = Tensor::empty({Nl, C}, DType::f32, pool_, MemCategory::activations);
  final_mean_ = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  final_rstd_ = Tensor::empty({Nl}, DType::f32, pool_, MemCategory::activations);
  K::layernorm_forward(final_out_.data<float>(), final_mean_.data<float>(),
                       final_rstd_.data<float>(), h.data<float>(), W + layout_.final_norm_w() - H0,
                       W + layout_.final_norm_b() - H0, Nl, C, cfg_.norm_eps);
  Tensor out = final_out_;
  if (cfg_.query_layer) {
    // The query layer's query input: row t of its position table for the input at position t.
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    K::position_forward(qin.data<float>(), W + layout_.query_position() - H0, B, T, C, 0);
    stashes_.push_back(std::make_unique<BlockStash>());
    Recompute mode = keep_stash ? recompute_.back() : Recompute::full;
    out = block_forward(c, rebased(layout_.query_block(), H0), final_out_, &qin, *stashes_.back(),
                        mode);
  }
  unit_release(kHead);
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
  const int L = int(cfg_.n_layers), kHead = L + 1;
  const int64_t H0 = units_[size_t(kHead)].begin;
  Tensor dh;
  {
    BlockCtx c = block_ctx(kHead, true, B, T);
    const float* W = c.W;
    float* G = c.G;
    Tensor d_fin = dout;
    if (cfg_.query_layer) {
      Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
      K::position_forward(qin.data<float>(), W + layout_.query_position() - H0, B, T, C, 0);
      BlockStash& st = *stashes_.back();
      d_fin = block_backward(c, rebased(layout_.query_block(), H0), dout, &qin, st);
      K::position_backward(G + layout_.query_position() - H0, st.q.data<float>(), B, T, C, 0);
      stashes_.pop_back();
    }
    // final norm: dh = LNf'(d_fin)
    const int64_t Nl = c.local_rows();
    dh = Tensor::zeros({Nl, C}, DType::f32, pool_, MemCategory::workspace);
    K::layernorm_backward(dh.data<float>(), G + layout_.final_norm_w() - H0,
                          G + layout_.final_norm_b() - H0, d_fin.data<float>(),
                          final_in_.data<float>(), W + layout_.final_norm_w() - H0,
                          final_mean_.data<float>(), final_rstd_.data<float>(), Nl, C);
    d_fin = Tensor();
    final_in_ = final_out_ = final_mean_ = final_rstd_ = Tensor();
    unit_release(kHead);
    unit_grads_done(kHead);
  }
  for (int l = L - 1; l >= 0; --l) {
    BlockCtx c = block_ctx(1 + l, true, B, T);
    dh = block_backward(c, rebased(layout_.block(l), units_[size_t(1 + l)].begin), dh, nullptr,
                        *stashes_[size_t(l)]);
    stashes_.pop_back();
    unit_release(1 + l);
    unit_grads_done(1 + l);
  }
  // The embeddings' gradient buffer was opened by the head (tied weights).
  float* GE = unit_g(0);
  if (tp_)
    embed_tp_backward(GE, dh, inputs, B, T);
  else
    K::embedding_backward(GE + layout_.token_embedding(), GE + layout_.position_embedding(),
                          dh.data<float>(), inputs, B, T, C, cfg_.vocab, 0);
  unit_grads_done(0);
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

namespace {

// Vocabulary-parallel tied head + cross-entropy over all N rows h (N,C), with this rank's
// vocabulary rows wte [v0, v0+Vl) (Vl,C). Per block of R rows: local logits (R,Vl); the row max
// is all-reduced (max), then the sum of exp(l - max) and the target's logit (held by one rank)
// are all-reduced (sum) together; loss_r = max + log(sum) - l[target]. Backward: dlogits =
// grad_scale * (softmax - onehot) on this rank's columns; dh (N,C) is OVERWRITTEN with this
// rank's partial sum dlogits @ wte (the caller sums over tp), dwte (Vl,C) ACCUMULATES.
template <typename T>
double vocab_parallel_ce(float* dh, float* dwte, int64_t* n_counted, const T* h, const T* wte,
                         int64_t v0, const int32_t* targets, int64_t N, int64_t C, int64_t Vl,
                         float grad_scale, MemoryPool& pool, int64_t rows_per_block,
                         const comm::ProcessGroup& tp) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const bool backward = dh != nullptr;
  const int64_t R_max = std::min(rows_per_block, std::max<int64_t>(N, 1));
  Tensor logits = Tensor::empty({R_max, Vl}, DType::f32, pool, MemCategory::workspace);
  Tensor dl_lo;
  if (kBf16 && backward) dl_lo = Tensor::empty({R_max, Vl}, DType::bf16, pool, MemCategory::workspace);
  std::vector<float> mx(static_cast<size_t>(R_max)), st(static_cast<size_t>(2 * R_max));  // max; (sum, target logit)
  float* lg = logits.data<float>();
  double loss_sum = 0;
  int64_t counted = 0;
  for (int64_t r0 = 0; r0 < N; r0 += R_max) {
    const int64_t R = std::min(R_max, N - r0);
    const T* h_blk = h + r0 * C;
    if constexpr (kBf16) K::matmul_bf16(h_blk, wte, lg, R, Vl, C, false, true, false);
    else K::matmul_f32(h_blk, wte, lg, R, Vl, C, false, true, false);
    for (int64_t i = 0; i < R; ++i) {
      const float* l = lg + i * Vl;
      float m = l[0];
      for (int64_t j = 1; j < Vl; ++j) m = std::max(m, l[j]);
      mx[size_t(i)] = m;
    }
    tp.all_reduce(comm::BufferRef(mx.data(), R, DType::f32), comm::ReduceOp::max).wait();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      float* l = lg + i * Vl;
      const int64_t t = int64_t(targets[r0 + i]) - v0;
      const float m = mx[size_t(i)];
      // The target's logit (held by exactly one rank; 0 elsewhere, summed below).
      st[size_t(2 * i + 1)] = (t >= 0 && t < Vl) ? l[t] : 0.f;
      float sum = 0;
      for (int64_t j = 0; j < Vl; ++j) {
        float e = K::vec::exp_f32(l[j] - m);
        if (backward) l[j] = e;
        sum += e;
      }
      st[size_t(2 * i)] = sum;
    }
    tp.all_reduce(comm::BufferRef(st.data(), 2 * R, DType::f32)).wait();
    for (int64_t i = 0; i < R; ++i) {
      if (targets[r0 + i] < 0) continue;
      loss_sum += double(mx[size_t(i)]) + std::log(double(st[size_t(2 * i)])) -
                  double(st[size_t(2 * i + 1)]);
      ++counted;
    }
    if (!backward) continue;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      float* l = lg + i * Vl;
      const int32_t tgt = targets[r0 + i];
      if (tgt < 0) {
        std::fill(l, l + Vl, 0.0f);
        continue;
      }
      const float scale = grad_scale / st[size_t(2 * i)];
      for (int64_t j = 0; j < Vl; ++j) l[j] *= scale;
      const int64_t t = int64_t(tgt) - v0;
      if (t >= 0 && t < Vl) l[t] -= grad_scale;
    }
    if constexpr (kBf16) {
      bf16* dl = dl_lo.data<bf16>();
      convert_f32_to_bf16(lg, dl, size_t(R * Vl));
      K::matmul_bf16(dl, wte, dh + r0 * C, R, C, Vl, false, false, false);
      K::matmul_bf16(dl, h_blk, dwte, Vl, C, R, true, false, true);
    } else {
      K::matmul_f32(lg, wte, dh + r0 * C, R, C, Vl, false, false, false);
      K::matmul_f32(lg, h_blk, dwte, Vl, C, R, true, false, true);
    }
  }
  if (n_counted) *n_counted = counted;
  return loss_sum;
}

}  // namespace

LossSum Gpt::head_loss(const Tensor& out, const int32_t* targets, int64_t B, int64_t T,
                       float grad_scale, Tensor* dout) {
  const int64_t N = B * T, C = cfg_.d_model;
  LossSum r;
  // The tied head reads the embeddings unit (token table first in it).
  const float* wte = unit_w(0) + layout_.token_embedding();
  const bf16* wte_lp = precision_ == Precision::bf16 ? unit_wl(0) + layout_.token_embedding() : nullptr;
  float* dwte = dout ? unit_g(0) + layout_.token_embedding() : nullptr;
  struct Release {
    Gpt* g;
    ~Release() { g->unit_release(0); }
  } release{this};
  const bool bf = precision_ == Precision::bf16;
  if (!tp_) {
    float* dh = dout ? dout->data<float>() : nullptr;
    if (bf) {
      Tensor out_lp = Tensor::empty({N, C}, DType::bf16, pool_, MemCategory::workspace);
      convert_f32_to_bf16(out.data<float>(), out_lp.data<bf16>(), size_t(N * C));
      r.sum = K::cross_entropy_head_bf16(dh, dwte, &r.count, out_lp.data<bf16>(), wte_lp, targets,
                                         N, C, cfg_.vocab, grad_scale, pool_, kHeadRowsPerBlock);
    } else {
      r.sum = K::cross_entropy_head(dh, dwte, &r.count, out.data<float>(), wte, targets, N, C,
                                    cfg_.vocab, grad_scale, pool_, kHeadRowsPerBlock);
    }
    return r;
  }
  // tp: gather all rows, score this rank's vocabulary rows, reduce-scatter the partial dh.
  BlockCtx c{cfg_, pool_, bf, nullptr, nullptr, nullptr, B, T, tp_};  // for the row helpers
  const ParamSpec& tok = layout_.specs()[0];
  const int64_t v0 = tok.shard_start, Vl = tok.shape[0];
  Tensor all = gather_rows(c, out, /*as_mm=*/true, MemCategory::workspace);  // (N,C)
  Tensor dh_part;
  if (dout) dh_part = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
  float* dh = dout ? dh_part.data<float>() : nullptr;
  if (bf)
    r.sum = vocab_parallel_ce(dh, dwte, &r.count, all.data<bf16>(), wte_lp, v0, targets, N, C,
                              Vl, grad_scale, pool_, kHeadRowsPerBlock, *tp_);
  else
    r.sum = vocab_parallel_ce(dh, dwte, &r.count, all.data<float>(), wte, v0, targets, N, C, Vl,
                              grad_scale, pool_, kHeadRowsPerBlock, *tp_);
  all = Tensor();
  if (dout) {
    Tensor mine = scatter_rows_sum(c, dh_part, MemCategory::workspace);
    std::memcpy(dout->data<float>(), mine.data<float>(), size_t(mine.numel()) * 4);
  }
  return r;
}

Tensor Gpt::embed_tp(const float* E, const int32_t* inputs, int64_t B, int64_t T) {
  const int64_t N = B * T, C = cfg_.d_model, P = tp_->size(), Nl = N / P, r0 = tp_->rank() * Nl;
  const ParamSpec& tok = layout_.specs()[0];
  const int64_t v0 = tok.shard_start, Vl = tok.shape[0];
  const float* wte = E + layout_.token_embedding();
  const float* wpe = E + layout_.position_embedding();
  // Partial (N,C): rows whose token this rank holds; the others are zero. Summed over tp.
  Tensor part = Tensor::zeros({N, C}, DType::f32, pool_, MemCategory::workspace);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = int64_t(inputs[n]) - v0;
    if (t >= 0 && t < Vl)
      std::memcpy(part.data<float>() + n * C, wte + t * C, size_t(C) * 4);
  }
  BlockCtx c{cfg_, pool_, false, nullptr, nullptr, nullptr, B, T, tp_};
  Tensor h = scatter_rows_sum(c, part, MemCategory::activations);  // (Nl,C)
  for (int64_t i = 0; i < Nl; ++i) {
    float* row = h.data<float>() + i * C;
    const float* p = wpe + ((r0 + i) % T) * C;
    for (int64_t j = 0; j < C; ++j) row[j] += p[j];
  }
  return h;
}

void Gpt::embed_tp_backward(float* GE, const Tensor& dh, const int32_t* inputs, int64_t B,
                            int64_t T) {
  const int64_t N = B * T, C = cfg_.d_model, P = tp_->size(), Nl = N / P, r0 = tp_->rank() * Nl;
  const ParamSpec& tok = layout_.specs()[0];
  const int64_t v0 = tok.shard_start, Vl = tok.shape[0];
  float* dwte = GE + layout_.token_embedding();
  float* dwpe = GE + layout_.position_embedding();
  for (int64_t i = 0; i < Nl; ++i) {
    const float* g = dh.data<float>() + i * C;
    float* p = dwpe + ((r0 + i) % T) * C;
    for (int64_t j = 0; j < C; ++j) p[j] += g[j];
  }
  BlockCtx c{cfg_, pool_, false, nullptr, nullptr, nullptr, B, T, tp_};
  Tensor all = gather_rows(c, dh, /*as_mm=*/false, MemCategory::workspace);  // (N,C)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = int64_t(inputs[n]) - v0;
    if (t < 0 || t >= Vl) continue;
    const float* g = all.data<float>() + n * C;
    float* w = dwte + t * C;
    for (int64_t j = 0; j < C; ++j) w[j] += g[j];
  }
}

void Gpt::reduce_replicated_grads() {
  if (!tp_) return;
  LOOM_CHECK(!store_, "tensor parallelism with a ParamStore (ZeRO-2/3) is not available yet");
  int64_t n = 0;
  for (const ParamSpec& s : layout_.specs())
    if (s.replicated()) n += s.numel;
  Tensor buf = Tensor::empty({n}, DType::f32, pool_, MemCategory::comm);
  float* p = buf.data<float>();
  for (const ParamSpec& s : layout_.specs())
    if (s.replicated()) p = std::copy(grads() + s.offset, grads() + s.offset + s.numel, p);
  tp_->all_reduce(comm::BufferRef(buf)).wait();
  p = buf.data<float>();
  for (const ParamSpec& s : layout_.specs())
    if (s.replicated()) {
      std::copy(p, p + s.numel, grads() + s.offset);
      p += s.numel;
    }
}

double Gpt::grad_sum_squares() const {
  LOOM_CHECK(!store_, "grad_sum_squares: the gradients live in the ParamStore");
  if (!tp_) return K::sum_squares(grads(), layout_.total());
  // Shards are disjoint across tp; replicated tensors are counted on tp rank 0 only.
  double ss = 0;
  for (const ParamSpec& s : layout_.specs())
    if (!s.replicated() || tp_->rank() == 0) ss += K::sum_squares(grads() + s.offset, s.numel);
  tp_->all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
  return ss;
}

LossSum Gpt::forward_backward(const int32_t* tokens, int64_t B, int64_t T, float grad_scale) {
  check_inputs(tokens, B, T, T + 1);
  check_tp_rows(B, T);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  const int64_t C = cfg_.d_model;
  Tensor out = forward_trunk(inputs.data(), B, T, /*keep_stash=*/true);
  // Tied head + cross-entropy, fused: dout (rows,C), grads of embed.token accumulate.
  Tensor dout = Tensor::empty({out.shape()[0], C}, DType::f32, pool_, MemCategory::workspace);
  LossSum r = head_loss(out, targets.data(), B, T, grad_scale, &dout);
  out = Tensor();
  backward_trunk(dout, inputs.data(), B, T);
  return r;
}

LossSum Gpt::forward_loss(const int32_t* tokens, int64_t B, int64_t T) {
  check_inputs(tokens, B, T, T + 1);
  check_tp_rows(B, T);
  std::vector<int32_t> inputs, targets;
  split_windows(tokens, B, T, inputs, targets);
  Tensor out = forward_trunk(inputs.data(), B, T, /*keep_stash=*/false);
  LossSum r = head_loss(out, targets.data(), B, T, 1.f, nullptr);
  final_out_ = Tensor();
  return r;
}

void Gpt::check_tp_rows(int64_t B, int64_t T) const {
  LOOM_CHECK(!tp_ || (B * T) % tp_->size() == 0,
             "tensor parallel splits the B*T = {}*{} = {} token rows over tp = {} ranks "
             "(sequence parallel): choose B*T divisible by {}",
             B, T, B * T, tp_->size(), tp_->size());
}

void Gpt::all_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
  LOOM_CHECK(!tp_, "all_logits is not available under tensor parallelism (tp = {})", tp_size());
  check_inputs(inputs, B, T, T);
  Tensor out = forward_trunk(inputs, B, T, /*keep_stash=*/false);
  K::logits_forward(logits, out.data<float>(), unit_w(0) + layout_.token_embedding(), B * T,
                    cfg_.d_model, cfg_.vocab);
  unit_release(0);
  final_out_ = Tensor();
}

void Gpt::last_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T) {
  LOOM_CHECK(!tp_, "last_logits is not available under tensor parallelism (tp = {})", tp_size());
  check_inputs(inputs, B, T, T);
  const int64_t C = cfg_.d_model;
  Tensor out = forward_trunk(inputs, B, T, /*keep_stash=*/false);
  Tensor last = Tensor::empty({B, C}, DType::f32, pool_, MemCategory::workspace);  // (B,C)
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(last.data<float>() + b * C, out.data<float>() + ((b + 1) * T - 1) * C,
                size_t(C) * 4);
  K::logits_forward(logits, last.data<float>(), unit_w(0) + layout_.token_embedding(), B, C,
                    cfg_.vocab);
  unit_release(0);
  final_out_ = Tensor();
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
