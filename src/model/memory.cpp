// model/memory.cpp: see memory.h. A replay of the engine's allocations, without allocating.
//
// Glossary: B micro-batch size, T sequence, N = B*T rows, Nl = N/tp local rows, C d_model, Cq =
// C/tp this rank's q width, KV this rank's k/v width, F = d_ff/tp, NHl = n_heads/tp, V vocab,
// Vl = V/tp, D dp size, n_u a unit's ZeRO piece stride, mb micro-batch.
//
// Each function below mirrors one engine function, statement by statement where a buffer is
// allocated or dropped, and names it. When the engine changes how it allocates, change the
// mirror with it: tests/dist/train/test_memory_model.cpp fails otherwise.
#include "model/memory.h"

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <numeric>
#include <tuple>

#include "attention/context_parallel.h"
#include "model/block.h"
#include "core/error.h"
#include "model/geometry.h"
#include "model/head.h"
#include "parallel/schedule.h"

namespace loom::model {

int64_t RankMemory::total() const { return std::accumulate(bytes.begin(), bytes.end(), int64_t(0)); }

namespace {

using Cat = MemCategory;
constexpr Cat kAct = MemCategory::activations, kWs = MemCategory::workspace;

class Tracer;

// A handle to a traced buffer, reference-counted like Tensor storage: its bytes are released when
// the last handle goes. The nodes live in the Tracer (no heap allocation per buffer: a replay
// makes hundreds of thousands of them).
class Buf {
 public:
  Buf() = default;
  Buf(std::nullptr_t) {}  // NOLINT: as a null shared pointer
  Buf(const Buf& o) : t_(o.t_), i_(o.i_) { retain(); }
  Buf(Buf&& o) noexcept : t_(o.t_), i_(o.i_) { o.t_ = nullptr; }
  Buf& operator=(const Buf& o) {
    if (this != &o) {
      Buf keep(o);
      std::swap(t_, keep.t_);
      std::swap(i_, keep.i_);
    }
    return *this;
  }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      reset();
      t_ = o.t_;
      i_ = o.i_;
      o.t_ = nullptr;
    }
    return *this;
  }
  ~Buf() { reset(); }
  inline void reset();
  explicit operator bool() const { return t_ != nullptr; }

 private:
  friend class Tracer;
  Buf(Tracer* t, int32_t i) : t_(t), i_(i) {}
  inline void retain();
  Tracer* t_ = nullptr;
  int32_t i_ = 0;
};

// Running and peak bytes per category.
class Tracer {
 public:
  Tracer() { nodes_.reserve(1024); }
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;

  Buf alloc(int64_t bytes, Cat c) {
    int64_t& cur = cur_[size_t(c)];
    cur += bytes;
    peak_[size_t(c)] = std::max(peak_[size_t(c)], cur);
    int32_t i = free_;
    if (i >= 0) {
      free_ = nodes_[size_t(i)].next_free;
    } else {
      i = int32_t(nodes_.size());
      nodes_.emplace_back();
    }
    nodes_[size_t(i)] = Node{bytes, c, 1, -1};
    return Buf(this, i);
  }
  const std::array<int64_t, kNumMemCategories>& peaks() const { return peak_; }

 private:
  friend class Buf;
  struct Node {
    int64_t bytes = 0;
    Cat cat = Cat::weights;
    int32_t refs = 0;
    int32_t next_free = -1;
  };
  void retain(int32_t i) { ++nodes_[size_t(i)].refs; }
  void release(int32_t i) {
    Node& n = nodes_[size_t(i)];
    if (--n.refs > 0) return;
    cur_[size_t(n.cat)] -= n.bytes;
    n.next_free = free_;
    free_ = i;
  }
  std::array<int64_t, kNumMemCategories> cur_{}, peak_{};
  std::vector<Node> nodes_;
  int32_t free_ = -1;
};

void Buf::reset() {
  if (t_) t_->release(i_);
  t_ = nullptr;
}
void Buf::retain() {
  if (t_) t_->retain(i_);
}

// Sizes of one micro-batch on one rank (BlockCtx and block.cpp's Dims).
struct Dims {
  int64_t B, T, N, Nl, C, Cq, KV, F, NHl, V, Vl;
  int tp;
  bool bf;   // bf16 matmul inputs
  bool emu;  // emulated bf16: the copies are f32 (BlockCtx::Wr set)
  // Sparse blocks (model/moe.h): experts, expert d_ff, choices per token, topk router.
  int64_t E = 0, Fe = 0, k = 1;
  bool topk = false;
  int ep = 1;  // expert parallel: the experts run on R = ep*S rows
  // Context parallel: the attention kernels' workspace per forward / backward call
  // (attention::cp_workspace_bytes), [0] an ordinary block (fused qkv), [1] the query layer.
  int64_t cp_fwd_ws[2] = {0, 0}, cp_bwd_ws[2] = {0, 0};
  // bf16 on the native bf16 kernel (AMX or AVX512-BF16) without cp: the local attention's workspace per forward / backward call
  // (model::native_attention_workspace_bytes), [0] an ordinary block, [1] the query layer.
  int64_t amx_fwd_ws[2] = {0, 0}, amx_bwd_ws[2] = {0, 0};
  int64_t mm_bytes() const { return emu ? 4 : 2; }  // element of a matmul copy (bf only)
  int64_t mm_elem() const { return bf ? mm_bytes() : 4; }  // element of any matmul input
};

// block.cpp's to_mm: the matmul copy of an f32 tensor of `elems` elements.
Buf to_mm(Tracer& tr, const Dims& d, const Buf& t, int64_t elems, Cat cat) {
  if (!d.bf) return t;
  return tr.alloc(elems * d.mm_bytes(), cat);
}
// gather_rows: (Nl,C) local rows -> (N,C) all rows, as the matmul copy or f32.
Buf gather_rows(Tracer& tr, const Dims& d, const Buf& local, bool as_mm, Cat cat) {
  if (d.tp == 1) return as_mm ? to_mm(tr, d, local, d.Nl * d.C, cat) : local;
  return tr.alloc(d.N * d.C * (as_mm && d.bf && !d.emu ? 2 : 4), cat);
}
Buf gather_rows_mm(Tracer& tr, const Dims& d, const Buf& local, Cat cat) {
  return gather_rows(tr, d, local, true, cat);
}
// scatter_rows_sum: (N,C) partial sums -> (Nl,C).
Buf scatter_rows_sum(Tracer& tr, const Dims& d, const Buf& partial, Cat cat) {
  if (d.tp == 1) return partial;
  return tr.alloc(d.Nl * d.C * 4, cat);
}

