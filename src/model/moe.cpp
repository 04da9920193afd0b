// model/moe.cpp: the MoE FFN (see moe.h).
//
// Glossary: N rows, C d_model, E experts, Fe expert d_ff, k choices per row, S = N*k slots, D
// domains, G experts per domain, V vocab.
#include "model/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/matmul.h"
#include "model/block.h"

namespace loom::model {

namespace K = loom::kernels;

void MoeStats::add(const MoeStats& o) {
  aux_loss_sum += o.aux_loss_sum;
  routed += o.routed;
  dropped += o.dropped;
  blocks += o.blocks;
  min_margin = std::min(min_margin, o.min_margin);
  if (load.size() < o.load.size()) load.resize(o.load.size(), 0);
  for (size_t e = 0; e < o.load.size(); ++e) load[e] += o.load[e];
  for (const auto& [layer, l] : o.layer_load) {
    std::vector<int64_t>& mine = layer_load[layer];
    if (mine.size() < l.size()) mine.resize(l.size(), 0);
    for (size_t e = 0; e < l.size(); ++e) mine[e] += l[e];
  }
}

// ---------------------------------------------------------------------------------------------
// rre tables

std::vector<int32_t> rre_experts(const ModelConfig& cfg, const float* table, const int32_t* tokens,
                                 const int32_t* domains, int64_t N) {
  const int64_t D = cfg.moe.num_domains(), V = cfg.vocab, G = cfg.moe.experts_per_domain;
  LOOM_CHECK(tokens && domains,
             "the rre router needs each token's id and domain (model '{}'); pass the domains "
             "with the tokens (GptStage::forward's `domains`)",
             cfg.name);
  std::vector<int32_t> out(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    const int32_t d = domains[n], t = tokens[n];
    LOOM_CHECK(d >= 0 && d < D, "token row {}: domain {} is outside [0, {}) (domains {})", n, d, D,
               D);
    LOOM_CHECK(t >= 0 && t < V, "token row {}: id {} is outside the vocabulary [0, {})", n, t, V);
    const float f = table[d * V + t];
    LOOM_CHECK(f >= 0 && f < float(G) && f == std::floor(f),
               "rre table entry [{}, {}] = {} is not an expert index in [0, {}): the table does "
               "not match this model (experts_per_domain = {})",
               d, t, f, G, G);
    out[size_t(n)] = int32_t(d * G + int64_t(f));
  }
  return out;
}

std::vector<int64_t> rre_dispatch_counts(const ModelConfig& cfg, const float* table,
                                         const int32_t* tokens, const int32_t* domains, int64_t N) {
  std::vector<int64_t> counts(size_t(cfg.moe.experts), 0);
  for (int32_t e : rre_experts(cfg, table, tokens, domains, N)) ++counts[size_t(e)];
  return counts;
}

void moe_pack_slots(const int32_t* row_expert, int64_t N, int64_t k, int64_t E,
                    std::vector<int64_t>& offsets, int32_t* slot_row, int32_t* row_slot) {
  const int64_t S = N * k;
  offsets.assign(size_t(E + 1), 0);
  for (int64_t s = 0; s < S; ++s)
    if (row_expert[s] >= 0) ++offsets[size_t(row_expert[s]) + 1];
  for (int64_t e = 0; e < E; ++e) offsets[size_t(e + 1)] += offsets[size_t(e)];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t s = 0; s < S; ++s) {
    const int32_t e = row_expert[s];
    if (e < 0) {
      row_slot[s] = -1;
      continue;
    }
    const int64_t slot = next[size_t(e)]++;
    row_slot[s] = int32_t(slot);
    slot_row[slot] = int32_t(s / k);
  }
  for (int64_t slot = offsets[size_t(E)]; slot < S; ++slot) slot_row[slot] = -1;
}

std::vector<int32_t> balanced_rre_table(const std::vector<int64_t>& counts, int64_t D, int64_t V,
                                        int64_t G) {
  LOOM_CHECK(int64_t(counts.size()) == D * V && G >= 1,
             "balanced rre table: counts hold {} values, need domains x vocab = {} x {} = {}; G = "
             "{} must be >= 1",
             counts.size(), D, V, D * V, G);
  std::vector<int32_t> table(size_t(D * V));
  std::vector<int32_t> order(static_cast<size_t>(V));
  for (int64_t d = 0; d < D; ++d) {
    const int64_t* c = counts.data() + d * V;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return c[a] > c[b]; });
    std::vector<int64_t> load(size_t(G), 0);
    for (int32_t t : order) {
      const size_t best = size_t(std::min_element(load.begin(), load.end()) - load.begin());
      table[size_t(d * V + t)] = int32_t(best);
      load[best] += c[t];
    }
  }
  return table;
}

