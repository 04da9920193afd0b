#include "model/gpt.h"

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
struct Gpt::Stash {
  Recompute mode = Recompute::none;
  Tensor x;                          // (N,C) block input
  Tensor ln1_mm;                     // (N,C)
  Tensor mean1, rstd1;               // (N)
  Tensor qkv;                        // (N, C+2KV) ordinary block: q, k, v side by side
  Tensor q, kv;                      // query layer: (N,C) and (N,2KV)
  Tensor att, att_mm;                // (N,C) attention output (f32 for D) and its matmul copy
  Tensor lse;                        // (B,NH,T)
  Tensor mid;                        // (N,C) residual after attention
  Tensor ln2_mm;                     // (N,C)
  Tensor mean2, rstd2;               // (N)
  Tensor pre;                        // (N,F) up-projection + bias, before the activation
  Tensor act_mm;                     // (N,F)
};

namespace {

// Everything a block needs to run, gathered once per call.
struct Ctx {
  const ModelConfig& cfg;
  MemoryPool& pool;
  bool bf;          // bf16 matmul inputs
  const float* W;   // f32 master weights
  const bf16* Wl;   // bf16 weights (bf16 mode)
  float* G;         // grads
  int64_t B, T;
};

Tensor new_f32(const Ctx& c, const Shape& s, MemCategory cat) {
  return Tensor::empty(s, DType::f32, c.pool, cat);
}

// The matmul input for an f32 activation: a bf16 copy in bf16 mode, else the tensor itself.
Tensor to_mm(const Ctx& c, const Tensor& t, MemCategory cat) {
  if (!c.bf) return t;
  Tensor out = Tensor::empty(t.shape(), DType::bf16, c.pool, cat);
  convert_f32_to_bf16(t.data<float>(), out.data<bf16>(), size_t(t.numel()));
  return out;
}

// y (M,N) = x (M,K) @ W^T, W = weights[w_off] stored (N,K).
void mm_xwT(const Ctx& c, float* y, const Tensor& x, int64_t w_off, int64_t M, int64_t N,
            int64_t K) {
  if (c.bf)
    K::matmul_bf16(x.data<bf16>(), c.Wl + w_off, y, M, N, K, false, true, false);
  else
    K::matmul_f32(x.data<float>(), c.W + w_off, y, M, N, K, false, true, false);
}

// dx (M,K) = dy (M,N) @ W, W stored (N,K).
void mm_dyW(const Ctx& c, float* dx, const Tensor& dy, int64_t w_off, int64_t M, int64_t N,
            int64_t K) {
  if (c.bf)
    K::matmul_bf16(dy.data<bf16>(), c.Wl + w_off, dx, M, K, N, false, false, false);
  else
    K::matmul_f32(dy.data<float>(), c.W + w_off, dx, M, K, N, false, false, false);
}

// dW (N,K) += dy^T @ x with dy (M,N), x (M,K).
void mm_dW(const Ctx& c, int64_t g_off, const Tensor& dy, const Tensor& x, int64_t M, int64_t N,
           int64_t K) {
  if (c.bf)
    K::matmul_bf16(dy.data<bf16>(), x.data<bf16>(), c.G + g_off, N, K, M, true, false, true);
  else
    K::matmul_f32(dy.data<float>(), x.data<float>(), c.G + g_off, N, K, M, true, false, true);
}

attention::AttentionShape attention_shape(const Ctx& c, int64_t q_stride, int64_t kv_stride) {
  attention::AttentionShape s{};
  s.B = c.B;
  s.Tq = c.T;
  s.Tk = c.T;
  s.NH = c.cfg.n_heads;
  s.NKV = c.cfg.n_kv_heads;
  s.HD = c.cfg.head_dim();
  s.q_stride = q_stride;
  s.k_stride = kv_stride;
  s.v_stride = kv_stride;
  s.o_stride = c.cfg.d_model;
  s.causal = true;
  s.q_offset = 0;
  s.k_offset = 0;
  s.scale = 1.0f / std::sqrt(float(s.HD));
  return s;
}

// Forward of one pre-LN block. `qin` (N,C) is the query input of the top query layer (its rows
// are the query layer's position table) or null for an ordinary block. Fills `st` according to
// `mode` and returns the block output (N,C).
Tensor block_forward(const Ctx& c, const BlockOffsets& o, const Tensor& x, const Tensor* qin,
                     Gpt::Stash& st, Recompute mode) {
  const int64_t N = c.B * c.T, C = c.cfg.d_model, KV = c.cfg.kv_dim(), F = c.cfg.d_ff;
  const float eps = c.cfg.norm_eps;
  const bool keep_all = mode == Recompute::none;
  const bool keep_some = mode != Recompute::full;
  auto cat = [](bool kept) { return kept ? MemCategory::activations : MemCategory::workspace; };
  st = Gpt::Stash{};
  st.mode = mode;
  st.x = x;

  // ln1 = LayerNorm1(x)                                                       (N,C)
  // In f32 mode the norm outputs are themselves the matmul inputs (kept unless recomputed).
  Tensor ln1 = new_f32(c, {N, C}, c.bf ? MemCategory::workspace : cat(keep_all));
  Tensor mean1 = new_f32(c, {N}, cat(keep_some)), rstd1 = new_f32(c, {N}, cat(keep_some));
  K::layernorm_forward(ln1.data<float>(), mean1.data<float>(), rstd1.data<float>(),
                       x.data<float>(), c.W + o.norm1_w, c.W + o.norm1_b, N, C, eps);
  Tensor ln1_mm = to_mm(c, ln1, cat(keep_all));

  // q, k, v. Ordinary block: one (N, C+2KV) product. Query layer: q from the position rows,
  // k and v from ln1 (the weight rows [C, C+2KV) of the fused q|k|v matrix).
  const float *q, *k, *v;
  int64_t q_stride, kv_stride;
  if (!qin) {
    st.qkv = new_f32(c, {N, C + 2 * KV}, cat(keep_some));  // (N, C+2KV)
    float* qkv = st.qkv.data<float>();
    mm_xwT(c, qkv, ln1_mm, o.w_qkv, N, C + 2 * KV, C);
    K::bias_add_rows(qkv, c.W + o.b_qkv, N, C + 2 * KV);
    q = qkv;
    k = qkv + C;
    v = qkv + C + KV;
    q_stride = kv_stride = C + 2 * KV;
  } else {
    Tensor qin_mm = to_mm(c, *qin, MemCategory::workspace);
    st.q = new_f32(c, {N, C}, cat(keep_some));        // (N,C)
    st.kv = new_f32(c, {N, 2 * KV}, cat(keep_some));  // (N,2KV)
    mm_xwT(c, st.q.data<float>(), qin_mm, o.w_qkv, N, C, C);
    K::bias_add_rows(st.q.data<float>(), c.W + o.b_qkv, N, C);
    mm_xwT(c, st.kv.data<float>(), ln1_mm, o.w_qkv + C * C, N, 2 * KV, C);
    K::bias_add_rows(st.kv.data<float>(), c.W + o.b_qkv + C, N, 2 * KV);
    q = st.q.data<float>();
    k = st.kv.data<float>();
    v = k + KV;
    q_stride = C;
    kv_stride = 2 * KV;
  }

  // att = causal softmax(q k^T / sqrt(HD)) v                                  (N,C), lse (B,NH,T)
  st.att = new_f32(c, {N, C}, cat(keep_some));
  st.lse = new_f32(c, {c.B, c.cfg.n_heads, c.T}, cat(keep_some));
  attention::flash_attention_forward(st.att.data<float>(), st.lse.data<float>(), q, k, v,
                                     attention_shape(c, q_stride, kv_stride));
  Tensor att_mm = to_mm(c, st.att, cat(keep_all));

  // mid = x + att @ Wo^T + bo                                                 (N,C)
  st.mid = new_f32(c, {N, C}, cat(keep_some));
  float* mid = st.mid.data<float>();
  mm_xwT(c, mid, att_mm, o.w_out, N, C, C);
  K::bias_add_rows(mid, c.W + o.b_out, N, C);
  K::add_inplace(mid, x.data<float>(), N * C);

  // ln2 = LayerNorm2(mid); pre = ln2 @ Wup^T + bup; act = gelu(pre)          (N,F)
  Tensor ln2 = new_f32(c, {N, C}, c.bf ? MemCategory::workspace : cat(keep_all));
  Tensor mean2 = new_f32(c, {N}, cat(keep_some)), rstd2 = new_f32(c, {N}, cat(keep_some));
  K::layernorm_forward(ln2.data<float>(), mean2.data<float>(), rstd2.data<float>(), mid,
                       c.W + o.norm2_w, c.W + o.norm2_b, N, C, eps);
  Tensor ln2_mm = to_mm(c, ln2, cat(keep_all));
  st.pre = new_f32(c, {N, F}, cat(keep_some));
  mm_xwT(c, st.pre.data<float>(), ln2_mm, o.w_up, N, F, C);
  Tensor act = new_f32(c, {N, F}, c.bf ? MemCategory::workspace : cat(keep_all));
  K::bias_gelu_forward(act.data<float>(), st.pre.data<float>(), c.W + o.b_up, N, F,
                       c.cfg.activation == Activation::fast_gelu);
  Tensor act_mm = to_mm(c, act, cat(keep_all));

  // out = mid + act @ Wdown^T + bdown                                         (N,C)
  Tensor out = new_f32(c, {N, C}, MemCategory::activations);
  mm_xwT(c, out.data<float>(), act_mm, o.w_down, N, C, F);
  K::bias_add_rows(out.data<float>(), c.W + o.b_down, N, C);
  K::add_inplace(out.data<float>(), mid, N * C);

  if (keep_all) {
    st.ln1_mm = ln1_mm;
    st.att_mm = att_mm;
    st.ln2_mm = ln2_mm;
    st.act_mm = act_mm;
  }
  if (keep_some) {
    st.mean1 = mean1;
    st.rstd1 = rstd1;
    st.mean2 = mean2;
    st.rstd2 = rstd2;
  } else {
    // full recompute keeps only the input
    Tensor keep_x = st.x;
    st = Gpt::Stash{};
    st.mode = mode;
    st.x = keep_x;
  }
  return out;
}

// Backward of one block: from dout (N,C), ACCUMULATES parameter grads and returns dx (N,C).
// Consumes (clears) the stash.
Tensor block_backward(const Ctx& c, const BlockOffsets& o, Tensor& dout, const Tensor* qin,
                      Gpt::Stash& st) {
  const int64_t N = c.B * c.T, C = c.cfg.d_model, KV = c.cfg.kv_dim(), F = c.cfg.d_ff;
  const float eps = c.cfg.norm_eps;
  const MemCategory ws = MemCategory::workspace;

  if (st.mode == Recompute::full) {
    Tensor x = st.x;
    block_forward(c, o, x, qin, st, Recompute::none);  // rebuilds every saved tensor
  } else if (st.mode == Recompute::selective) {
    // Rebuild what elementwise kernels make from the kept tensors (identical bits).
    Tensor ln1 = new_f32(c, {N, C}, ws), ln2 = new_f32(c, {N, C}, ws);
    Tensor m = new_f32(c, {N}, ws), r = new_f32(c, {N}, ws);
    K::layernorm_forward(ln1.data<float>(), m.data<float>(), r.data<float>(), st.x.data<float>(),
                         c.W + o.norm1_w, c.W + o.norm1_b, N, C, eps);
    st.ln1_mm = to_mm(c, ln1, ws);
    K::layernorm_forward(ln2.data<float>(), m.data<float>(), r.data<float>(),
                         st.mid.data<float>(), c.W + o.norm2_w, c.W + o.norm2_b, N, C, eps);
    st.ln2_mm = to_mm(c, ln2, ws);
    Tensor act = new_f32(c, {N, F}, ws);
    if (c.cfg.activation == Activation::fast_gelu)
      K::fast_gelu_forward(act.data<float>(), st.pre.data<float>(), N * F);
    else
      K::gelu_forward(act.data<float>(), st.pre.data<float>(), N * F);
    st.act_mm = to_mm(c, act, ws);
    st.att_mm = to_mm(c, st.att, ws);
  }

  // FFN down: d_act = dout @ Wdown; dWdown += dout^T act; dbdown += colsum(dout)
  Tensor dout_mm = to_mm(c, dout, ws);
  Tensor d_act = new_f32(c, {N, F}, ws);  // (N,F), becomes d_pre in place
  mm_dyW(c, d_act.data<float>(), dout_mm, o.w_down, N, C, F);
  mm_dW(c, o.w_down, dout_mm, st.act_mm, N, C, F);
  K::bias_backward(c.G + o.b_down, dout.data<float>(), N, C);
  dout_mm = Tensor();
  st.act_mm = Tensor();

  // activation: d_pre = d_act * act'(pre)
  if (c.cfg.activation == Activation::fast_gelu)
    K::fast_gelu_backward(d_act.data<float>(), d_act.data<float>(), st.pre.data<float>(), N * F);
  else
    K::gelu_backward(d_act.data<float>(), d_act.data<float>(), st.pre.data<float>(), N * F);
  st.pre = Tensor();

  // FFN up: d_ln2 = d_pre @ Wup; dWup += d_pre^T ln2; dbup += colsum(d_pre)
  Tensor d_pre_mm = to_mm(c, d_act, ws);
  Tensor d_ln2 = new_f32(c, {N, C}, ws);
  mm_dyW(c, d_ln2.data<float>(), d_pre_mm, o.w_up, N, F, C);
  mm_dW(c, o.w_up, d_pre_mm, st.ln2_mm, N, F, C);
  K::bias_backward(c.G + o.b_up, d_act.data<float>(), N, F);
  d_pre_mm = Tensor();
  d_act = Tensor();
  st.ln2_mm = Tensor();

  // norm2: d_mid = dout + LN2'(d_ln2)       (dout's buffer is reused for d_mid)
  Tensor d_mid = dout;
  K::layernorm_backward(d_mid.data<float>(), c.G + o.norm2_w, c.G + o.norm2_b,
                        d_ln2.data<float>(), st.mid.data<float>(), c.W + o.norm2_w,
                        st.mean2.data<float>(), st.rstd2.data<float>(), N, C);
  d_ln2 = Tensor();
  st.mid = Tensor();

  // attention output projection: d_att = d_mid @ Wo; dWo += d_mid^T att
  Tensor d_mid_mm = to_mm(c, d_mid, ws);
  Tensor d_att = new_f32(c, {N, C}, ws);
  mm_dyW(c, d_att.data<float>(), d_mid_mm, o.w_out, N, C, C);
  mm_dW(c, o.w_out, d_mid_mm, st.att_mm, N, C, C);
  K::bias_backward(c.G + o.b_out, d_mid.data<float>(), N, C);
  d_mid_mm = Tensor();
  st.att_mm = Tensor();

  // attention core
  Tensor D = new_f32(c, {c.B, c.cfg.n_heads, c.T}, ws);  // (B,NH,T)
  Tensor d_ln1 = new_f32(c, {N, C}, ws);
  if (!qin) {
    const int64_t S = C + 2 * KV;
    auto s = attention_shape(c, S, S);
    attention::attention_backward_preprocess(D.data<float>(), d_att.data<float>(),
                                             st.att.data<float>(), s);
    Tensor dqkv = Tensor::zeros({N, S}, DType::f32, c.pool, ws);  // (N, C+2KV)
    const float* qkv = st.qkv.data<float>();
    float* g = dqkv.data<float>();
    attention::flash_attention_backward(g, g + C, g + C + KV, d_att.data<float>(), qkv, qkv + C,
                                        qkv + C + KV, st.lse.data<float>(), D.data<float>(), s);
    st.qkv = Tensor();
    Tensor dqkv_mm = to_mm(c, dqkv, ws);
    mm_dyW(c, d_ln1.data<float>(), dqkv_mm, o.w_qkv, N, S, C);
    mm_dW(c, o.w_qkv, dqkv_mm, st.ln1_mm, N, S, C);
    K::bias_backward(c.G + o.b_qkv, g, N, S);
  } else {
    auto s = attention_shape(c, C, 2 * KV);
    attention::attention_backward_preprocess(D.data<float>(), d_att.data<float>(),
                                             st.att.data<float>(), s);
    Tensor dq = Tensor::zeros({N, C}, DType::f32, c.pool, ws);
    Tensor dkv = Tensor::zeros({N, 2 * KV}, DType::f32, c.pool, ws);
    const float* kv = st.kv.data<float>();
    attention::flash_attention_backward(dq.data<float>(), dkv.data<float>(),
                                        dkv.data<float>() + KV, d_att.data<float>(),
                                        st.q.data<float>(), kv, kv + KV, st.lse.data<float>(),
                                        D.data<float>(), s);
    st.q = Tensor();
    st.kv = Tensor();
    // q came from the position rows: their grads go to the query position table.
    Tensor dq_mm = to_mm(c, dq, ws);
    Tensor qin_mm = to_mm(c, *qin, ws);
    Tensor d_qin = new_f32(c, {N, C}, ws);
    mm_dyW(c, d_qin.data<float>(), dq_mm, o.w_qkv, N, C, C);
    mm_dW(c, o.w_qkv, dq_mm, qin_mm, N, C, C);
    K::bias_backward(c.G + o.b_qkv, dq.data<float>(), N, C);
    Tensor dkv_mm = to_mm(c, dkv, ws);
    mm_dyW(c, d_ln1.data<float>(), dkv_mm, o.w_qkv + C * C, N, 2 * KV, C);
    mm_dW(c, o.w_qkv + C * C, dkv_mm, st.ln1_mm, N, 2 * KV, C);
    K::bias_backward(c.G + o.b_qkv + C, dkv.data<float>(), N, 2 * KV);
    // Hand d_qin back through the stash so the caller can scatter it into the table.
    st.q = d_qin;
  }
  st.att = Tensor();
  st.lse = Tensor();
  st.ln1_mm = Tensor();

  // norm1: dx = d_mid + LN1'(d_ln1)        (d_mid's buffer becomes dx)
  Tensor dx = d_mid;
  K::layernorm_backward(dx.data<float>(), c.G + o.norm1_w, c.G + o.norm1_b, d_ln1.data<float>(),
                        st.x.data<float>(), c.W + o.norm1_w, st.mean1.data<float>(),
                        st.rstd1.data<float>(), N, C);
  Tensor d_qin = st.q;
  st = Gpt::Stash{};
  st.q = d_qin;
  return dx;
}

}  // namespace

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
  Ctx c{cfg_, pool_, precision_ == Precision::bf16, weights(),
        precision_ == Precision::bf16 ? weights_lp_.data<bf16>() : nullptr, grads(), B, T};
  const float* W = weights();

  // h0 = wte[tokens] + wpe[0..T)                                            (N,C)
  Tensor h = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::activations);
  K::embedding_forward(h.data<float>(), inputs, W + layout_.token_embedding(),
                       W + layout_.position_embedding(), B, T, C, cfg_.vocab, 0);

  stashes_.clear();
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    stashes_.push_back(std::make_unique<Stash>());
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
    stashes_.push_back(std::make_unique<Stash>());
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
  Ctx c{cfg_, pool_, precision_ == Precision::bf16, weights(),
        precision_ == Precision::bf16 ? weights_lp_.data<bf16>() : nullptr, grads(), B, T};
  float* G = grads();
  const float* W = weights();

  Tensor d_fin = dout;
  if (cfg_.query_layer) {
    Tensor qin = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::workspace);
    K::position_forward(qin.data<float>(), W + layout_.query_position(), B, T, C, 0);
    Stash& st = *stashes_.back();
    d_fin = block_backward(c, layout_.query_block(), dout, &qin, st);
    K::position_backward(G + layout_.query_position(), st.q.data<float>(), B, T, C, 0);
    stashes_.pop_back();
  }
  // final norm: dh = LNf'(d_fin)
  Tensor dh = Tensor::zeros({N, C}, DType::f32, pool_, MemCategory::workspace);
  K::layernorm_backward(dh.data<float>(), G + layout_.final_norm_w(), G + layout_.final_norm_b(),
                        d_fin.data<float>(), final_in_.data<float>(), W + layout_.final_norm_w(),
                        final_mean_.data<float>(), final_rstd_.data<float>(), N, C);
  d_fin = Tensor();
  final_in_ = final_out_ = final_mean_ = final_rstd_ = Tensor();
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    dh = block_backward(c, layout_.block(l), dh, nullptr, *stashes_[size_t(l)]);
    stashes_.pop_back();
  }
  K::embedding_backward(G + layout_.token_embedding(), G + layout_.position_embedding(),
                        dh.data<float>(), inputs, B, T, C, cfg_.vocab, 0);
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
                                       targets.data(), N, C, cfg_.vocab, grad_scale, pool_);
  } else {
    r.sum = K::cross_entropy_head(dout.data<float>(), dwte, &r.count, out.data<float>(),
                                  weights() + layout_.token_embedding(), targets.data(), N, C,
                                  cfg_.vocab, grad_scale, pool_);
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