// block.h's BlockStash.
struct Stash {
  Recompute mode = Recompute::none;
  Buf x, ln1_mm, mean1, rstd1, qkv, q, kv, att, att_mm, lse, mid, ln2_mm, mean2, rstd2, pre, act_mm;
  Buf moe_meta, moe_w, moe_probs, moe_xs, moe_y;  // sparse blocks
};

// moe.cpp: moe_ffn_forward (S = N*k packed slots; R = ep*S rows on the experts). Returns the
// FFN output (N,C).
Buf moe_ffn_forward(Tracer& tr, const Dims& d, Stash& st, Recompute mode) {
  const int64_t N = d.N, C = d.C, S = N * d.k, Fe = d.Fe, R = d.ep * S;
  const bool keep_all = mode == Recompute::none, keep_some = mode != Recompute::full;
  const bool ep = d.ep > 1;
  auto cat = [](bool kept) { return kept ? kAct : kWs; };
  // route
  st.moe_meta = tr.alloc(3 * S * 4, cat(keep_some));  // (3,S) int32
  st.moe_w = tr.alloc(N * d.k * 4, cat(keep_some));   // (N,k)
  if (d.topk) st.moe_probs = tr.alloc(N * d.E * 4, cat(keep_some));  // (N,E)
  Buf xs = tr.alloc(S * C * d.mm_elem(), ep ? kWs : cat(keep_all));  // (S,C)
  if (ep) xs = tr.alloc(R * C * d.mm_elem(), cat(keep_some));        // (R,C) received rows
  st.pre = tr.alloc(R * Fe * 4, cat(keep_some));                     // (R,Fe)
  Buf act = tr.alloc(R * Fe * 4, d.bf ? kWs : cat(keep_all));
  Buf act_mm = to_mm(tr, d, act, R * Fe, cat(keep_all));
  act.reset();
  const Cat y_cat = d.topk ? cat(keep_some) : kWs;
  Buf y = tr.alloc(R * C * 4, ep ? kWs : y_cat);  // (R,C)
  if (ep) y = tr.alloc(S * C * 4, y_cat);         // (S,C) sent back
  Buf out = tr.alloc(N * C * 4, d.tp > 1 ? kWs : kAct);  // (N,C) (tp: partial sums)
  if (keep_all || (ep && keep_some)) st.moe_xs = xs;
  if (keep_all) st.act_mm = act_mm;
  if (d.topk && keep_some) st.moe_y = y;
  return out;
}
// moe.cpp: moe_ffn_recompute (selective).
void moe_ffn_recompute(Tracer& tr, const Dims& d, Stash& st) {
  const int64_t S = d.N * d.k, R = d.ep * S;
  if (d.ep == 1) st.moe_xs = tr.alloc(S * d.C * d.mm_elem(), kWs);
  Buf act = tr.alloc(R * d.Fe * 4, kWs);
  st.act_mm = to_mm(tr, d, act, R * d.Fe, kWs);
}
// moe.cpp: moe_ffn_backward. Returns d(ln2) (N,C).
Buf moe_ffn_backward(Tracer& tr, const Dims& d, Stash& st) {
  const int64_t N = d.N, C = d.C, S = N * d.k, Fe = d.Fe, R = d.ep * S;
  const bool ep = d.ep > 1;
  Buf dys = tr.alloc(S * C * 4, kWs);
  Buf d_logits;
  if (d.topk) {
    d_logits = tr.alloc(N * d.E * 4, kWs);
    st.moe_y.reset();
    st.moe_probs.reset();
  }
  if (ep) dys = tr.alloc(R * C * 4, kWs);  // received output gradients (R,C)
  Buf dys_mm = to_mm(tr, d, dys, R * C, kWs);
  Buf d_act = tr.alloc(R * Fe * 4, kWs);
  dys_mm.reset();
  dys.reset();
  st.act_mm.reset();
  st.pre.reset();
  Buf d_pre_mm = to_mm(tr, d, d_act, R * Fe, kWs);
  Buf dxs = tr.alloc(R * C * 4, kWs);
  d_pre_mm.reset();
  d_act.reset();
  st.moe_xs.reset();
  if (ep) dxs = tr.alloc(S * C * 4, kWs);  // input gradients back in slot order (S,C)
  Buf d_ln2 = tr.alloc(N * C * 4, kWs);
  if (d.topk) Buf dl_mm = to_mm(tr, d, d_logits, N * d.E, kWs);
  st.moe_meta.reset();
  st.moe_w.reset();
  return d_ln2;
}

// Full recompute's stash: the block input alone.
Stash keep_only_input(const Stash& st) {
  Stash only;
  only.mode = st.mode;
  only.x = st.x;
  return only;
}

