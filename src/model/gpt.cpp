#include "model/gpt.h"

#include "model/block.h"
#include "model/head.h"

#include <cmath>
#include <algorithm>
#include <atomic>
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

namespace {
std::atomic<int> g_emulation_override{-1};
}  // namespace

bool bf16_emulated() {
  const int o = g_emulation_override.load();
  if (o >= 0) return o != 0;
  return kernels::bf16_matmul_path() == kernels::Bf16MatmulPath::widen;
}

void set_bf16_emulation_for_testing(int mode) { g_emulation_override.store(mode); }

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
      precision_(precision),
      emulated_(precision == Precision::bf16 && !store && bf16_emulated()) {
  units_ = param_units(cfg_, layout_);
  if (tp_ && precision_ == Precision::bf16) {
    // The tp ranks must agree (the gathered matmul inputs' dtype follows it), and the
    // widen/native choice is timed per process: take rank 0's.
    int32_t e = emulated_ ? 1 : 0;
    tp_->broadcast(comm::BufferRef(&e, 1, DType::i32), 0).wait();
    emulated_ = e != 0;
  }
  if (!store_) {
    weights_ = Tensor::empty({layout_.total()}, DType::f32, pool_, MemCategory::weights);
    grads_ = Tensor::zeros({layout_.total()}, DType::f32, pool_, MemCategory::grads);
    if (precision_ == Precision::bf16)
      weights_lp_ = Tensor::empty({layout_.total()}, emulated_ ? DType::f32 : DType::bf16, pool_,
                                  MemCategory::weights);
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
  if (precision_ != Precision::bf16 || !weights_lp_.defined()) return;
  if (emulated_)
    round_f32_to_bf16(weights(), weights_lp_.data<float>(), size_t(layout_.total()));
  else
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
const float* Gpt::unit_wr(int u) {
  return emulated_ ? weights_lp_.data<float>() + units_[size_t(u)].begin : nullptr;
}
const bf16* Gpt::unit_wl(int u) {
  if (precision_ != Precision::bf16 || emulated_) return nullptr;
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
  return BlockCtx{cfg_, pool_, precision_ == Precision::bf16, unit_w(u), unit_wl(u),
                  with_grads ? unit_g(u) : nullptr, B, T, tp_, unit_wr(u)};
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
      h = vocab_parallel_embedding(BlockCtx{cfg_, pool_, false, nullptr, nullptr, nullptr, B, T, tp_, nullptr},
                                   layout_.specs()[0], E + layout_.token_embedding(),
                                   E + layout_.position_embedding(), inputs);
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
    vocab_parallel_embedding_backward(
        BlockCtx{cfg_, pool_, false, nullptr, nullptr, nullptr, B, T, tp_, nullptr}, layout_.specs()[0],
        GE + layout_.token_embedding(), GE + layout_.position_embedding(), dh, inputs);
  else
    K::embedding_backward(GE + layout_.token_embedding(), GE + layout_.position_embedding(),
                          dh.data<float>(), inputs, B, T, C, cfg_.vocab, 0);
  unit_grads_done(0);
}

void split_windows(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                   std::vector<int32_t>& targets) {
  inputs.resize(size_t(B * T));
  targets.resize(size_t(B * T));
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(&inputs[size_t(b * T)], tokens + b * (T + 1), size_t(T) * 4);
    std::memcpy(&targets[size_t(b * T)], tokens + b * (T + 1) + 1, size_t(T) * 4);
  }
}

LossSum Gpt::head_loss(const Tensor& out, const int32_t* targets, int64_t B, int64_t T,
                       float grad_scale, Tensor* dout) {
  // The tied head reads the embeddings unit (token table first in it).
  const bool bf = precision_ == Precision::bf16;
  const float* w = unit_w(0);  // first: a store gathers the unit here
  const float* wr = unit_wr(0);
  const bf16* wl = unit_wl(0);
  HeadWeights hw{&layout_.specs()[0], w + layout_.token_embedding(),
                 wl ? wl + layout_.token_embedding() : nullptr,
                 dout ? unit_g(0) + layout_.token_embedding() : nullptr,
                 wr ? wr + layout_.token_embedding() : nullptr};
  LossSum r = tied_head_loss(
      BlockCtx{cfg_, pool_, bf, nullptr, nullptr, nullptr, B, T, tp_, hw.wte_r}, hw, out, targets,
      grad_scale, dout, kHeadRowsPerBlock);
  unit_release(0);
  return r;
}

void Gpt::reduce_replicated_grads() {
  if (!tp_) return;
  LOOM_CHECK(!store_, "reduce_replicated_grads: with a ParamStore the store sums them per unit");
  sum_replicated_grads(layout_.specs(), grads(), 0, layout_.total(), *tp_);
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