double rre_table_max_over_mean(const std::vector<int32_t>& table,
                               const std::vector<int64_t>& counts, int64_t D, int64_t V, int64_t G) {
  // Within each domain's group (a domain's share of the batch is set by the data, not the
  // table), the largest expected expert load over the group's mean; the worst domain.
  double worst = 1.0;
  for (int64_t d = 0; d < D; ++d) {
    std::vector<int64_t> l(static_cast<size_t>(G), 0);
    int64_t total = 0;
    for (int64_t t = 0; t < V; ++t) {
      l[size_t(table[size_t(d * V + t)])] += counts[size_t(d * V + t)];
      total += counts[size_t(d * V + t)];
    }
    if (total == 0) continue;
    const double mean = double(total) / double(G);
    worst = std::max(worst, double(*std::max_element(l.begin(), l.end())) / mean);
  }
  return worst;
}

void set_rre_tables(const ModelConfig& cfg, const ParamLayout& layout, float* weights,
                    const std::vector<int32_t>& table) {
  const int64_t D = cfg.moe.num_domains(), V = cfg.vocab, G = cfg.moe.experts_per_domain;
  LOOM_CHECK(cfg.moe.enabled() && cfg.moe.router == Router::rre,
             "model '{}' has no rre routing table (router {}, {} sparse blocks)", cfg.name,
             router_name(cfg.moe.router), cfg.moe.sparse_layers.size());
  LOOM_CHECK(int64_t(table.size()) == D * V,
             "rre table has {} entries but model '{}' needs domains x vocab = {} x {} = {}",
             table.size(), cfg.name, D, V, D * V);
  for (size_t i = 0; i < table.size(); ++i)
    LOOM_CHECK(table[i] >= 0 && table[i] < G,
               "rre table entry {} = {} is outside [0, experts_per_domain = {})", i, table[i], G);
  for (int64_t l : cfg.moe.sparse_layers) {
    float* dst = weights + layout.block(l).moe_table;
    for (size_t i = 0; i < table.size(); ++i) dst[i] = float(table[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// The FFN

namespace {

bool lowp(const BlockCtx& c) { return c.bf && c.Wr == nullptr; }
const float* wf32(const BlockCtx& c) { return c.Wr ? c.Wr : c.W; }
size_t mm_size(const BlockCtx& c) { return lowp(c) ? 2 : 4; }

// The matmul copy of an f32 tensor (block.cpp's to_mm).
Tensor to_mm(const BlockCtx& c, const Tensor& t, MemCategory cat) {
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

// Row r of a matmul-dtype (rows, cols) tensor.
const void* mm_row(const BlockCtx& c, const Tensor& t, int64_t r, int64_t cols) {
  return static_cast<const char*>(t.raw()) + size_t(r * cols) * mm_size(c);
}
void* mm_row(const BlockCtx& c, Tensor& t, int64_t r, int64_t cols) {
  return static_cast<char*>(t.raw()) + size_t(r * cols) * mm_size(c);
}

// y (M,N) = x (M,K) @ W^T, x rows from row x0 of a matmul-dtype tensor, W at w_off (N,K).
void mm_xwT(const BlockCtx& c, float* y, const Tensor& x, int64_t x0, int64_t w_off, int64_t M,
            int64_t N, int64_t Kd) {
  if (M == 0) return;
  if (lowp(c))
    K::matmul_bf16(static_cast<const bf16*>(mm_row(c, x, x0, Kd)), c.Wl + w_off, y, M, N, Kd,
                   false, true, false);
  else
    K::matmul_f32(static_cast<const float*>(mm_row(c, x, x0, Kd)), wf32(c) + w_off, y, M, N, Kd,
                  false, true, false);
}
// dx (M,K) = dy (M,N) @ W, dy rows from row y0, W at w_off (N,K).
void mm_dyW(const BlockCtx& c, float* dx, const Tensor& dy, int64_t y0, int64_t w_off, int64_t M,
            int64_t N, int64_t Kd) {
  if (M == 0) return;
  if (lowp(c))
    K::matmul_bf16(static_cast<const bf16*>(mm_row(c, dy, y0, N)), c.Wl + w_off, dx, M, Kd, N,
                   false, false, false);
  else
    K::matmul_f32(static_cast<const float*>(mm_row(c, dy, y0, N)), wf32(c) + w_off, dx, M, Kd, N,
                  false, false, false);
}
// dW (N,K) += dy^T @ x over rows [r0, r0+M) of dy (M,N) and x (M,K).
void mm_dW(const BlockCtx& c, int64_t g_off, const Tensor& dy, const Tensor& x, int64_t r0,
           int64_t M, int64_t N, int64_t Kd) {
  if (M == 0) return;
  if (lowp(c))
    K::matmul_bf16(static_cast<const bf16*>(mm_row(c, dy, r0, N)),
                   static_cast<const bf16*>(mm_row(c, x, r0, Kd)), c.G + g_off, N, Kd, M, true,
                   false, true);
  else
    K::matmul_f32(static_cast<const float*>(mm_row(c, dy, r0, N)),
                  static_cast<const float*>(mm_row(c, x, r0, Kd)), c.G + g_off, N, Kd, M, true,
                  false, true);
}

K::GeluKind gelu_kind(Activation a) {
  return a == Activation::fast_gelu  ? K::GeluKind::fast
         : a == Activation::gelu_erf ? K::GeluKind::erf
                                     : K::GeluKind::tanh;
}

// Expert e's tensors.
struct Expert {
  int64_t up_w, up_b, down_w, down_b;
};
// Expert e's tensors; under tp this rank's Fl = Fe/tp rows of up and columns of down.
Expert expert(const BlockCtx& c, const BlockOffsets& o, int64_t e) {
  const int64_t C = c.cfg.d_model, Fl = c.cfg.moe.expert_d_ff / c.tp_size();
  const int64_t base = moe_expert_offset(o, e);
  return {base, base + Fl * C, base + Fl * C + Fl, base + 2 * Fl * C + Fl};
}
// Under tp, the rank that adds (and differentiates) what every tp rank would otherwise count
// once each: the experts' down biases, the gate's gradient and its d(ln2) term (their tp sum is
// then the serial value).
bool tp_lead(const BlockCtx& c) { return !c.tp || c.tp->rank() == 0; }

// The rows one expert computes on, in the packed buffer the experts run over: without ep the
// dispatched slots themselves (expert e's are [offsets[e], offsets[e+1])); under ep the rows this
// rank received, peer-major, then by its experts (st.moe_recv). Rows [0, used) are covered.
struct Segment {
  int64_t e, begin, n;  // expert (global index), first row, rows
};
std::vector<Segment> segments(const BlockCtx& c, const BlockOffsets& o, const BlockStash& st) {
  std::vector<Segment> out;
  if (!c.ep) {
    for (int64_t e = 0; e < c.cfg.moe.experts; ++e)
      out.push_back({e, st.moe_offsets[size_t(e)],
                     st.moe_offsets[size_t(e + 1)] - st.moe_offsets[size_t(e)]});
    return out;
  }
  const int P = c.ep->size();
  const int64_t El = o.moe_n_experts;
  int64_t row = 0;
  for (int q = 0; q < P; ++q)
    for (int64_t j = 0; j < El; ++j) {
      const int64_t n = st.moe_recv[size_t(q * El + j)];
      out.push_back({o.moe_expert0 + j, row, n});
      row += n;
    }
  return out;
}
int64_t used_rows(const std::vector<Segment>& seg) {
  int64_t n = 0;
  for (const Segment& s : seg) n += s.n;
  return n;
}

// Expert parallel (c.ep, P ranks, El = E/P experts each): rows this rank sends to each ep rank
// (its dispatched slots for that rank's experts: they are contiguous, slots being grouped by
// expert) and rows it receives from each (for its own experts).
std::vector<int64_t> ep_send_rows(const BlockCtx& c, const BlockStash& st) {
  const int P = c.ep->size();
  const int64_t El = c.cfg.moe.experts / P;
  std::vector<int64_t> r(static_cast<size_t>(P));
  for (int q = 0; q < P; ++q)
    r[size_t(q)] = st.moe_offsets[size_t((q + 1) * El)] - st.moe_offsets[size_t(q * El)];
  return r;
}
std::vector<int64_t> ep_recv_rows(const BlockCtx& c, const BlockStash& st) {
  const int P = c.ep->size();
  const int64_t El = c.cfg.moe.experts / P;
  std::vector<int64_t> r(static_cast<size_t>(P), 0);
  for (int q = 0; q < P; ++q)
    for (int64_t j = 0; j < El; ++j) r[size_t(q)] += st.moe_recv[size_t(q * El + j)];
  return r;
}
// st.moe_recv from every ep rank's dispatch counts per expert: one all_to_all of E int64 (block
// q of the input: this rank's counts for rank q's experts).
void ep_exchange_counts(const BlockCtx& c, BlockStash& st) {
  const int64_t E = c.cfg.moe.experts;
  std::vector<int64_t> counts(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    counts[size_t(e)] = st.moe_offsets[size_t(e + 1)] - st.moe_offsets[size_t(e)];
  st.moe_recv.assign(size_t(E), 0);
  c.ep->all_to_all(comm::BufferRef(counts.data(), E, DType::i64),
                   comm::BufferRef(st.moe_recv.data(), E, DType::i64))
      .wait();
}
// all_to_all_v of `cols`-wide rows: in_rows[q] rows of `in` (packed from row 0) to rank q,
// out_rows[q] rows from rank q into `out` (packed from row 0). Same dtype.
void all_to_all_ep_rows(const BlockCtx& c, const Tensor& in, const std::vector<int64_t>& in_rows,
                        Tensor& out, const std::vector<int64_t>& out_rows, int64_t cols) {
  std::vector<int64_t> sc, rc;
  int64_t s_total = 0, r_total = 0;
  for (size_t q = 0; q < in_rows.size(); ++q) {
    sc.push_back(in_rows[q] * cols);
    rc.push_back(out_rows[q] * cols);
    s_total += sc.back();
    r_total += rc.back();
  }
  LOOM_ASSERT(s_total <= in.numel() && r_total <= out.numel(),
              "expert-parallel exchange of {} / {} elements overflows buffers of {} / {}", s_total,
              r_total, in.numel(), out.numel());
  c.ep->all_to_all_v(comm::BufferRef(const_cast<void*>(in.raw()), s_total, in.dtype()), sc,
                     comm::BufferRef(out.raw(), r_total, out.dtype()), rc)
      .wait();
}

// Fills st.moe_meta / moe_w / moe_offsets (and topk's moe_probs, moe_frac) for the rows of
// ln2_mm; returns the number of dropped choices and the aux loss value.
struct RouteResult {
  int64_t dropped = 0;
  double aux = 0;
  double min_margin = std::numeric_limits<double>::infinity();  // topk: see MoeStats::min_margin
};
RouteResult route(const BlockCtx& c, const BlockOffsets& o, const Tensor& ln2_mm, BlockStash& st,
                  MemCategory cat) {
  const ModelConfig& cfg = c.cfg;
  const MoeConfig& m = cfg.moe;
  const int64_t N = c.rows(), E = m.experts, k = m.k(), S = N * k, C = cfg.d_model;
  st.moe_meta = Tensor::empty({3, S}, DType::i32, c.pool, cat);  // (3,S)
  st.moe_w = Tensor::empty({N, k}, DType::f32, c.pool, cat);     // (N,k)
  int32_t* slot_row = st.moe_meta.data<int32_t>();
  int32_t* row_slot = slot_row + S;
  int32_t* row_expert = row_slot + S;
  float* w = st.moe_w.data<float>();
  RouteResult r;
  if (m.router == Router::rre) {
    std::vector<int32_t> ex = rre_experts(cfg, w_at(c, o.moe_table), c.tokens, c.domains, N);
    for (int64_t n = 0; n < N; ++n) {
      row_expert[n] = ex[size_t(n)];
      w[n] = 1.0f;
    }
  } else {
    // logits (N,E) = ln2 @ Wg^T; p = softmax(logits) (kept for backward)
    st.moe_probs = Tensor::empty({N, E}, DType::f32, c.pool, cat);
    float* p = st.moe_probs.data<float>();
    mm_xwT(c, p, ln2_mm, 0, o.moe_gate, N, E, C);
    std::vector<int32_t> idx(static_cast<size_t>(E));
    std::vector<int64_t> count(size_t(E), 0);
    for (int64_t n = 0; n < N; ++n) {
      float* pr = p + n * E;
      const float mx = *std::max_element(pr, pr + E);
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += double(pr[e] = std::exp(pr[e] - mx));
      for (int64_t e = 0; e < E; ++e) pr[e] = float(double(pr[e]) / z);
      // top-k by probability, ties to the lower index
      // The k+1 largest in order (the first k are the choices; the next one gives the margin at
      // the selection boundary; the ones between them the margins of the choices' order).
      const int64_t kk = std::min<int64_t>(k + 1, E);
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(), [&](int32_t a, int32_t b) {
        return pr[a] > pr[b] || (pr[a] == pr[b] && a < b);
      });
      for (int64_t j = 0; j + 1 < kk; ++j)
        r.min_margin = std::min(r.min_margin, double(pr[idx[size_t(j)]]) - double(pr[idx[size_t(j + 1)]]));
      for (int64_t j = 0; j < k; ++j) {
        row_expert[n * k + j] = idx[size_t(j)];
        w[n * k + j] = pr[idx[size_t(j)]];
        ++count[size_t(idx[size_t(j)])];
      }
    }
    // Switch aux loss: E * sum_e f_e P_e with f_e over the N*k choices (before capacity).
    st.moe_frac.assign(size_t(E), 0.0);
    for (int64_t e = 0; e < E; ++e) {
      double P = 0;
      for (int64_t n = 0; n < N; ++n) P += p[n * E + e];
      st.moe_frac[size_t(e)] = double(count[size_t(e)]) / double(S);
      r.aux += double(E) * st.moe_frac[size_t(e)] * (P / double(N));
    }
    r.aux *= m.aux_loss_coef;
    st.moe_aux_scale = c.moe_aux_scale;
    // Capacity (GShard / Switch): ceil(k * N * cf / E) choices per expert, in (row, j) order.
    const int64_t cap = int64_t(std::ceil(double(k) * double(N) * m.capacity_factor / double(E)));
    std::vector<int64_t> taken(size_t(E), 0);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = row_expert[s];
      if (taken[size_t(e)] < cap) {
        ++taken[size_t(e)];
      } else {
        row_expert[s] = int32_t(-1 - e);  // dropped; the expert kept as -1-e
        ++r.dropped;
      }
    }
  }
  moe_pack_slots(row_expert, N, k, E, st.moe_offsets, slot_row, row_slot);
  return r;
}

// xs (S,C) matmul dtype: the dispatched rows of ln2_mm (unused slots zero).
Tensor dispatch_rows(const BlockCtx& c, const Tensor& ln2_mm, const BlockStash& st,
                     MemCategory cat) {
  const int64_t C = c.cfg.d_model, S = st.moe_meta.shape()[1];
  const int32_t* slot_row = st.moe_meta.data<int32_t>();
  Tensor xs = Tensor::zeros({S, C}, ln2_mm.dtype(), c.pool, cat);
  const size_t bytes = size_t(C) * mm_size(c);
  for (int64_t s = 0; s < S; ++s)
    if (slot_row[s] >= 0) std::memcpy(mm_row(c, xs, s, C), mm_row(c, ln2_mm, slot_row[s], C), bytes);
  return xs;
}

}  // namespace

Tensor moe_ffn_forward(const BlockCtx& c, const BlockOffsets& o, const Tensor& ln2_mm,
                       BlockStash& st, Recompute mode) {
  const ModelConfig& cfg = c.cfg;
  const MoeConfig& m = cfg.moe;
  // Fe: this tp rank's expert d_ff (Fe/tp); the experts' outputs are then partial sums over tp.
  const int64_t N = c.rows(), C = cfg.d_model, Fe = m.expert_d_ff / c.tp_size(), E = m.experts;
  const int64_t k = m.k(), S = N * k;
  const bool keep_all = mode == Recompute::none, keep_some = mode != Recompute::full;
  auto cat = [](bool kept) { return kept ? MemCategory::activations : MemCategory::workspace; };
  const bool topk = m.router == Router::topk;
  // Expert parallel: the experts run on R = P*S rows (every ep rank could send all its slots
  // here), so buffer sizes never depend on the routing and the memory model stays exact.
  const int P = c.ep ? c.ep->size() : 1;
  const int64_t R = P * S;

  RouteResult rr = route(c, o, ln2_mm, st, cat(keep_some));
  // (S,C) the dispatched rows; under ep sent away, and the received rows (R,C) are kept instead
  // (also under selective recompute: rebuilding them would take another exchange).
  Tensor xs = dispatch_rows(c, ln2_mm, st, P > 1 ? MemCategory::workspace : cat(keep_all));
  std::vector<int64_t> send_rows, recv_rows;
  if (P > 1) {
    ep_exchange_counts(c, st);
    send_rows = ep_send_rows(c, st);
    recv_rows = ep_recv_rows(c, st);
    Tensor xr = Tensor::zeros({R, C}, ln2_mm.dtype(), c.pool, cat(keep_some));  // (R,C)
    all_to_all_ep_rows(c, xs, send_rows, xr, recv_rows, C);
    xs = xr;
  }
  const std::vector<Segment> seg = segments(c, o, st);

  // pre = xs_e @ Wup_e^T + bup_e; act = gelu(pre), per expert on its rows            (R,Fe)
  st.pre = Tensor::zeros({R, Fe}, DType::f32, c.pool, cat(keep_some));
  Tensor act = Tensor::zeros({R, Fe}, DType::f32, c.pool, c.bf ? MemCategory::workspace : cat(keep_all));
  for (const Segment& g : seg) {
    if (g.n == 0) continue;
    const Expert x = expert(c, o, g.e);
    mm_xwT(c, st.pre.data<float>() + g.begin * Fe, xs, g.begin, x.up_w, g.n, Fe, C);
    K::bias_gelu_forward(act.data<float>() + g.begin * Fe, st.pre.data<float>() + g.begin * Fe,
                         w_at(c, x.up_b), g.n, Fe, gelu_kind(cfg.activation));
  }
  Tensor act_mm = to_mm(c, act, cat(keep_all));
  act = Tensor();

  // y_e = act_e @ Wdown_e^T + bdown_e                                                (R,C)
  const MemCategory y_cat = topk ? cat(keep_some) : MemCategory::workspace;
  Tensor y = Tensor::empty({R, C}, DType::f32, c.pool, P > 1 ? MemCategory::workspace : y_cat);
  for (const Segment& g : seg) {
    if (g.n == 0) continue;
    const Expert x = expert(c, o, g.e);
    mm_xwT(c, y.data<float>() + g.begin * C, act_mm, g.begin, x.down_w, g.n, C, Fe);
    if (tp_lead(c)) K::bias_add_rows(y.data<float>() + g.begin * C, w_at(c, x.down_b), g.n, C);
  }
  if (P > 1) {  // the outputs back to the ranks that sent the rows: (S,C) in slot order
    Tensor ys = Tensor::empty({S, C}, DType::f32, c.pool, y_cat);
    all_to_all_ep_rows(c, y, recv_rows, ys, send_rows, C);
    y = ys;
  }
  // out[n] = sum_j w[n,j] * y[slot(n,j)] (dropped choices add nothing)              (N,C)
  // (tp: partial sums, which the block reduce-scatters to its rows)
  Tensor out = Tensor::zeros({N, C}, DType::f32, c.pool,
                             c.tp ? MemCategory::workspace : MemCategory::activations);
  const int32_t* row_slot = st.moe_meta.data<int32_t>() + S;
  const float* w = st.moe_w.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = row_slot[n * k + j];
      if (s < 0) continue;
      float* dst = out.data<float>() + n * C;
      const float* src = y.data<float>() + int64_t(s) * C;
      const float wj = w[n * k + j];
      for (int64_t i = 0; i < C; ++i) dst[i] += wj * src[i];
    }

  if (c.moe_stats) {
    MoeStats& ms = *c.moe_stats;
    ms.aux_loss_sum += rr.aux;
    ms.dropped += rr.dropped;
    ms.routed += S;
    ms.blocks += 1;
    ms.min_margin = std::min(ms.min_margin, rr.min_margin);
    if (ms.load.size() < size_t(E)) ms.load.resize(size_t(E), 0);
    for (int64_t e = 0; e < E; ++e)
      ms.load[size_t(e)] += st.moe_offsets[size_t(e + 1)] - st.moe_offsets[size_t(e)];
    if (c.moe_layer >= 0) {
      std::vector<int64_t>& ll = ms.layer_load[c.moe_layer];
      if (ll.size() < size_t(E)) ll.resize(size_t(E), 0);
      for (int64_t e = 0; e < E; ++e)
        ll[size_t(e)] += st.moe_offsets[size_t(e + 1)] - st.moe_offsets[size_t(e)];
    }
  }
  if (keep_all || (P > 1 && keep_some)) st.moe_xs = xs;
  if (keep_all) st.act_mm = act_mm;
  if (topk && keep_some) st.moe_y = y;
  return out;
}

void moe_ffn_recompute(const BlockCtx& c, const BlockOffsets& o, BlockStash& st) {
  const ModelConfig& cfg = c.cfg;
  // Under ep the received rows were kept (the forward's exchange is not repeated).
  if (!c.ep) st.moe_xs = dispatch_rows(c, st.ln2_mm, st, MemCategory::workspace);
  Tensor act = Tensor::zeros(st.pre.shape(), DType::f32, c.pool, MemCategory::workspace);
  // pre already holds the biased pre-activation: act = gelu(pre) on the used rows.
  const int64_t used = used_rows(segments(c, o, st)), Fe = cfg.moe.expert_d_ff / c.tp_size();
  K::gelu_kind_forward(gelu_kind(cfg.activation), act.data<float>(), st.pre.data<float>(),
                       used * Fe);
  st.act_mm = to_mm(c, act, MemCategory::workspace);
}

Tensor moe_ffn_backward(const BlockCtx& c, const BlockOffsets& o, const Tensor& dout,
                        BlockStash& st) {
  const ModelConfig& cfg = c.cfg;
  const MoeConfig& m = cfg.moe;
  const int64_t N = c.rows(), C = cfg.d_model, Fe = m.expert_d_ff / c.tp_size(), E = m.experts;
  const int64_t k = m.k(), S = N * k;
  const int P = c.ep ? c.ep->size() : 1;
  const int64_t R = P * S;  // rows the experts ran on (see moe_ffn_forward)
  const MemCategory ws = MemCategory::workspace;
  const bool topk = m.router == Router::topk;
  const int32_t* slot_row = st.moe_meta.data<int32_t>();
  const int32_t* row_slot = slot_row + S;
  const int32_t* row_expert = row_slot + S;
  const float* w = st.moe_w.data<float>();
  const float* g = dout.data<float>();
  const std::vector<Segment> seg = segments(c, o, st);
  std::vector<int64_t> send_rows, recv_rows;
  if (P > 1) {
    send_rows = ep_send_rows(c, st);
    recv_rows = ep_recv_rows(c, st);
  }

  // dys[slot(n,j)] = w[n,j] * dout[n]                                                (S,C)
  Tensor dys = Tensor::zeros({S, C}, DType::f32, c.pool, ws);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = row_slot[n * k + j];
      if (s < 0) continue;
      float* dst = dys.data<float>() + int64_t(s) * C;
      for (int64_t i = 0; i < C; ++i) dst[i] = w[n * k + j] * g[n * C + i];
    }

  // topk gate: d_w[n,j] = dout[n] . y[slot]; d_p[n,e] = sum_j [e chosen] d_w + aux term;
  // d_logits = p * (d_p - sum_e p d_p)                                               (N,E)
  Tensor d_logits;
  if (topk) {
    d_logits = Tensor::empty({N, E}, DType::f32, c.pool, ws);
    const float* p = st.moe_probs.data<float>();
    const float* y = st.moe_y.data<float>();
    float* dl = d_logits.data<float>();
    // d(aux)/dp[n,e] = coef * E * f_e / N, weighted like the loss (moe_aux_scale = grad_scale*N).
    const double aux_g = double(st.moe_aux_scale) * m.aux_loss_coef * double(E) / double(N);
    // d_w[n,j] = dout[n] . y[slot]; under tp y holds partial sums: sum d_w over tp.
    std::vector<double> dw(static_cast<size_t>(N * k), 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t s = row_slot[n * k + j];
        if (s < 0) continue;  // dropped: the output did not depend on p
        double d = 0;
        for (int64_t i = 0; i < C; ++i) d += double(g[n * C + i]) * double(y[int64_t(s) * C + i]);
        dw[size_t(n * k + j)] = d;
      }
    if (c.tp) c.tp->all_reduce(comm::BufferRef(dw.data(), N * k, DType::f64)).wait();
    std::vector<double> dp(static_cast<size_t>(E));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t e = 0; e < E; ++e) dp[size_t(e)] = aux_g * st.moe_frac[size_t(e)];
      for (int64_t j = 0; j < k; ++j)
        if (row_slot[n * k + j] >= 0) dp[size_t(row_expert[n * k + j])] += dw[size_t(n * k + j)];
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += double(p[n * E + e]) * dp[size_t(e)];
      for (int64_t e = 0; e < E; ++e)
        dl[n * E + e] = float(double(p[n * E + e]) * (dp[size_t(e)] - dot));
    }
    st.moe_y = Tensor();
    st.moe_probs = Tensor();
  }
  if (P > 1) {  // the output gradients to the ranks holding the experts              (R,C)
    Tensor dyr = Tensor::zeros({R, C}, DType::f32, c.pool, ws);
    all_to_all_ep_rows(c, dys, send_rows, dyr, recv_rows, C);
    dys = dyr;
  }

  // experts' down projection: db_e += colsum(dys_e); dW_e += dys_e^T act_e; d_act = dys_e W_e
  Tensor dys_mm = to_mm(c, dys, ws);
  Tensor d_act = Tensor::zeros({R, Fe}, DType::f32, c.pool, ws);  // (R,Fe), becomes d_pre
  for (const Segment& sg : seg) {
    if (sg.n == 0) continue;
    const Expert x = expert(c, o, sg.e);
    if (tp_lead(c)) K::bias_backward(c.G + x.down_b, dys.data<float>() + sg.begin * C, sg.n, C);
    mm_dW(c, x.down_w, dys_mm, st.act_mm, sg.begin, sg.n, C, Fe);
    mm_dyW(c, d_act.data<float>() + sg.begin * Fe, dys_mm, sg.begin, x.down_w, sg.n, C, Fe);
  }
  dys_mm = Tensor();
  dys = Tensor();
  st.act_mm = Tensor();
  const int64_t used = used_rows(seg);
  K::gelu_kind_backward(gelu_kind(cfg.activation), d_act.data<float>(), d_act.data<float>(),
                        st.pre.data<float>(), used * Fe);
  st.pre = Tensor();

  // experts' up projection: db_e += colsum(d_pre_e); dW_e += d_pre_e^T xs_e; dxs = d_pre_e W_e
  Tensor d_pre_mm = to_mm(c, d_act, ws);
  Tensor dxs = Tensor::zeros({R, C}, DType::f32, c.pool, ws);  // (R,C)
  for (const Segment& sg : seg) {
    if (sg.n == 0) continue;
    const Expert x = expert(c, o, sg.e);
    K::bias_backward(c.G + x.up_b, d_act.data<float>() + sg.begin * Fe, sg.n, Fe);
    mm_dW(c, x.up_w, d_pre_mm, st.moe_xs, sg.begin, sg.n, Fe, C);
    mm_dyW(c, dxs.data<float>() + sg.begin * C, d_pre_mm, sg.begin, x.up_w, sg.n, Fe, C);
  }
  d_pre_mm = Tensor();
  d_act = Tensor();
  st.moe_xs = Tensor();
  if (P > 1) {  // the input gradients back to the ranks the rows came from, in slot order (S,C)
    Tensor dxl = Tensor::zeros({S, C}, DType::f32, c.pool, ws);
    all_to_all_ep_rows(c, dxs, recv_rows, dxl, send_rows, C);
    dxs = dxl;
  }

  // d_ln2[n] = sum_j dxs[slot(n,j)] (+ d_logits @ Wg for topk)                       (N,C)
  Tensor d_ln2 = Tensor::zeros({N, C}, DType::f32, c.pool, ws);
  if (topk) {
    Tensor dl_mm = to_mm(c, d_logits, ws);  // on every tp rank: the same bytes everywhere
    if (tp_lead(c)) {
      mm_dyW(c, d_ln2.data<float>(), dl_mm, 0, o.moe_gate, N, E, C);
      mm_dW(c, o.moe_gate, dl_mm, st.ln2_mm, 0, N, E, C);
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = row_slot[n * k + j];
      if (s < 0) continue;
      float* dst = d_ln2.data<float>() + n * C;
      const float* src = dxs.data<float>() + int64_t(s) * C;
      for (int64_t i = 0; i < C; ++i) dst[i] += src[i];
    }
  st.moe_meta = st.moe_w = Tensor();
  st.moe_offsets.clear();
  st.moe_frac.clear();
  st.moe_recv.clear();
  return d_ln2;
}

}  // namespace loom::model