// block.cpp: block_forward.
Buf block_forward(Tracer& tr, const Dims& d, const Buf& x, const Buf* qin, Stash& st,
                  Recompute mode, bool sparse = false) {
  const int64_t N = d.N, Nl = d.Nl, C = d.C, Cq = d.Cq, KV = d.KV, F = d.F;
  const bool keep_all = mode == Recompute::none, keep_some = mode != Recompute::full;
  auto cat = [](bool kept) { return kept ? kAct : kWs; };
  st = Stash{};
  st.mode = mode;
  st.x = x;
  Buf ln1 = tr.alloc(Nl * C * 4, d.bf || d.tp > 1 ? kWs : cat(keep_all));  // (Nl,C)
  Buf mean1 = tr.alloc(Nl * 4, cat(keep_some)), rstd1 = tr.alloc(Nl * 4, cat(keep_some));
  Buf ln1_mm = gather_rows_mm(tr, d, ln1, cat(keep_all));  // (N,C)
  ln1.reset();
  if (!qin) {
    st.qkv = tr.alloc(N * (Cq + 2 * KV) * 4, cat(keep_some));  // (N, Cq+2KV)
  } else {
    Buf qin_mm = to_mm(tr, d, *qin, N * C, kWs);
    st.q = tr.alloc(N * Cq * 4, cat(keep_some));       // (N,Cq)
    st.kv = tr.alloc(N * 2 * KV * 4, cat(keep_some));  // (N,2KV)
  }
  st.att = tr.alloc(N * Cq * 4, cat(keep_some));             // (N,Cq)
  st.lse = tr.alloc(d.B * d.NHl * d.T * 4, cat(keep_some));  // (B,NH,T)
  if (d.cp_fwd_ws[qin ? 1 : 0]) Buf cp_ws = tr.alloc(d.cp_fwd_ws[qin ? 1 : 0], kWs);  // cp forward
  if (d.amx_fwd_ws[qin ? 1 : 0]) Buf amx_ws = tr.alloc(d.amx_fwd_ws[qin ? 1 : 0], kWs);  // native bf16
  Buf att_mm = to_mm(tr, d, st.att, N * Cq, cat(keep_all));
  Buf proj = tr.alloc(N * C * 4, d.tp > 1 ? kWs : cat(keep_some));  // (N,C)
  st.mid = scatter_rows_sum(tr, d, proj, cat(keep_some));          // (Nl,C)
  proj.reset();
  Buf ln2 = tr.alloc(Nl * C * 4, d.bf || d.tp > 1 ? kWs : cat(keep_all));
  Buf mean2 = tr.alloc(Nl * 4, cat(keep_some)), rstd2 = tr.alloc(Nl * 4, cat(keep_some));
  Buf ln2_mm = gather_rows_mm(tr, d, ln2, cat(keep_all));
  ln2.reset();
  Buf out, act_mm;
  if (sparse) {
    Buf part = moe_ffn_forward(tr, d, st, mode);  // (N,C)
    out = scatter_rows_sum(tr, d, part, kAct);    // (Nl,C)
    part.reset();
  } else {
    st.pre = tr.alloc(N * F * 4, cat(keep_some));         // (N,F)
    Buf act = tr.alloc(N * F * 4, d.bf ? kWs : cat(keep_all));  // (N,F)
    act_mm = to_mm(tr, d, act, N * F, cat(keep_all));
    Buf down = tr.alloc(N * C * 4, d.tp > 1 ? kWs : kAct);  // (N,C)
    out = scatter_rows_sum(tr, d, down, kAct);              // (Nl,C)
    down.reset();
  }
  // What the stash keeps (the rest is dropped when this returns); full keeps only the input.
  if (keep_all) std::tie(st.ln1_mm, st.att_mm, st.ln2_mm) = std::tie(ln1_mm, att_mm, ln2_mm);
  if (keep_all && !sparse) st.act_mm = act_mm;
  if (keep_some) std::tie(st.mean1, st.rstd1, st.mean2, st.rstd2) = std::tie(mean1, rstd1, mean2, rstd2);
  else
    st = keep_only_input(st);
  return out;
}

// block.cpp: block_backward. Returns dx (dout's buffer).
Buf block_backward(Tracer& tr, const Dims& d, Buf dout, const Buf* qin, Stash& st,
                   bool sparse = false) {
  const int64_t N = d.N, Nl = d.Nl, C = d.C, Cq = d.Cq, KV = d.KV, F = d.F;
  if (st.mode == Recompute::full) {
    Buf x = st.x;
    block_forward(tr, d, x, qin, st, Recompute::none, sparse);  // its output is dropped at once
  } else if (st.mode == Recompute::selective) {
    Buf ln1 = tr.alloc(Nl * C * 4, kWs), ln2 = tr.alloc(Nl * C * 4, kWs);
    Buf m = tr.alloc(Nl * 4, kWs), r = tr.alloc(Nl * 4, kWs);
    st.ln1_mm = gather_rows_mm(tr, d, ln1, kWs);
    st.ln2_mm = gather_rows_mm(tr, d, ln2, kWs);
    if (sparse) {
      moe_ffn_recompute(tr, d, st);
    } else {
      Buf act = tr.alloc(N * F * 4, kWs);
      st.act_mm = to_mm(tr, d, act, N * F, kWs);
    }
    st.att_mm = to_mm(tr, d, st.att, N * Cq, kWs);
  }
  Buf d_ln2;
  if (sparse) {
    Buf dout_all = gather_rows(tr, d, dout, false, kWs);  // (N,C)
    Buf part = moe_ffn_backward(tr, d, st);               // (N,C)
    dout_all.reset();
    st.ln2_mm.reset();
    d_ln2 = scatter_rows_sum(tr, d, part, kWs);  // (Nl,C)
    part.reset();
  } else {
    // FFN down
    Buf dout_mm = gather_rows_mm(tr, d, dout, kWs);
    Buf d_act = tr.alloc(N * F * 4, kWs);  // (N,F)
    dout_mm.reset();
    st.act_mm.reset();
    st.pre.reset();
    // FFN up
    Buf d_pre_mm = to_mm(tr, d, d_act, N * F, kWs);
    Buf d_ln2_part = tr.alloc(N * C * 4, kWs);
    d_pre_mm.reset();
    d_act.reset();
    st.ln2_mm.reset();
    d_ln2 = scatter_rows_sum(tr, d, d_ln2_part, kWs);
    d_ln2_part.reset();
  }
  // norm2 (dout's buffer becomes d_mid)
  Buf d_mid = dout;
  d_ln2.reset();
  st.mid.reset();
  // attention output projection
  Buf d_mid_mm = gather_rows_mm(tr, d, d_mid, kWs);
  Buf d_att = tr.alloc(N * Cq * 4, kWs);
  d_mid_mm.reset();
  st.att_mm.reset();
  // attention core
  Buf D = tr.alloc(d.B * d.NHl * d.T * 4, kWs);
  Buf d_ln1_part = tr.alloc(N * C * 4, kWs);
  if (!qin) {
    const int64_t S = Cq + 2 * KV;
    Buf dqkv = tr.alloc(N * S * 4, kWs);
    if (d.cp_bwd_ws[0]) Buf cp_ws = tr.alloc(d.cp_bwd_ws[0], kWs);  // cp_attention_backward
    if (d.amx_bwd_ws[0]) Buf amx_ws = tr.alloc(d.amx_bwd_ws[0], kWs);  // native bf16 backward
    st.qkv.reset();
    Buf dqkv_mm = to_mm(tr, d, dqkv, N * S, kWs);
  } else {
    Buf dq = tr.alloc(N * Cq * 4, kWs), dkv = tr.alloc(N * 2 * KV * 4, kWs);
    if (d.cp_bwd_ws[1]) Buf cp_ws = tr.alloc(d.cp_bwd_ws[1], kWs);  // cp_attention_backward
    if (d.amx_bwd_ws[1]) Buf amx_ws = tr.alloc(d.amx_bwd_ws[1], kWs);  // native bf16 backward
    st.q.reset();
    st.kv.reset();
    Buf dq_mm = to_mm(tr, d, dq, N * Cq, kWs);
    Buf qin_mm = to_mm(tr, d, *qin, N * C, kWs);
    Buf d_qin = tr.alloc(N * C * 4, kWs);
    Buf dkv_mm = to_mm(tr, d, dkv, N * 2 * KV, kWs);
    st.q = d_qin;
  }
  st.att.reset();
  st.lse.reset();
  st.ln1_mm.reset();
  Buf d_ln1 = scatter_rows_sum(tr, d, d_ln1_part, kWs);
  d_ln1_part.reset();
  Buf dx = d_mid;
  Buf d_qin = st.q;
  st = Stash{};
  st.q = d_qin;
  return dx;
}

