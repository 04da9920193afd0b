#include "model/block.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "attention/flash_attention.h"
#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"

namespace loom::model {

namespace K = loom::kernels;



static Tensor new_f32(const BlockCtx& c, const Shape& s, MemCategory cat) {
  return Tensor::empty(s, DType::f32, c.pool, cat);
}

// True when matmul inputs are bf16 tensors (bf16 mode, native path).
static bool lowp(const BlockCtx& c) { return c.bf && c.Wr == nullptr; }

// The matmul input for an f32 activation: in bf16 mode a bf16 copy (or, emulated, an f32 copy
// rounded to bf16 values), else the tensor itself.
static Tensor to_mm(const BlockCtx& c, const Tensor& t, MemCategory cat) {
  if (!c.bf) return t;
  if (c.Wr) {
    Tensor out = Tensor::empty(t.shape(), DType::f32, c.pool, cat);
    round_f32_to_bf16(t.data<float>(), out.data<float>(), size_t(t.numel()));
    return out;
  }
  Tensor out = Tensor::empty(t.shape(), DType::bf16, c.pool, cat);
  convert_f32_to_bf16(t.data<float>(), out.data<bf16>(), size_t(t.numel()));
  return out;
}

// The f32 weights the f32 kernel multiplies: rounded in emulated bf16 mode, else the master.
static const float* wf32(const BlockCtx& c) { return c.Wr ? c.Wr : c.W; }

// y (M,N) = x (M,K) @ W^T, W = weights[w_off] stored (N,K).
static void mm_xwT(const BlockCtx& c, float* y, const Tensor& x, int64_t w_off, int64_t M, int64_t N,
            int64_t K) {
  if (lowp(c))
    K::matmul_bf16(x.data<bf16>(), c.Wl + w_off, y, M, N, K, false, true, false);
  else
    K::matmul_f32(x.data<float>(), wf32(c) + w_off, y, M, N, K, false, true, false);
}

// dx (M,K) = dy (M,N) @ W, W stored (N,K).
static void mm_dyW(const BlockCtx& c, float* dx, const Tensor& dy, int64_t w_off, int64_t M, int64_t N,
            int64_t K) {
  if (lowp(c))
    K::matmul_bf16(dy.data<bf16>(), c.Wl + w_off, dx, M, K, N, false, false, false);
  else
    K::matmul_f32(dy.data<float>(), wf32(c) + w_off, dx, M, K, N, false, false, false);
}

// dW (N,K) += dy^T @ x with dy (M,N), x (M,K).
static void mm_dW(const BlockCtx& c, int64_t g_off, const Tensor& dy, const Tensor& x, int64_t M, int64_t N,
           int64_t K) {
  if (lowp(c))
    K::matmul_bf16(dy.data<bf16>(), x.data<bf16>(), c.G + g_off, N, K, M, true, false, true);
  else
    K::matmul_f32(dy.data<float>(), x.data<float>(), c.G + g_off, N, K, M, true, false, true);
}

// Sequence parallel: this rank's rows (Nl, C) of the residual stream -> all N rows in the matmul
// dtype. Without tp, just the matmul copy.
Tensor gather_rows(const BlockCtx& c, const Tensor& local, bool as_mm, MemCategory cat) {
  const bool bf = as_mm && lowp(c), rounded = as_mm && c.bf && c.Wr;
  if (!c.tp) return as_mm ? to_mm(c, local, cat) : local;
  const int64_t Nl = local.shape()[0], C = local.shape()[1], P = c.tp_size();
  const DType dt = bf ? DType::bf16 : DType::f32;
  Tensor full = Tensor::empty({Nl * P, C}, dt, c.pool, cat);
  const size_t esz = dtype_size(dt);
  char* mine = static_cast<char*>(full.raw()) + size_t(c.tp->rank() * Nl * C) * esz;
  if (bf)
    convert_f32_to_bf16(local.data<float>(), reinterpret_cast<bf16*>(mine), size_t(Nl * C));
  else if (rounded)
    round_f32_to_bf16(local.data<float>(), reinterpret_cast<float*>(mine), size_t(Nl * C));
  else
    std::memcpy(mine, local.data<float>(), size_t(Nl * C) * esz);
  c.tp->all_gather(comm::BufferRef(mine, Nl * C, dt), comm::BufferRef(full)).wait();
  return full;
}

static Tensor gather_rows_mm(const BlockCtx& c, const Tensor& local, MemCategory cat) {
  return gather_rows(c, local, /*as_mm=*/true, cat);
}

// Sequence parallel: partial sums (N, C) of a row-parallel product -> this rank's rows (Nl, C) of
// their sum over tp. Without tp, the input itself.
Tensor scatter_rows_sum(const BlockCtx& c, const Tensor& partial, MemCategory cat) {
  if (!c.tp) return partial;
  const int64_t C = partial.shape()[1];
  Tensor out = Tensor::empty({c.local_rows(), C}, DType::f32, c.pool, cat);
  c.tp->reduce_scatter(comm::BufferRef(partial), comm::BufferRef(out)).wait();
  return out;
}

static std::atomic<int> g_native_attention_override{-1};

void set_native_attention_for_testing(int mode) { g_native_attention_override.store(mode); }

bool native_attention_available() {
  static const bool on = [] {
    const char* env = std::getenv("LOOM_NATIVE_ATTENTION");
    return !(env && std::strcmp(env, "0") == 0) && attention::native_bf16_attention_usable();
  }();
  const int o = g_native_attention_override.load();
  return o < 0 ? on : o == 1 && attention::native_bf16_attention_usable();
}

static int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

int64_t native_attention_workspace_bytes(bool backward, int64_t N, int64_t Cq, int64_t KV,
                                      const attention::AttentionShape& s) {
  return align64(N * (Cq + 2 * KV) * 2) + (backward ? align64(N * Cq * 2) : 0) +
         attention::flash_attention_native_workspace_bytes(backward, s);
}

static bool native_attention(const BlockCtx& c) { return native_attention_used(c.bf, c.cp, c.T); }

// q, k, v of a block (fused: q|k|v rows of `qkv`; query layer: `q` rows and k|v rows of `kv`) as
// bf16 in the same layout at `h` (N x (Cq + 2KV) elements), for the native bf16 kernel.
struct Bf16Qkv {
  const bf16 *q, *k, *v;
};
static Bf16Qkv round_qkv(bf16* h, const float* qkv, const float* q, const float* kv, int64_t N,
                         int64_t Cq, int64_t KV) {
  if (qkv) {
    convert_f32_to_bf16(qkv, h, size_t(N * (Cq + 2 * KV)));
    return {h, h + Cq, h + Cq + KV};
  }
  convert_f32_to_bf16(q, h, size_t(N * Cq));
  convert_f32_to_bf16(kv, h + N * Cq, size_t(N * 2 * KV));
  return {h, h + N * Cq, h + N * Cq + KV};
}

// The native bf16 backward of one block's attention (the fused q|k|v rows `qkv`, or the query layer's
// `q` and `kv`): q, k, v and dout rounded to bf16 into a pool workspace, D = rowsum(dout * out)
// from that bf16 dout (the kernel's contract: each row of dS then sums to zero as exactly as the
// f32 path's), gradients accumulated into the f32 dq / dk / dv (strides of s).
static void native_attention_backward(const BlockCtx& c, float* dq, float* dk, float* dv,
                                   const Tensor& dout, const Tensor& out, const float* qkv,
                                   const float* q, const float* kv, const Tensor& lse,
                                   Tensor& D, const attention::AttentionShape& s, int64_t N,
                                   int64_t Cq, int64_t KV) {
  Tensor ws = Tensor::empty({native_attention_workspace_bytes(true, N, Cq, KV, s)}, DType::u8,
                            c.pool, MemCategory::workspace);
  std::byte* w = static_cast<std::byte*>(ws.raw());
  const Bf16Qkv h = round_qkv(reinterpret_cast<bf16*>(w), qkv, q, kv, N, Cq, KV);
  w += align64(N * (Cq + 2 * KV) * 2);
  bf16* g = reinterpret_cast<bf16*>(w);
  convert_f32_to_bf16(dout.data<float>(), g, size_t(N * Cq));
  attention::attention_backward_preprocess(D.data<float>(), g, out.data<float>(), s);
  w += align64(N * Cq * 2);
  attention::flash_attention_backward_bf16_native(dq, dk, dv, g, h.q, h.k, h.v, lse.data<float>(),
                                               D.data<float>(), s, w);
}

static attention::AttentionShape attention_shape(const BlockCtx& c, int64_t q_stride, int64_t kv_stride) {
  attention::AttentionShape s{};
  s.B = c.B;
  s.Tq = c.T;
  s.Tk = c.T;
  s.NH = c.cfg.n_heads / c.tp_size();  // this rank's heads
  s.NKV = c.cfg.n_kv_heads / c.tp_size();
  s.HD = c.cfg.head_dim();
  s.q_stride = q_stride;
  s.k_stride = kv_stride;
  s.v_stride = kv_stride;
  s.o_stride = s.NH * s.HD;
  s.causal = true;
  s.q_offset = 0;
  s.k_offset = 0;
  s.scale = 1.0f / std::sqrt(float(s.HD));
  return s;
}

// Local sizes. N all rows, Nl this rank's residual rows, C model width, Cq this rank's q (and
// attention output) width, KV its k/v width, F its ffn width. Without tp: Nl = N, Cq = C.
namespace {
K::GeluKind gelu_kind(Activation a) {
  return a == Activation::fast_gelu  ? K::GeluKind::fast
         : a == Activation::gelu_erf ? K::GeluKind::erf
                                     : K::GeluKind::tanh;
}

struct Dims {
  int64_t N, Nl, C, Cq, KV, F;
  explicit Dims(const BlockCtx& c)
      : N(c.rows()), Nl(c.local_rows()), C(c.cfg.d_model), Cq(c.cfg.d_model / c.tp_size()),
        KV(c.cfg.kv_dim() / c.tp_size()), F(c.cfg.d_ff / c.tp_size()) {}
};
}  // namespace

// The key bias adds q_i . b_k to every score of query row i: the same constant for all keys of
// the row (causal mask or not), which softmax cancels. Its gradient is therefore identically zero;
// computed, it is rounding noise (~1e-9) that AdamW, dividing by its own RMS, would turn into
// steps of ~lr in random directions, so the bias would drift and differ between layouts. Keep it
// exactly zero (PyTorch's noise is checked to be ~0 in tests/reference).
static void zero_key_bias_grad(const BlockCtx& c, const BlockOffsets& o, int64_t Cq, int64_t KV) {
  std::fill(c.G + o.b_qkv + Cq, c.G + o.b_qkv + Cq + KV, 0.0f);
}

// Forward of one pre-LN block (see block.h).
Tensor block_forward(const BlockCtx& c, const BlockOffsets& o, const Tensor& x, const Tensor* qin,
                     BlockStash& st, Recompute mode) {
  const Dims d(c);
  const int64_t N = d.N, Nl = d.Nl, C = d.C, Cq = d.Cq, KV = d.KV, F = d.F;
  const float eps = c.cfg.norm_eps;
  const bool keep_all = mode == Recompute::none;
  const bool keep_some = mode != Recompute::full;
  auto cat = [](bool kept) { return kept ? MemCategory::activations : MemCategory::workspace; };
  st = BlockStash{};
  st.mode = mode;
  st.x = x;

  // ln1 = LayerNorm1(x)                                                       (Nl,C)
  // In f32 mode without tp the norm output is itself the matmul input (kept unless recomputed).
  Tensor ln1 = new_f32(c, {Nl, C}, c.bf || c.tp ? MemCategory::workspace : cat(keep_all));
  Tensor mean1 = new_f32(c, {Nl}, cat(keep_some)), rstd1 = new_f32(c, {Nl}, cat(keep_some));
  K::layernorm_forward(ln1.data<float>(), mean1.data<float>(), rstd1.data<float>(),
                       x.data<float>(), c.W + o.norm1_w, c.W + o.norm1_b, Nl, C, eps);
  Tensor ln1_mm = gather_rows_mm(c, ln1, cat(keep_all));  // (N,C)
  ln1 = Tensor();

  // q, k, v. Ordinary block: one (N, Cq+2KV) product. Query layer: q from the position rows,
  // k and v from ln1 (the weight rows [Cq, Cq+2KV) of the fused q|k|v matrix).
  const float *q, *k, *v;
  int64_t q_stride, kv_stride;
  if (!qin) {
    st.qkv = new_f32(c, {N, Cq + 2 * KV}, cat(keep_some));  // (N, Cq+2KV)
    float* qkv = st.qkv.data<float>();
    mm_xwT(c, qkv, ln1_mm, o.w_qkv, N, Cq + 2 * KV, C);
    K::bias_add_rows(qkv, c.W + o.b_qkv, N, Cq + 2 * KV);
    q = qkv;
    k = qkv + Cq;
    v = qkv + Cq + KV;
    q_stride = kv_stride = Cq + 2 * KV;
  } else {
    Tensor qin_mm = to_mm(c, *qin, MemCategory::workspace);
    st.q = new_f32(c, {N, Cq}, cat(keep_some));       // (N,Cq)
    st.kv = new_f32(c, {N, 2 * KV}, cat(keep_some));  // (N,2KV)
    mm_xwT(c, st.q.data<float>(), qin_mm, o.w_qkv, N, Cq, C);
    K::bias_add_rows(st.q.data<float>(), c.W + o.b_qkv, N, Cq);
    mm_xwT(c, st.kv.data<float>(), ln1_mm, o.w_qkv + Cq * C, N, 2 * KV, C);
    K::bias_add_rows(st.kv.data<float>(), c.W + o.b_qkv + Cq, N, 2 * KV);
    q = st.q.data<float>();
    k = st.kv.data<float>();
    v = k + KV;
    q_stride = Cq;
    kv_stride = 2 * KV;
  }

  // att = causal softmax(q k^T / sqrt(HD)) v                               (N,Cq), lse (B,NH,T)
  st.att = new_f32(c, {N, Cq}, cat(keep_some));
  st.lse = new_f32(c, {c.B, c.cfg.n_heads / c.tp_size(), c.T}, cat(keep_some));
  if (c.cp)  // this rank's T rows against the whole sequence over the cp group
    attention::cp_attention_forward(st.att.data<float>(), st.lse.data<float>(), q, k, v,
                                    DType::f32, attention_shape(c, q_stride, kv_stride), *c.cp);
  else if (native_attention(c)) {
    const attention::AttentionShape s = attention_shape(c, q_stride, kv_stride);
    Tensor ws = Tensor::empty({native_attention_workspace_bytes(false, N, Cq, KV, s)}, DType::u8,
                              c.pool, MemCategory::workspace);
    std::byte* w = static_cast<std::byte*>(ws.raw());
    const Bf16Qkv h = round_qkv(reinterpret_cast<bf16*>(w), qin ? nullptr : q, q, k, N, Cq, KV);
    attention::flash_attention_forward_bf16_native(st.att.data<float>(), st.lse.data<float>(), h.q,
                                                h.k, h.v, s, w + align64(N * (Cq + 2 * KV) * 2));
  } else {
    attention::flash_attention_forward(st.att.data<float>(), st.lse.data<float>(), q, k, v,
                                       attention_shape(c, q_stride, kv_stride));
  }
  Tensor att_mm = to_mm(c, st.att, cat(keep_all));

  // mid = x + att @ Wo^T + bo                                                 (Nl,C)
  // (tp: each rank's heads give a partial (N,C) sum, reduce-scattered to its rows)
  Tensor proj = new_f32(c, {N, C}, c.tp ? MemCategory::workspace : cat(keep_some));
  mm_xwT(c, proj.data<float>(), att_mm, o.w_out, N, C, Cq);
  st.mid = scatter_rows_sum(c, proj, cat(keep_some));
  proj = Tensor();
  float* mid = st.mid.data<float>();
  K::bias_add_rows(mid, c.W + o.b_out, Nl, C);
  K::add_inplace(mid, x.data<float>(), Nl * C);

  // ln2 = LayerNorm2(mid); pre = ln2 @ Wup^T + bup; act = gelu(pre)          (N,F)
  Tensor ln2 = new_f32(c, {Nl, C}, c.bf || c.tp ? MemCategory::workspace : cat(keep_all));
  Tensor mean2 = new_f32(c, {Nl}, cat(keep_some)), rstd2 = new_f32(c, {Nl}, cat(keep_some));
  K::layernorm_forward(ln2.data<float>(), mean2.data<float>(), rstd2.data<float>(), mid,
                       c.W + o.norm2_w, c.W + o.norm2_b, Nl, C, eps);
  Tensor ln2_mm = gather_rows_mm(c, ln2, cat(keep_all));  // (N,C)
  ln2 = Tensor();
  Tensor out, act_mm;
  if (o.sparse()) {
    // out = mid + MoE(ln2) (model/moe.h; tp: partial sums reduce-scattered)   (Nl,C)
    Tensor part = moe_ffn_forward(c, o, ln2_mm, st, mode);  // (N,C)
    out = scatter_rows_sum(c, part, MemCategory::activations);
    part = Tensor();
    K::add_inplace(out.data<float>(), mid, Nl * C);
  } else {
    st.pre = new_f32(c, {N, F}, cat(keep_some));
    mm_xwT(c, st.pre.data<float>(), ln2_mm, o.w_up, N, F, C);
    Tensor act = new_f32(c, {N, F}, c.bf ? MemCategory::workspace : cat(keep_all));
    K::bias_gelu_forward(act.data<float>(), st.pre.data<float>(), c.W + o.b_up, N, F,
                         gelu_kind(c.cfg.activation));
    act_mm = to_mm(c, act, cat(keep_all));

    // out = mid + act @ Wdown^T + bdown                                         (Nl,C)
    Tensor down = new_f32(c, {N, C}, c.tp ? MemCategory::workspace : MemCategory::activations);
    mm_xwT(c, down.data<float>(), act_mm, o.w_down, N, C, F);
    out = scatter_rows_sum(c, down, MemCategory::activations);
    down = Tensor();
    K::bias_add_rows(out.data<float>(), c.W + o.b_down, Nl, C);
    K::add_inplace(out.data<float>(), mid, Nl * C);
  }

  if (keep_all) {
    st.ln1_mm = ln1_mm;
    st.att_mm = att_mm;
    st.ln2_mm = ln2_mm;
    if (!o.sparse()) st.act_mm = act_mm;  // a sparse block's FFN keeps its own
  }
  if (keep_some) {
    st.mean1 = mean1;
    st.rstd1 = rstd1;
    st.mean2 = mean2;
    st.rstd2 = rstd2;
  } else {
    // full recompute keeps only the input
    Tensor keep_x = st.x;
    st = BlockStash{};
    st.mode = mode;
    st.x = keep_x;
  }
  return out;
}

// Backward of one block (see block.h). Consumes (clears) the stash.
Tensor block_backward(const BlockCtx& c, const BlockOffsets& o, Tensor& dout, const Tensor* qin,
                      BlockStash& st) {
  const Dims d(c);
  const int64_t N = d.N, Nl = d.Nl, C = d.C, Cq = d.Cq, KV = d.KV, F = d.F;
  const float eps = c.cfg.norm_eps;
  const MemCategory ws = MemCategory::workspace;

  if (st.mode == Recompute::full) {
    Tensor x = st.x;
    block_forward(c, o, x, qin, st, Recompute::none);  // rebuilds every saved tensor
  } else if (st.mode == Recompute::selective) {
    // Rebuild what elementwise kernels make from the kept tensors (identical bits; under tp the
    // norm outputs are gathered again).
    Tensor ln1 = new_f32(c, {Nl, C}, ws), ln2 = new_f32(c, {Nl, C}, ws);
    Tensor m = new_f32(c, {Nl}, ws), r = new_f32(c, {Nl}, ws);
    K::layernorm_forward(ln1.data<float>(), m.data<float>(), r.data<float>(), st.x.data<float>(),
                         c.W + o.norm1_w, c.W + o.norm1_b, Nl, C, eps);
    st.ln1_mm = gather_rows_mm(c, ln1, ws);
    K::layernorm_forward(ln2.data<float>(), m.data<float>(), r.data<float>(),
                         st.mid.data<float>(), c.W + o.norm2_w, c.W + o.norm2_b, Nl, C, eps);
    st.ln2_mm = gather_rows_mm(c, ln2, ws);
    if (o.sparse()) {
      moe_ffn_recompute(c, o, st);
    } else {
      Tensor act = new_f32(c, {N, F}, ws);
      K::gelu_kind_forward(gelu_kind(c.cfg.activation), act.data<float>(), st.pre.data<float>(),
                           N * F);
      st.act_mm = to_mm(c, act, ws);
    }
    st.att_mm = to_mm(c, st.att, ws);
  }

  Tensor d_ln2;  // (Nl,C)
  if (o.sparse()) {
    // tp: the MoE takes every row's output gradient and gives partial d(ln2) sums.
    Tensor dout_all = gather_rows(c, dout, /*as_mm=*/false, ws);  // (N,C)
    Tensor d_ln2_part = moe_ffn_backward(c, o, dout_all, st);     // (N,C)
    dout_all = Tensor();
    st.ln2_mm = Tensor();
    d_ln2 = scatter_rows_sum(c, d_ln2_part, ws);  // (Nl,C)
    d_ln2_part = Tensor();
  } else {
    // FFN down: d_act = dout @ Wdown; dWdown += dout^T act; dbdown += colsum(dout)
    Tensor dout_mm = gather_rows_mm(c, dout, ws);  // (N,C)
    Tensor d_act = new_f32(c, {N, F}, ws);  // (N,F), becomes d_pre in place
    mm_dyW(c, d_act.data<float>(), dout_mm, o.w_down, N, C, F);
    mm_dW(c, o.w_down, dout_mm, st.act_mm, N, C, F);
    K::bias_backward(c.G + o.b_down, dout.data<float>(), Nl, C);
    dout_mm = Tensor();
    st.act_mm = Tensor();

    // activation: d_pre = d_act * act'(pre)
    K::gelu_kind_backward(gelu_kind(c.cfg.activation), d_act.data<float>(), d_act.data<float>(),
                          st.pre.data<float>(), N * F);
    st.pre = Tensor();

    // FFN up: d_ln2 = d_pre @ Wup; dWup += d_pre^T ln2; dbup += colsum(d_pre)
    Tensor d_pre_mm = to_mm(c, d_act, ws);
    Tensor d_ln2_part = new_f32(c, {N, C}, ws);
    mm_dyW(c, d_ln2_part.data<float>(), d_pre_mm, o.w_up, N, F, C);
    mm_dW(c, o.w_up, d_pre_mm, st.ln2_mm, N, F, C);
    K::bias_backward(c.G + o.b_up, d_act.data<float>(), N, F);
    d_pre_mm = Tensor();
    d_act = Tensor();
    st.ln2_mm = Tensor();
    d_ln2 = scatter_rows_sum(c, d_ln2_part, ws);  // (Nl,C)
    d_ln2_part = Tensor();
  }

  // norm2: d_mid = dout + LN2'(d_ln2)       (dout's buffer is reused for d_mid)
  Tensor d_mid = dout;
  K::layernorm_backward(d_mid.data<float>(), c.G + o.norm2_w, c.G + o.norm2_b,
                        d_ln2.data<float>(), st.mid.data<float>(), c.W + o.norm2_w,
                        st.mean2.data<float>(), st.rstd2.data<float>(), Nl, C);
  d_ln2 = Tensor();
  st.mid = Tensor();

  // attention output projection: d_att = d_mid @ Wo; dWo += d_mid^T att
  Tensor d_mid_mm = gather_rows_mm(c, d_mid, ws);  // (N,C)
  Tensor d_att = new_f32(c, {N, Cq}, ws);
  mm_dyW(c, d_att.data<float>(), d_mid_mm, o.w_out, N, C, Cq);
  mm_dW(c, o.w_out, d_mid_mm, st.att_mm, N, C, Cq);
  K::bias_backward(c.G + o.b_out, d_mid.data<float>(), Nl, C);
  d_mid_mm = Tensor();
  st.att_mm = Tensor();

  // attention core
  Tensor D = new_f32(c, {c.B, c.cfg.n_heads / c.tp_size(), c.T}, ws);  // (B,NH,T)
  Tensor d_ln1_part = new_f32(c, {N, C}, ws);
  if (!qin) {
    const int64_t S = Cq + 2 * KV;
    auto s = attention_shape(c, S, S);
    Tensor dqkv = Tensor::zeros({N, S}, DType::f32, c.pool, ws);  // (N, Cq+2KV)
    const float* qkv = st.qkv.data<float>();
    float* g = dqkv.data<float>();
    if (c.cp) {  // computes D itself from out (the forward's att)
      attention::cp_attention_backward(g, g + Cq, g + Cq + KV, d_att.data<float>(), qkv,
                                       qkv + Cq, qkv + Cq + KV, st.att.data<float>(),
                                       st.lse.data<float>(), DType::f32, s, *c.cp);
    } else if (native_attention(c)) {
      native_attention_backward(c, g, g + Cq, g + Cq + KV, d_att, st.att, qkv, nullptr, nullptr,
                             st.lse, D, s, N, Cq, KV);
    } else {
      attention::attention_backward_preprocess(D.data<float>(), d_att.data<float>(),
                                               st.att.data<float>(), s);
      attention::flash_attention_backward(g, g + Cq, g + Cq + KV, d_att.data<float>(), qkv,
                                          qkv + Cq, qkv + Cq + KV, st.lse.data<float>(),
                                          D.data<float>(), s);
    }
    st.qkv = Tensor();
    Tensor dqkv_mm = to_mm(c, dqkv, ws);
    mm_dyW(c, d_ln1_part.data<float>(), dqkv_mm, o.w_qkv, N, S, C);
    mm_dW(c, o.w_qkv, dqkv_mm, st.ln1_mm, N, S, C);
    K::bias_backward(c.G + o.b_qkv, g, N, S);
    zero_key_bias_grad(c, o, Cq, KV);
  } else {
    auto s = attention_shape(c, Cq, 2 * KV);
    Tensor dq = Tensor::zeros({N, Cq}, DType::f32, c.pool, ws);
    Tensor dkv = Tensor::zeros({N, 2 * KV}, DType::f32, c.pool, ws);
    const float* kv = st.kv.data<float>();
    if (c.cp) {
      attention::cp_attention_backward(dq.data<float>(), dkv.data<float>(),
                                       dkv.data<float>() + KV, d_att.data<float>(),
                                       st.q.data<float>(), kv, kv + KV, st.att.data<float>(),
                                       st.lse.data<float>(), DType::f32, s, *c.cp);
    } else if (native_attention(c)) {
      native_attention_backward(c, dq.data<float>(), dkv.data<float>(), dkv.data<float>() + KV,
                             d_att, st.att, nullptr, st.q.data<float>(), kv, st.lse, D, s, N, Cq,
                             KV);
    } else {
      attention::attention_backward_preprocess(D.data<float>(), d_att.data<float>(),
                                               st.att.data<float>(), s);
      attention::flash_attention_backward(dq.data<float>(), dkv.data<float>(),
                                          dkv.data<float>() + KV, d_att.data<float>(),
                                          st.q.data<float>(), kv, kv + KV, st.lse.data<float>(),
                                          D.data<float>(), s);
    }
    st.q = Tensor();
    st.kv = Tensor();
    // q came from the position rows: their grads go to the query position table.
    Tensor dq_mm = to_mm(c, dq, ws);
    Tensor qin_mm = to_mm(c, *qin, ws);
    Tensor d_qin = new_f32(c, {N, C}, ws);
    mm_dyW(c, d_qin.data<float>(), dq_mm, o.w_qkv, N, Cq, C);
    mm_dW(c, o.w_qkv, dq_mm, qin_mm, N, Cq, C);
    K::bias_backward(c.G + o.b_qkv, dq.data<float>(), N, Cq);
    Tensor dkv_mm = to_mm(c, dkv, ws);
    mm_dyW(c, d_ln1_part.data<float>(), dkv_mm, o.w_qkv + Cq * C, N, 2 * KV, C);
    mm_dW(c, o.w_qkv + Cq * C, dkv_mm, st.ln1_mm, N, 2 * KV, C);
    K::bias_backward(c.G + o.b_qkv + Cq, dkv.data<float>(), N, 2 * KV);
    zero_key_bias_grad(c, o, Cq, KV);
    // Hand d_qin back through the stash so the caller can scatter it into the table.
    st.q = d_qin;
  }
  st.att = Tensor();
  st.lse = Tensor();
  st.ln1_mm = Tensor();
  Tensor d_ln1 = scatter_rows_sum(c, d_ln1_part, ws);  // (Nl,C)
  d_ln1_part = Tensor();

  // norm1: dx = d_mid + LN1'(d_ln1)        (d_mid's buffer becomes dx)
  Tensor dx = d_mid;
  K::layernorm_backward(dx.data<float>(), c.G + o.norm1_w, c.G + o.norm1_b, d_ln1.data<float>(),
                        st.x.data<float>(), c.W + o.norm1_w, st.mean1.data<float>(),
                        st.rstd1.data<float>(), Nl, C);
  Tensor d_qin = st.q;
  st = BlockStash{};
  st.q = d_qin;
  return dx;
}


}  // namespace loom::model