// head.cpp: tied_head_loss in training (with dout); `out` is the head input (Nl,C).
void tied_head_loss(Tracer& tr, const Dims& d) {
  if (d.tp == 1) {
    const int64_t R = std::min(kHeadRowsPerBlock, std::max<int64_t>(d.N, 1));
    Buf copy;  // the head input rounded (emulated) or as bf16
    if (d.bf) copy = tr.alloc(d.N * d.C * d.mm_bytes(), kWs);
    // kernels::cross_entropy_head(_bf16): logits (R,V) f32, and their bf16 gradient (R,V)
    Buf logits = tr.alloc(R * d.V * 4, kWs);
    Buf dlogits_lo;
    if (d.bf && !d.emu) dlogits_lo = tr.alloc(R * d.V * 2, kWs);
    return;
  }
  Buf all = gather_rows(tr, d, nullptr, /*as_mm=*/true, kWs);  // (N,C)
  Buf dh_part = tr.alloc(d.N * d.C * 4, kWs);                   // (N,C)
  {
    // vocab_parallel_ce: logits (R,Vl) f32 and their bf16 gradient
    const int64_t R = std::min(kHeadRowsPerBlock, std::max<int64_t>(d.N, 1));
    Buf logits = tr.alloc(R * d.Vl * 4, kWs);
    Buf dl_lo;
    if (d.bf && !d.emu) dl_lo = tr.alloc(R * d.Vl * 2, kWs);
  }
  all.reset();
  Buf mine = scatter_rows_sum(tr, d, dh_part, kWs);
}

// train/zero.cpp: ZeroStore's allocations.
class StoreTrace {
 public:
  StoreTrace(Tracer& tr, int stage, bool bf, int D, int r, const std::vector<UnitRange>& units,
             int64_t total)
      : tr_(tr), stage_(stage), bf_(bf), D_(D), units_(units), live_(units.size()) {
    for (const UnitRange& u : units) {
      const UnitRange p = zero_piece(u, D, r);
      n_.push_back(zero_piece_stride(u, D));
      shard_ += p.end - p.begin;
    }
    gshard_ = tr_.alloc(shard_ * 4, Cat::grads);
    if (stage_ == 2) {
      wfull_ = tr_.alloc(total * 4, Cat::weights);
      if (bf_) wfull_lp_ = tr_.alloc(total * 2, Cat::weights);
    } else {
      wshard_ = tr_.alloc(shard_ * 4, Cat::weights);
    }
  }
  int64_t shard() const { return shard_; }
  void weights(int u) {
    if (stage_ == 2) return;
    Live& l = live_[size_t(u)];
    if (l.refs++ == 0) l.w = tr_.alloc(n_[size_t(u)] * D_ * 4, Cat::weights);
  }
  void weights_lp(int u) {
    if (stage_ == 2) return;
    Live& l = live_[size_t(u)];
    if (!l.wl) l.wl = tr_.alloc(len(u) * 2, Cat::weights);
  }
  void release(int u) {
    if (stage_ == 2) return;
    Live& l = live_[size_t(u)];
    if (--l.refs == 0) l.w.reset(), l.wl.reset();
  }
  void grads(int u) {
    Live& l = live_[size_t(u)];
    if (!l.g) l.g = tr_.alloc(n_[size_t(u)] * D_ * 4, Cat::grads);
  }
  void grads_done(int u) {
    Live& l = live_[size_t(u)];
    Buf out = tr_.alloc(n_[size_t(u)] * 4, Cat::grads);
    pending_.push_back({l.g, out});
    l.g.reset();
    while (pending_.size() > kMaxInFlight) pending_.pop_front();
  }
  void finish_micro_batch() { pending_.clear(); }
  // A bound stops the forward and backward work (memory.h): what it holds goes.
  void drop_in_flight() {
    for (Live& l : live_) l = Live{};
    pending_.clear();
  }
  void step() {
    if (stage_ != 2) return;
    Buf packed = tr_.alloc(shard_ * 4, kWs);
    for (size_t u = 0; u < units_.size(); ++u) Buf b = tr_.alloc(n_[u] * D_ * 4, kWs);
  }

 private:
  static constexpr size_t kMaxInFlight = 2;  // ZeroStore::kMaxInFlight
  struct Live {
    Buf w, wl, g;
    int refs = 0;
  };
  int64_t len(int u) const { return units_[size_t(u)].end - units_[size_t(u)].begin; }
  Tracer& tr_;
  int stage_;
  bool bf_;
  int D_;
  std::vector<UnitRange> units_;
  std::vector<int64_t> n_;
  int64_t shard_ = 0;
  Buf gshard_, wfull_, wfull_lp_, wshard_;
  std::vector<Live> live_;
  std::deque<std::pair<Buf, Buf>> pending_;
};

// stage.cpp: GptStage's allocations for one chunk.
class StageTrace {
 public:
  // hole_elements: elements without an f32 copy in the pool (ECSS in bf16: the
  // experts' weight matrices, model::ecss_master_holes).
  StageTrace(Tracer& tr, const ModelConfig& cfg, const StageGeometry& geo, const Dims& d,
             StoreTrace* store, const std::vector<Recompute>& recompute, int micro_batches,
             int64_t hole_elements = 0)
      : tr_(tr), cfg_(cfg), geo_(geo), d_(d), store_(store), recompute_(recompute),
        stash_(size_t(micro_batches)) {
    if (!store_) {
      const int64_t n = geo_.total();
      weights_ = tr_.alloc((n - hole_elements) * 4, Cat::weights);
      grads_ = tr_.alloc(n * 4, Cat::grads);
      if (d_.bf) weights_lp_ = tr_.alloc(n * (d_.emu ? 4 : 2), Cat::weights);
    }
  }

  Buf forward(int mb, const Buf& x) {
    LOOM_ASSERT(mb >= 0 && size_t(mb) < stash_.size() && !stash_[size_t(mb)],
                "memory model: forward of micro-batch {} twice", mb);
    auto st = std::make_unique<Micro>();
    Buf out = run_trunk(x, *st);
    const StageSpan& sp = geo_.span();
    if (!sp.has_head) {
      stash_[size_t(mb)] = std::move(st);
      return out;
    }
    const int ut = geo_.token_unit();
    unit_w(ut);
    unit_wl(ut);
    st->dhead = tr_.alloc(d_.Nl * d_.C * 4, kAct);  // (Nl,C)
    unit_g(ut);
    tied_head_loss(tr_, d_);
    unit_release(ut);
    unit_grads_done(ut);
    stash_[size_t(mb)] = std::move(st);
    return nullptr;  // the head input `out` is dropped here
  }

  // A bound stops the forward and backward work (memory.h): the stashes go.
  void drop_in_flight() {
    for (auto& m : stash_) m.reset();
  }

  Buf backward(int mb, Buf dy) {
    LOOM_ASSERT(mb >= 0 && size_t(mb) < stash_.size() && stash_[size_t(mb)],
                "memory model: backward of micro-batch {} without forward", mb);
    Micro& st = *stash_[size_t(mb)];
    const StageSpan& sp = geo_.span();
    Buf dh;
    if (sp.has_head) {
      const int uh = geo_.head_unit();
      ctx(uh, true);
      Buf d_fin = st.dhead;
      if (cfg_.query_layer) {
        Buf qin = tr_.alloc(d_.N * d_.C * 4, kWs);  // (N,C)
        d_fin = block_backward(tr_, d_, st.dhead, &qin, *st.query);
        st.query.reset();
      }
      dh = tr_.alloc(d_.Nl * d_.C * 4, kWs);  // (Nl,C)
      d_fin.reset();
      st.dhead.reset();
      st.final_in.reset();
      st.final_out.reset();
      st.final_mean.reset();
      st.final_rstd.reset();
      unit_release(uh);
      unit_grads_done(uh);
    } else {
      dh = dy;
    }
    for (size_t i = geo_.blocks().size(); i-- > 0;) {
      const int u = geo_.first_block_unit() + int(i);
      ctx(u, true);
      dh = block_backward(tr_, d_, dh, nullptr, st.blocks[i], geo_.blocks()[i].sparse());
      st.blocks[i] = Stash{};
      unit_release(u);
      unit_grads_done(u);
    }
    if (sp.has_embedding) {
      unit_g(geo_.token_unit());
      unit_g(geo_.position_unit());
      if (d_.tp > 1) Buf all = gather_rows(tr_, d_, dh, /*as_mm=*/false, kWs);
      unit_grads_done(geo_.position_unit());
      unit_grads_done(geo_.token_unit());
      dh.reset();
    }
    stash_[size_t(mb)].reset();
    return dh;
  }

 private:
  struct Micro {
    std::vector<Stash> blocks;
    std::unique_ptr<Stash> query;
    Buf final_in, final_mean, final_rstd, final_out, dhead;
  };

  Buf run_trunk(const Buf& x, Micro& st) {
    const StageSpan& sp = geo_.span();
    Buf h;
    if (sp.has_embedding) {
      unit_w(geo_.token_unit());
      unit_w(geo_.position_unit());
      if (d_.tp > 1) {
        Buf part = tr_.alloc(d_.N * d_.C * 4, kWs);  // vocab_parallel_embedding (N,C)
        h = scatter_rows_sum(tr_, d_, part, kAct);
      } else {
        h = tr_.alloc(d_.N * d_.C * 4, kAct);
      }
      unit_release(geo_.position_unit());
      unit_release(geo_.token_unit());
    } else {
      h = x;
    }
    st.blocks.resize(geo_.blocks().size());
    for (size_t i = 0; i < geo_.blocks().size(); ++i) {
      const int u = geo_.first_block_unit() + int(i);
      ctx(u, false);
      h = block_forward(tr_, d_, h, nullptr, st.blocks[i], mode_of(sp.first_layer + int64_t(i)),
                        geo_.blocks()[i].sparse());
      unit_release(u);
    }
    if (!sp.has_head) return h;
    const int uh = geo_.head_unit();
    ctx(uh, false);
    Buf final_out = tr_.alloc(d_.Nl * d_.C * 4, kAct);
    Buf mean = tr_.alloc(d_.Nl * 4, kAct), rstd = tr_.alloc(d_.Nl * 4, kAct);
    st.final_in = h;
    st.final_mean = mean;
    st.final_rstd = rstd;
    st.final_out = final_out;
    h.reset();
    mean.reset();
    rstd.reset();
    Buf out = final_out;
    if (cfg_.query_layer) {
      Buf qin = tr_.alloc(d_.N * d_.C * 4, kWs);  // (N,C)
      auto qs = std::make_unique<Stash>();
      const Recompute mode = recompute_.empty() ? Recompute::none : recompute_.back();
      out = block_forward(tr_, d_, final_out, &qin, *qs, mode);
      st.query = std::move(qs);
    }
    unit_release(uh);
    return out;
  }

  Recompute mode_of(int64_t layer) const {
    return recompute_.empty() ? Recompute::none : recompute_.at(size_t(layer));
  }
  // GptStage's unit access: through the store, or the stage's own buffers (nothing to count).
  void unit_w(int u) {
    if (store_) store_->weights(u);
  }
  void unit_wl(int u) {
    if (store_ && d_.bf) store_->weights_lp(u);  // under a store bf16 is never emulated
  }
  void unit_release(int u) {
    if (store_) store_->release(u);
  }
  void unit_g(int u) {
    if (store_) store_->grads(u);
  }
  void unit_grads_done(int u) {
    if (store_) store_->grads_done(u);
  }
  void ctx(int u, bool with_grads) {
    unit_w(u);
    unit_wl(u);
    if (with_grads) unit_g(u);
  }

  Tracer& tr_;
  const ModelConfig& cfg_;
  const StageGeometry& geo_;
  Dims d_;
  StoreTrace* store_;
  const std::vector<Recompute>& recompute_;
  Buf weights_, grads_, weights_lp_;
  std::vector<std::unique_ptr<Micro>> stash_;  // by micro-batch, while in flight
};

}  // namespace

MemoryReplayer::MemoryReplayer(const ModelConfig& cfg, size_t max_geometries)
    : cfg_(cfg), max_geometries_(max_geometries) {}

MemoryReplayer::~MemoryReplayer() = default;

const StageGeometry& MemoryReplayer::geometry(const StageSpan& span, TpShard tp, EpShard ep) {
  const GeometryKey key{span.first_layer, span.last_layer, span.has_embedding, span.has_head,
                        tp.rank, tp.size, ep.rank, ep.size};
  auto it = geometries_.find(key);
  if (it != geometries_.end()) return *it->second;
  // Bounded: emptied when full. rank_memory empties it before its lookups when they could
  // overflow it, so the references a replay holds stay valid; other callers use each at once.
  if (max_geometries_ > 0 && geometries_.size() >= max_geometries_) geometries_.clear();
  std::shared_ptr<const ParamLayout>& layout = layouts_[{tp.rank, tp.size}];
  if (!layout) layout = std::make_shared<const ParamLayout>(cfg_, tp);
  return *geometries_.emplace(key, std::make_unique<StageGeometry>(cfg_, span, layout, ep))
              .first->second;
}

RankMemory memory_per_rank(const ModelConfig& cfg, const parallel::ParallelPlan& plan, int rank,
                           int64_t T, Precision precision, const MemoryOptions& options) {
  MemoryReplayer replayer(cfg, 0);
  return replayer.rank_memory(plan, rank, T, precision, options);
}

RankMemory MemoryReplayer::rank_memory(const parallel::ParallelPlan& plan, int rank, int64_t T,
                                       Precision precision, const MemoryOptions& options) {
  const ModelConfig& cfg = cfg_;
  const int world = plan.world_size();
  LOOM_CHECK(rank >= 0 && rank < world, "rank {} is outside the plan's {} ranks ({})", rank, world,
             plan.describe());
  LOOM_CHECK(T >= 1 && T <= cfg.max_seq,
             "sequence length T = {} must be in [1, max_seq = {}] for model '{}'", T, cfg.max_seq,
             cfg.name);
  LOOM_CHECK(plan.recompute.empty() || int64_t(plan.recompute.size()) == cfg.n_layers,
             "the plan's recompute list has {} entries but the model has n_layers = {}",
             plan.recompute.size(), cfg.n_layers);
  RankMemory out;
  out.rank = rank;
  // Ranks are ordered tp-cp-dp-pp (train::run_training); cp = 1 gives the older tp-dp-pp.
  out.tp = rank % plan.tp;
  out.cp = (rank / plan.tp) % plan.cp;
  out.dp = (rank / (plan.tp * plan.cp)) % plan.dp;
  out.pp = rank / (plan.tp * plan.cp * plan.dp);
  // cp: a rank holds T/cp rows of every sequence and the engine runs on them (model/stage.h);
  // the cp attention kernels' workspace (travelling blocks, receive buffers, partial sums) comes
  // from the pool for the duration of each call (priced below, attention::cp_workspace_bytes).
  LOOM_CHECK(plan.cp == 1 || T % (2 * int64_t(plan.cp)) == 0 ||
                 (plan.cp_layout != "zigzag" && T % plan.cp == 0),
             "cp = {} with the {} layout needs T divisible by {}, got T = {}", plan.cp,
             plan.cp_layout, plan.cp_layout == "zigzag" ? 2 * plan.cp : plan.cp, T);
  T /= plan.cp;
  // Gradients reduce, and ZeRO shards, over the dp x cp ranks (train::Executor); this rank's
  // index among them (ascending world ranks: cp varies faster than dp).
  const int n_shard = plan.dp * plan.cp, shard_rank = out.cp + plan.cp * out.dp;
  const int64_t B = plan.micro_batch_size, N = B * T;
  LOOM_CHECK(B >= 1, "micro_batch_size = {} must be >= 1", B);
  LOOM_CHECK(N % plan.tp == 0,
             "tensor parallel splits the B*T = {}*{} = {} rows over tp = {}: choose B*T divisible "
             "by {}",
             B, T, N, plan.tp, plan.tp);

  const bool bf = precision == Precision::bf16;
  const bool store = plan.zero >= 2 && n_shard > 1;  // as train::Executor decides
  const bool zero1 = plan.zero >= 1 && n_shard > 1;
  Dims d{};
  d.B = B;
  d.T = T;
  d.N = N;
  d.tp = plan.tp;
  d.Nl = N / plan.tp;
  d.C = cfg.d_model;
  d.Cq = cfg.d_model / plan.tp;
  d.KV = cfg.kv_dim() / plan.tp;
  d.F = cfg.d_ff / plan.tp;
  d.NHl = cfg.n_heads / plan.tp;
  d.V = cfg.vocab;
  d.Vl = cfg.vocab / plan.tp;
  d.bf = bf;
  d.emu = bf && !store && options.bf16_emulated.value_or(bf16_emulated());
  if (cfg.moe.enabled()) {
    d.E = cfg.moe.experts;
    d.Fe = cfg.moe.expert_d_ff / plan.tp;  // this tp rank's expert d_ff
    d.k = cfg.moe.k();
    d.topk = cfg.moe.router == Router::topk;
    d.ep = plan.ep;
  }
  // block.cpp's attention_shape on this rank's heads and T (T/cp) rows: [0] an ordinary block
  // (fused q|k|v), [1] the query layer (q, and k|v).
  auto attention_shape = [&](int ql) {
    const int64_t q_stride = ql ? d.Cq : d.Cq + 2 * d.KV, kv_stride = ql ? 2 * d.KV : q_stride;
    const int64_t NKVl = cfg.n_kv_heads / plan.tp, HD = cfg.head_dim();
    return attention::AttentionShape{B,        T,         T,         d.NHl,      NKVl, HD,
                                     q_stride, kv_stride, kv_stride, d.NHl * HD, true, 0,
                                     0,        1.0f};
  };
  if (plan.cp > 1) {
    // The executor's CpContext takes the double ring's nodes from plan.ranks_per_node (parallel::cp_ranks_per_node: L
    // consecutive cp ranks per node), else from the group's hosts: assumed here to hold the
    // whole cp group (cp sits next to tp in the rank order), i.e. a flat ring.
    const int L = parallel::cp_ranks_per_node(plan);
    const int nodes = L > 0 && plan.cp % L == 0 ? plan.cp / L : 1;
    const attention::CpScheme scheme = attention::cp_scheme_from_name(plan.cp_scheme);
    for (int ql = 0; ql < 2; ++ql) {
      const attention::AttentionShape s = attention_shape(ql);
      const attention::CpBackward bw = attention::CpBackward::auto_select;  // as the executor
      d.cp_fwd_ws[ql] = attention::cp_workspace_bytes(false, s, DType::f32, scheme, bw, plan.cp, nodes);
      d.cp_bwd_ws[ql] = attention::cp_workspace_bytes(true, s, DType::f32, scheme, bw, plan.cp, nodes);
    }
  }
  if (native_attention_used(bf, plan.cp > 1, T,
                         options.native_attention.value_or(native_attention_available()))) {
    for (int ql = 0; ql < 2; ++ql) {  // what native_attention_workspace_bytes gives block.cpp
      d.amx_fwd_ws[ql] = native_attention_workspace_bytes(false, d.N, d.Cq, d.KV, attention_shape(ql));
      d.amx_bwd_ws[ql] = native_attention_workspace_bytes(true, d.N, d.Cq, d.KV, attention_shape(ql));
    }
  }
  // Expert parallel: ep groups are ep consecutive dp ranks (train::Executor), so this rank holds
  // the experts of ep rank dp % ep.
  const EpShard ep_shard = plan.ep > 1 ? EpShard{out.dp % plan.ep, plan.ep} : EpShard{};

  const int n_pp = plan.pp, VS = plan.virtual_stages, n_virtual = n_pp * VS;
  const int M = int(plan.micro_batches);
  // Only this rank's actions (the whole schedule when the full step is replayed; none for the
  // persistent buffers alone), validated like make_schedule's.
  const std::vector<parallel::Action> actions =
      options.bound_backwards == 0
          ? std::vector<parallel::Action>{}
          : parallel::make_stage_actions(plan.schedule, n_pp, M, VS, out.pp);
  const std::vector<StageSpan> spans = split_stages(cfg, n_virtual, plan.stage_layers);
  const TpShard shard = plan.tp > 1 ? TpShard{out.tp, plan.tp} : TpShard{};

  Tracer tr;  // declared before every buffer, so it outlives them
  std::vector<std::unique_ptr<StoreTrace>> stores;
  std::vector<std::unique_ptr<StageTrace>> chunks;
  std::vector<Buf> optimizer;
  std::vector<int64_t> expert_broadcast;  // bytes, per chunk that broadcasts expert masters
  // The VS lookups below must not empty the bounded cache while holding references into it.
  if (max_geometries_ > 0 && geometries_.size() + size_t(VS) > max_geometries_) geometries_.clear();
  for (int c = 0; c < VS; ++c) {
    const StageGeometry& geo = geometry(spans[size_t(c * n_pp + out.pp)], shard, ep_shard);
    int64_t owned = geo.total();  // the optimizer's elements
    StoreTrace* st = nullptr;
    // Under ep the ZeRO store, like ZeRO-1's expert ranges, shards over the ranks holding the
    // same experts: (dp/ep) x cp of them; this rank's index among them (ascending world ranks).
    const int n_same = plan.dp / plan.ep * plan.cp;
    const int same_rank = out.dp / plan.ep * plan.cp + out.cp;
    std::vector<UnitRange> owned_ranges{{0, geo.total()}};
    if (store) {
      stores.push_back(std::make_unique<StoreTrace>(tr, plan.zero, bf, plan.ep > 1 ? n_same : n_shard,
                                                    plan.ep > 1 ? same_rank : shard_rank,
                                                    geo.units(), geo.total()));
      st = stores.back().get();
      owned = st->shard();
    } else if (zero1) {
      // Under ep the expert ranges are shared over the ranks holding the same experts.
      owned_ranges = zero1_ranges(geo, n_shard, shard_rank, n_same, same_rank);
      owned = 0;
      for (const UnitRange& u : owned_ranges) owned += u.end - u.begin;
    }
    int64_t holes = 0;
    if (!store && plan.ecss != "off") {
      // ECSS (optim/expert_store.h): the experts' moments (and f32 masters) live in a host store
      // outside the pool; AdamW keeps m and v of the dense ranges only. The compute copies stay
      // in the stage's weight buffers; in bf16 the experts' weight matrices have no
      // f32 copy there (train::Executor, GptStage's expert_masters_outside).
      owned = 0;
      const EcssSplit split = ecss_split(geo, owned_ranges);
      for (const UnitRange& u : split.dense) owned += u.end - u.begin;
      for (const EcssSplit::Piece& p : split.experts) out.host_store += 12 * (p.end - p.begin);
      if (bf) {
        for (const UnitRange& h : ecss_master_holes(geo)) holes += h.end - h.begin;
        // ZeRO-1: the stores' updated masters are broadcast through a buffer of the largest
        // share (train::Executor::broadcast_expert_masters).
        const int S = plan.ep > 1 ? n_same : n_shard;
        if (zero1 && holes > 0 && S > 1) {
          int64_t most = 1;
          for (int q = 0; q < S; ++q) {
            int64_t n = 0;
            for (const UnitRange& p : zero1_expert_pieces(geo, S, q)) n += p.end - p.begin;
            most = std::max(most, n);
          }
          expert_broadcast.push_back(most * 4);
        }
      }
    }
    chunks.push_back(std::make_unique<StageTrace>(tr, cfg, geo, d, st, plan.recompute, M, holes));
    optimizer.push_back(tr.alloc(owned * 4, Cat::optimizer));  // AdamW m
    optimizer.push_back(tr.alloc(owned * 4, Cat::optimizer));  // AdamW v
  }

  // One training step (train::Executor::train_step): the rank's actions in order.
  // Messages by (micro-batch, chunk): index mb * VS + chunk.
  const size_t n_keys = size_t(M) * size_t(VS);
  std::vector<Buf> act_in(n_keys), grad_in(n_keys), act_out(n_keys), grad_out(n_keys);
  std::vector<Buf> send_buffers;
  auto take = [](std::vector<Buf>& m, size_t k) {
    LOOM_ASSERT(bool(m[k]), "memory model: no buffer for micro-batch/chunk key {}", k);
    return std::move(m[k]);
  };
  const int64_t msg_bytes = d.Nl * d.C * 4;  // (N/tp, C) f32
  // A bound (options.bound_backwards = k > 0): after the rank's k-th backward the forward and
  // backward work is skipped and what it holds is dropped; the messages and the step's end are
  // still replayed (memory.h).
  const int k_bound = options.bound_backwards;
  int backwards = 0;
  bool compute = k_bound != 0;
  for (const parallel::Action& a : actions) {
    const int mb = a.micro_batch, c = a.chunk, g = c * n_pp + out.pp;  // virtual stage
    const size_t key = size_t(mb) * size_t(VS) + size_t(c);
    StageTrace& stage = *chunks[size_t(c)];
    switch (a.kind) {
      case parallel::ActionKind::recv_activation:
        act_in[key] = tr.alloc(msg_bytes, Cat::comm);
        break;
      case parallel::ActionKind::recv_grad:
        grad_in[key] = tr.alloc(msg_bytes, Cat::comm);
        break;
      case parallel::ActionKind::forward: {
        Buf x = g > 0 ? take(act_in, key) : nullptr;
        if (!compute) break;  // x dropped: freed no later than the whole step frees it
        Buf y = stage.forward(mb, x);
        if (g + 1 < n_virtual) act_out[key] = y;
        break;
      }
      case parallel::ActionKind::backward: {
        Buf dy = g + 1 < n_virtual ? take(grad_in, key) : nullptr;
        if (!compute) break;
        Buf dx = stage.backward(mb, dy);
        if (g > 0) grad_out[key] = dx;
        if (++backwards == k_bound) {
          compute = false;
          for (auto& ch : chunks) ch->drop_in_flight();
          for (auto& st : stores) st->drop_in_flight();
        }
        break;
      }
      case parallel::ActionKind::send_activation:
      case parallel::ActionKind::send_grad: {
        std::vector<Buf>& produced = a.kind == parallel::ActionKind::send_activation ? act_out : grad_out;
        Buf t = compute ? take(produced, key) : std::move(produced[key]);  // skipped: none
        send_buffers.push_back(tr.alloc(msg_bytes, Cat::comm));
        t.reset();
        break;
      }
    }
  }
  if (k_bound == 0) {  // the persistent buffers alone
    out.bytes = tr.peaks();
    return out;
  }
  send_buffers.clear();
  for (auto& s : stores) s->finish_micro_batch();
  for (auto& s : stores) s->step();
  for (int64_t b : expert_broadcast) Buf t = tr.alloc(b, Cat::comm);  // one chunk at a time
  out.bytes = tr.peaks();
  return out;
}

std::vector<RankMemory> memory_all_ranks(const ModelConfig& cfg, const parallel::ParallelPlan& plan,
                                         int64_t T, Precision precision,
                                         const MemoryOptions& options) {
  // tp ranks hold equal shards, so only the dp coordinate (under ZeRO) and the pp coordinate
  // change the bytes: compute each distinct one once.
  const bool sharded = plan.zero >= 1 && plan.dp * plan.cp > 1;
  std::map<std::pair<int, int>, RankMemory> done;
  std::vector<RankMemory> out;
  MemoryReplayer replayer(cfg, 0);
  for (int r = 0; r < plan.world_size(); ++r) {
    const int cp = (r / plan.tp) % plan.cp, dp = (r / (plan.tp * plan.cp)) % plan.dp,
              pp = r / (plan.tp * plan.cp * plan.dp);
    const std::pair<int, int> key{sharded ? cp + plan.cp * dp : 0, pp};
    auto it = done.find(key);
    if (it == done.end()) it = done.emplace(key, replayer.rank_memory(plan, r, T, precision, options)).first;
    RankMemory m = it->second;
    m.rank = r;
    m.tp = r % plan.tp;
    m.cp = cp;
    m.dp = dp;
    m.pp = pp;
    out.push_back(m);
  }
  return out;
}

}  // namespace loom::model
