// attention/context_parallel.cpp: ring / Burst / all-gather / Ulysses attention over a cp group.
//
// Glossary as in context_parallel.h: B batch, T global length, G cp size, Tl = T/G, NH, NKV, HD,
// N nodes x L ranks per node (double ring), P elements of one travelling f32 partial gradient.
//
// Structure
// - Every ring scheme is one engine, run_ring(): a block of bytes travels a two-level ring (L
//   intra-node steps inside N inter-node steps; the flat ring is N = 1) and, in the backward, an
//   f32 partial gradient of that block is summed along the way and sent home. The caller supplies
//   compute(block, origin, partial): the local work against the block that started on group rank
//   `origin`. Forward: block = K|V. Burst backward: block = Q|dO|D|LSE, partial = dQ. Ring
//   backward: block = K|V, partial = dK|dV. All-gather runs the same compute() on gathered blocks.
// - Local work is split into (query segment, key segment) pairs from the layout (cp_layout.h), so
//   each flash-attention call sees contiguous global positions (zigzag: 2 x 2 pairs, the fully
//   masked ones skipped) or the striped rule (key j visible to query i iff j <= i when the key's
//   rank <= the query's rank, else j < i: k_offset = 1).
// - Partial sums: each rank computes its contribution into a zeroed buffer and then adds the
//   partial that arrived from its predecessor, so the incoming transfer hides behind the compute
//   and the summation order is fixed (deterministic).
#include "attention/context_parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.h"

namespace loom::attention {

std::string_view cp_scheme_name(CpScheme s) {
  switch (s) {
    case CpScheme::burst: return "burst";
    case CpScheme::ring: return "ring";
    case CpScheme::allgather: return "allgather";
    case CpScheme::ulysses: return "ulysses";
  }
  return "?";
}

CpScheme cp_scheme_from_name(std::string_view name) {
  for (CpScheme s : {CpScheme::burst, CpScheme::ring, CpScheme::allgather, CpScheme::ulysses})
    if (name == cp_scheme_name(s)) return s;
  LOOM_CHECK(false, "unknown cp scheme '{}'; choose burst, ring, allgather or ulysses", name);
  return CpScheme::burst;
}

std::string_view cp_backward_name(CpBackward b) {
  switch (b) {
    case CpBackward::auto_select: return "auto";
    case CpBackward::burst: return "burst";
    case CpBackward::ring: return "ring";
  }
  return "?";
}

CpBackward cp_backward_from_name(std::string_view name) {
  for (CpBackward b : {CpBackward::auto_select, CpBackward::burst, CpBackward::ring})
    if (name == cp_backward_name(b)) return b;
  LOOM_CHECK(false, "unknown cp backward '{}'; choose auto, burst or ring", name);
  return CpBackward::auto_select;
}

// Per token and rank-hop: Burst moves Q and dO (dtype) and dQ (f32) of NH heads plus D and LSE
// (f32 per head); the ring moves K and V (dtype) and dK, dV (f32) of NKV heads.
static int64_t burst_bytes_per_token(int64_t NH, int64_t HD, DType dt) {
  return NH * HD * (2 * int64_t(dtype_size(dt)) + 4) + 8 * NH;
}
static int64_t ring_bytes_per_token(int64_t NKV, int64_t HD, DType dt) {
  return NKV * HD * (2 * int64_t(dtype_size(dt)) + 8);
}

CpBackward choose_cp_backward(int64_t NH, int64_t NKV, int64_t HD, DType dtype) {
  return burst_bytes_per_token(NH, HD, dtype) <= ring_bytes_per_token(NKV, HD, dtype)
             ? CpBackward::burst
             : CpBackward::ring;
}

int64_t cp_forward_bytes(int64_t B, int64_t T, int G, int64_t NKV, int64_t HD, DType dtype) {
  return B * (T / G) * (G - 1) * 2 * NKV * HD * int64_t(dtype_size(dtype));
}

int64_t cp_backward_bytes(CpBackward kind, int64_t B, int64_t T, int G, int64_t NH, int64_t NKV,
                          int64_t HD, DType dtype) {
  LOOM_CHECK(kind != CpBackward::auto_select, "cp_backward_bytes: pass burst or ring, not auto");
  const int64_t per_token = kind == CpBackward::burst ? burst_bytes_per_token(NH, HD, dtype)
                                                      : ring_bytes_per_token(NKV, HD, dtype);
  return B * (T / G) * (G - 1) * per_token;
}

int64_t cp_ulysses_bytes(bool backward, int64_t B, int64_t T, int G, int64_t NH, int64_t NKV,
                         int64_t HD, DType dtype) {
  const int64_t b = int64_t(dtype_size(dtype)), Tl = T / G;
  const int64_t per_token = backward ? (2 * NH + 2 * NKV) * HD * b + 8 * NH + 4 * (NH + 2 * NKV) * HD
                                     : (NH + 2 * NKV) * HD * b + 4 * NH * HD + 4 * NH;
  return B * Tl * (G - 1) * per_token / G;  // NH, NKV are multiples of G
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tags: one per (what travels, which ring), so the inner and outer rings (which may join the same
// two ranks, e.g. G = 2) never match each other's messages.
constexpr int kTagBlockInner = 401, kTagBlockOuter = 402, kTagPartInner = 403, kTagPartOuter = 404;

using Clock = std::chrono::steady_clock;

// A view of one workspace buffer (the Workspace owns the memory).
template <typename T>
struct Span {
  T* p = nullptr;
  size_t n = 0;
  T* data() const { return p; }
  size_t size() const { return n; }
  T* begin() const { return p; }
  T* end() const { return p + n; }
  T& operator[](size_t i) const { return p[i]; }
};

// Every buffer a call allocates, from the caller's pool (CpContext::pool, category workspace)
// or one of its own, zeroed, and released together when the call returns: the call's peak is
// the sum of their sizes, `bytes` (cp_workspace_bytes predicts it).
class Workspace {
 public:
  explicit Workspace(MemoryPool* pool) : pool_(pool ? *pool : own_) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    for (auto it = allocs_.rbegin(); it != allocs_.rend(); ++it)
      pool_.release(it->first, it->second, MemCategory::workspace);
  }
  template <typename T>
  Span<T> make(size_t n) {
    return {static_cast<T*>(alloc(n * sizeof(T))), n};
  }
  // A byte buffer with float alignment (the pool's 64-byte blocks hold the last partial float).
  Span<float> make_bytes(size_t nbytes) {
    return {static_cast<float*>(alloc(nbytes)), (nbytes + 3) / 4};
  }
  int64_t bytes = 0;

 private:
  void* alloc(size_t nbytes) {
    void* p = pool_.allocate(nbytes, MemCategory::workspace);
    allocs_.emplace_back(p, nbytes);
    bytes += int64_t(nbytes);
    std::memset(p, 0, nbytes);
    return p;
  }
  MemoryPool own_;
  MemoryPool& pool_;
  std::vector<std::pair<void*, size_t>> allocs_;
};

// Everything a call needs to know about shapes and where its rows sit.
struct Geo {
  int64_t B, Tl, T, NH, NKV, HD;
  int G, r;
  CpLayout layout;
  bool causal;
  float scale;
  DType dtype;
  size_t es;                                 // bytes per element of q/k/v/dout
  std::vector<std::vector<CpSegment>> segs;  // [rank] -> its segments
};

Geo make_geo(const AttentionShape& s, DType dtype, const CpContext& ctx) {
  Geo g;
  g.G = ctx.group.size();
  g.r = ctx.group.rank();
  g.B = s.B;
  g.Tl = s.Tq;
  g.T = s.Tq * g.G;
  g.NH = s.NH;
  g.NKV = s.NKV;
  g.HD = s.HD;
  g.layout = ctx.layout;
  g.causal = s.causal;
  g.scale = s.scale;
  g.dtype = dtype;
  g.es = dtype_size(dtype);
  for (int j = 0; j < g.G; ++j) g.segs.push_back(cp_segments(ctx.layout, g.T, g.G, j));
  return g;
}

// How the flash kernel must mask query segment qs against key segment ks.
struct PairMask {
  bool skip, causal;
  int64_t q_offset, k_offset;
};
PairMask pair_mask(const CpSegment& qs, const CpSegment& ks, bool causal) {
  if (!causal) return {false, false, 0, 0};
  if (qs.pos_stride == 1 && ks.pos_stride == 1) {
    if (ks.pos_start > qs.pos_start + qs.len - 1) return {true, false, 0, 0};  // all in the future
    if (ks.pos_start + ks.len - 1 <= qs.pos_start) return {false, false, 0, 0};  // all visible
    return {false, true, qs.pos_start, ks.pos_start};
  }
  // Striped: query i at i*G + rq, key j at j*G + rk (|rq - rk| < G).
  LOOM_ASSERT(qs.pos_stride == ks.pos_stride && qs.len == ks.len, "striped segments differ");
  return {false, true, 0, ks.pos_start > qs.pos_start ? 1 : 0};
}

// rows x cols elements of `src` (dtype, row stride `stride`) -> f32 with the same row stride
// (only the cols are written: the caller's gradient buffers share the stride).
void widen_rows(float* dst, const void* src, DType dt, int64_t rows, int64_t cols, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i) {
    if (dt == DType::f32)
      std::memcpy(dst + i * stride, static_cast<const float*>(src) + i * stride, size_t(cols) * 4);
    else
      convert_bf16_to_f32(static_cast<const bf16*>(src) + i * stride, dst + i * stride, size_t(cols));
  }
}

// rows x cols of src (row stride `stride`, es bytes per element) -> contiguous dst.
void pack_rows(void* dst, const void* src, size_t es, int64_t rows, int64_t cols, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(static_cast<char*>(dst) + size_t(i * cols) * es,
                static_cast<const char*>(src) + size_t(i * stride) * es, size_t(cols) * es);
}

// dst (rows, stride) += src (rows, cols contiguous).
void add_rows(float* dst, const float* src, int64_t rows, int64_t cols, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) dst[i * stride + c] += src[i * cols + c];
}

// Topology of the two-level ring. rank_at[n][l] is the group rank of local index l on node n.
struct RingTopo {
  int N = 1, L = 1, n = 0, l = 0;
  std::vector<std::vector<int>> rank_at;
  int next_local() const { return rank_at[size_t(n)][size_t((l + 1) % L)]; }
  int prev_local() const { return rank_at[size_t(n)][size_t((l - 1 + L) % L)]; }
  int next_node() const { return rank_at[size_t((n + 1) % N)][size_t(l)]; }
  int prev_node() const { return rank_at[size_t((n - 1 + N) % N)][size_t(l)]; }
  // The block this rank holds at outer step o, inner step i started on this group rank.
  int origin(int o, int i) const {
    return rank_at[size_t((n - o + N) % N)][size_t((l - i + L) % L)];
  }
};

RingTopo make_topo(const CpContext& ctx) {
  const int G = ctx.group.size(), r = ctx.group.rank();
  RingTopo t;
  auto consecutive = [&](int L) {
    t.L = L;
    t.N = G / L;
    t.rank_at.assign(size_t(t.N), std::vector<int>(size_t(L)));
    for (int j = 0; j < G; ++j) t.rank_at[size_t(j / L)][size_t(j % L)] = j;
  };
  if (!ctx.double_ring) {
    consecutive(G);
  } else if (ctx.ranks_per_node > 0) {
    consecutive(ctx.ranks_per_node);
  } else {
    // Group members by node, in group-rank order; a double ring needs the same count per node.
    const std::vector<int>& nodes = ctx.group.member_nodes();
    std::vector<int> ids(nodes.begin(), nodes.end());
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    std::vector<std::vector<int>> by_node(ids.size());
    for (int j = 0; j < G; ++j) {
      size_t k = size_t(std::lower_bound(ids.begin(), ids.end(), nodes[size_t(j)]) - ids.begin());
      by_node[k].push_back(j);
    }
    bool uniform = true;
    for (auto& v : by_node) uniform = uniform && v.size() == by_node[0].size();
    if (!uniform) {
      consecutive(G);  // uneven nodes: the flat ring is still correct, just not topology-aware
    } else {
      t.N = int(by_node.size());
      t.L = int(by_node[0].size());
      t.rank_at = by_node;
    }
  }
  for (int a = 0; a < t.N; ++a)
    for (int b = 0; b < t.L; ++b)
      if (t.rank_at[size_t(a)][size_t(b)] == r) t.n = a, t.l = b;
  return t;
}

// One pass around the two-level ring. compute(block, origin, partial) is called G times, once
// per block (its own first), with `partial` zeroed (P elements) or null when P == 0. On return
// own_partial (P) holds the sum over all ranks of the partials for this rank's own block.
void run_ring(const comm::ProcessGroup& g, const RingTopo& t, bool overlap, const void* own_block,
              size_t block_bytes, int64_t P,
              const std::function<void(const void*, int, float*)>& compute, float* own_partial,
              Workspace& ws, double& wait_s) {
  auto wait = [&](comm::Work& w) {
    auto t0 = Clock::now();
    w.wait();
    wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
    w = comm::Work();
  };
  auto block_ref = [&](const void* p) {
    return comm::BufferRef(const_cast<void*>(p), int64_t(block_bytes), DType::u8);
  };
  auto part_ref = [&](float* p) { return comm::BufferRef(p, P, DType::f32); };
  const bool partial = P > 0;
  const size_t Pz = size_t(P);

  // Travelling blocks: two outer and two inner receive buffers, used alternately.
  Span<float> outer_buf[2], inner_buf[2];
  if (t.N > 1)
    for (auto& b : outer_buf) b = ws.make_bytes(block_bytes);
  if (t.L > 1)
    for (auto& b : inner_buf) b = ws.make_bytes(block_bytes);
  // Partials: contribution, own-block sum, and send/receive buffers of both rings.
  Span<float> contrib, self_part, node_total, in_send, in_recv, out_send, out_recv;
  if (partial) {
    contrib = ws.make<float>(Pz);
    self_part = ws.make<float>(Pz);
    node_total = ws.make<float>(Pz);
    if (t.L > 1) in_send = ws.make<float>(Pz), in_recv = ws.make<float>(Pz);
    if (t.N > 1) out_send = ws.make<float>(Pz), out_recv = ws.make<float>(Pz);
  }
  auto add = [&](float* dst, const float* a, const float* b) {
    for (size_t i = 0; i < Pz; ++i) dst[i] = a[i] + b[i];
  };

  const void* outer_cur = own_block;
  comm::Work out_part_send_w;
  for (int o = 0; o < t.N; ++o) {
    comm::Work out_send_w, out_recv_w, out_part_recv_w;
    float* outer_next = t.N > 1 ? outer_buf[o % 2].data() : nullptr;
    if (o < t.N - 1) {  // the next outer block crosses nodes behind this node's L steps
      out_send_w = g.isend(block_ref(outer_cur), t.next_node(), kTagBlockOuter);
      out_recv_w = g.irecv(block_ref(outer_next), t.prev_node(), kTagBlockOuter);
      if (!overlap) wait(out_send_w), wait(out_recv_w);
    }
    if (partial && o >= 2)  // the sum over earlier nodes of this outer block's partial
      out_part_recv_w = g.irecv(part_ref(out_recv.data()), t.prev_node(), kTagPartOuter);

    const void* cur = outer_cur;
    comm::Work in_part_send_w;
    for (int i = 0; i < t.L; ++i) {
      comm::Work in_send_w, in_recv_w, in_part_recv_w;
      float* inner_next = t.L > 1 ? inner_buf[i % 2].data() : nullptr;
      if (i < t.L - 1) {
        in_send_w = g.isend(block_ref(cur), t.next_local(), kTagBlockInner);
        in_recv_w = g.irecv(block_ref(inner_next), t.prev_local(), kTagBlockInner);
        if (!overlap) wait(in_send_w), wait(in_recv_w);
      }
      if (partial && i >= 2)
        in_part_recv_w = g.irecv(part_ref(in_recv.data()), t.prev_local(), kTagPartInner);

      const int origin = t.origin(o, i);
      if (partial) {
        std::fill(contrib.begin(), contrib.end(), 0.0f);
        compute(cur, origin, contrib.data());
        if (i == 0) {
          std::copy(contrib.begin(), contrib.end(), self_part.begin());
        } else {
          wait(in_part_send_w);  // in_send is free again
          if (i == 1) {
            std::copy(contrib.begin(), contrib.end(), in_send.begin());
          } else {
            wait(in_part_recv_w);
            add(in_send.data(), in_recv.data(), contrib.data());
          }
          // Never waited here, even without overlap: the successor posts the matching receive
          // only at the start of its next step, so waiting now would deadlock the ring once
          // messages go by rendezvous. It is waited before in_send is reused.
          in_part_send_w = g.isend(part_ref(in_send.data()), t.next_local(), kTagPartInner);
        }
      } else {
        compute(cur, origin, nullptr);
      }
      if (i < t.L - 1) {
        wait(in_send_w);
        wait(in_recv_w);
        cur = inner_next;
      }
    }
    if (partial) {
      if (t.L > 1) {  // the node's sum for the outer block comes home around the inner ring
        comm::Work home = g.irecv(part_ref(in_recv.data()), t.prev_local(), kTagPartInner);
        wait(home);
        wait(in_part_send_w);
        add(node_total.data(), self_part.data(), in_recv.data());
      } else {
        std::copy(self_part.begin(), self_part.end(), node_total.begin());
      }
      if (o == 0) {
        std::copy(node_total.begin(), node_total.end(), own_partial);
      } else {
        wait(out_part_send_w);
        if (o == 1) {
          std::copy(node_total.begin(), node_total.end(), out_send.begin());
        } else {
          wait(out_part_recv_w);
          add(out_send.data(), out_recv.data(), node_total.data());
        }
        out_part_send_w = g.isend(part_ref(out_send.data()), t.next_node(), kTagPartOuter);  // as above
      }
    }
    if (o < t.N - 1) {
      wait(out_send_w);
      wait(out_recv_w);
      outer_cur = outer_next;
    }
  }
  if (partial && t.N > 1) {  // every other node's sum for this rank's own block
    comm::Work home = g.irecv(part_ref(out_recv.data()), t.prev_node(), kTagPartOuter);
    wait(home);
    wait(out_part_send_w);
    for (size_t i = 0; i < Pz; ++i) own_partial[i] += out_recv[i];
  }
}

// ----------------------------------------------------------------------------------------------
// Local work against one block

// Merges a block result (o_blk (len, NH, HD), lse_blk (NH, len), normalised) into the running
// state (out rows, lse (B, NH, Tl)) in the overflow-free form: both weights are exp(x - lse') <= 1.
void merge_block(float* out, float* lse, int64_t o_stride, const float* o_blk, const float* lse_blk,
                 const Geo& g, int64_t b, const CpSegment& qs) {
  for (int64_t i = 0; i < qs.len; ++i) {
    const int64_t row = b * g.Tl + qs.local_start + i;
    for (int64_t h = 0; h < g.NH; ++h) {
      const float x = lse_blk[h * qs.len + i];
      if (x == kNegInf) continue;  // no visible key in this block
      float& a = lse[(b * g.NH + h) * g.Tl + qs.local_start + i];
      float* o = out + row * o_stride + h * g.HD;
      const float* ob = o_blk + (i * g.NH + h) * g.HD;
      if (a == kNegInf) {
        std::copy(ob, ob + g.HD, o);
        a = x;
        continue;
      }
      const double hi = std::max(a, x), lo = std::min(a, x);
      const double l = hi + std::log1p(std::exp(lo - hi));
      const float wa = float(std::exp(double(a) - l)), wx = float(std::exp(double(x) - l));
      for (int64_t d = 0; d < g.HD; ++d) o[d] = wa * o[d] + wx * ob[d];
      a = float(l);
    }
  }
}

// (NH, len) slice of a (B, NH, Tl) row vector for rows qs of batch b.
void slice_rows(float* dst, const float* src, const Geo& g, int64_t b, const CpSegment& qs) {
  for (int64_t h = 0; h < g.NH; ++h)
    std::memcpy(dst + h * qs.len, src + (b * g.NH + h) * g.Tl + qs.local_start,
                size_t(qs.len) * 4);
}

// Forward against the K|V block of rank `origin` (contiguous (B, Tl, NKV, HD) each, in dtype).
struct ForwardLocal {
  const Geo& g;
  float* out;
  float* lse;
  const void* q;
  int64_t q_stride, o_stride;
  Span<float> o_blk;      // (Tl, NH, HD)
  Span<float> lse_blk;    // (NH, Tl)

  void operator()(const void* block, int origin, float*) const {
    const int64_t kv = g.B * g.Tl * g.NKV * g.HD;
    const char* kb = static_cast<const char*>(block);
    const char* vb = kb + size_t(kv) * g.es;
    const char* qb = static_cast<const char*>(q);
    for (int64_t b = 0; b < g.B; ++b)
      for (const CpSegment& qs : g.segs[size_t(g.r)])
        for (const CpSegment& ks : g.segs[size_t(origin)]) {
          const PairMask m = pair_mask(qs, ks, g.causal);
          if (m.skip) continue;
          AttentionShape s{1,        qs.len,  ks.len,     g.NH,       g.NKV,      g.HD,
                           q_stride, g.NKV * g.HD, g.NKV * g.HD, g.NH * g.HD, m.causal,
                           m.q_offset, m.k_offset, g.scale};
          const size_t qo = size_t((b * g.Tl + qs.local_start) * q_stride) * g.es;
          const size_t ko = size_t((b * g.Tl + ks.local_start) * g.NKV * g.HD) * g.es;
          if (g.dtype == DType::bf16)
            flash_attention_forward_bf16(o_blk.data(), lse_blk.data(),
                                         reinterpret_cast<const bf16*>(qb + qo),
                                         reinterpret_cast<const bf16*>(kb + ko),
                                         reinterpret_cast<const bf16*>(vb + ko), s);
          else
            flash_attention_forward(o_blk.data(), lse_blk.data(),
                                    reinterpret_cast<const float*>(qb + qo),
                                    reinterpret_cast<const float*>(kb + ko),
                                    reinterpret_cast<const float*>(vb + ko), s);
          merge_block(out, lse, o_stride, o_blk.data(), lse_blk.data(), g, b, qs);
        }
  }
};

// K|V of this rank, packed contiguous in dtype: (B, Tl, NKV, HD) twice.
Span<float> pack_kv(const Geo& g, const void* k, const void* v, const AttentionShape& s,
                           Workspace& ws) {
  const int64_t rows = g.B * g.Tl, cols = g.NKV * g.HD;
  Span<float> blk = ws.make_bytes(size_t(2 * rows * cols) * g.es);
  char* p = reinterpret_cast<char*>(blk.data());
  pack_rows(p, k, g.es, rows, cols, s.k_stride);
  pack_rows(p + size_t(rows * cols) * g.es, v, g.es, rows, cols, s.v_stride);
  return blk;
}

struct CallStats {
  const CpContext& ctx;
  bool forward;
  int64_t bytes0;
  Workspace ws;
  double wait_s = 0;
  CallStats(const CpContext& c, bool fwd)
      : ctx(c), forward(fwd), bytes0(c.group.counters().total_bytes()), ws(c.pool) {}
  ~CallStats() {
    if (!ctx.stats) return;
    const int64_t sent = ctx.group.counters().total_bytes() - bytes0;
    (forward ? ctx.stats->forward_bytes_sent : ctx.stats->backward_bytes_sent) += sent;
    (forward ? ctx.stats->forward_wait_s : ctx.stats->backward_wait_s) += wait_s;
    ctx.stats->peak_workspace_bytes = std::max(ctx.stats->peak_workspace_bytes, ws.bytes);
  }
};

void init_state(float* out, float* lse, const Geo& g, int64_t o_stride) {
  for (int64_t i = 0; i < g.B * g.Tl; ++i) std::fill_n(out + i * o_stride, g.NH * g.HD, 0.0f);
  std::fill_n(lse, g.B * g.NH * g.Tl, kNegInf);
}

// ----------------------------------------------------------------------------------------------
// Ulysses: sequence-sharded (B, Tl, heads, HD) <-> head-sharded full sequence (B, T, heads/G, HD)

// src rows (B*Tl, stride) with `heads` heads -> this rank's heads/G heads of every position, in
// global order: (B, T, heads/G, HD), elements of es bytes.
Span<float> seq_to_heads(const comm::ProcessGroup& grp, const Geo& g, const void* src,
                                int64_t stride, int64_t heads, size_t es, DType dt, Workspace& ws,
                                double& wait_s) {
  const int64_t hl = heads / g.G, blk = g.B * g.Tl * hl * g.HD;  // elements per peer
  Span<float> send = ws.make_bytes(size_t(g.G * blk) * es), recv = ws.make_bytes(size_t(g.G * blk) * es);
  char* sp = reinterpret_cast<char*>(send.data());
  const char* s = static_cast<const char*>(src);
  const size_t run = size_t(hl * g.HD) * es;
  for (int p = 0; p < g.G; ++p)  // block p: heads [p*hl, (p+1)*hl) of every local row
    for (int64_t row = 0; row < g.B * g.Tl; ++row)
      std::memcpy(sp + (size_t(p) * size_t(blk) + size_t(row * hl * g.HD)) * es,
                  s + size_t(row * stride + p * hl * g.HD) * es, run);
  auto t0 = Clock::now();
  grp.all_to_all(comm::BufferRef(send.data(), g.G * blk, dt), comm::BufferRef(recv.data(), g.G * blk, dt)).wait();
  wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  Span<float> full = ws.make_bytes(size_t(g.G * blk) * es);  // (B, T, hl, HD)
  const char* rp = reinterpret_cast<const char*>(recv.data());
  for (int j = 0; j < g.G; ++j)
    cp_gather_rows(full.data(), rp + size_t(j) * size_t(blk) * es, g.B, hl * g.HD, es, g.layout,
                   g.T, g.G, j);
  return full;
}

// Inverse of seq_to_heads for f32: full (B, T, heads/G, HD) -> dst rows (B*Tl, stride),
// overwriting or adding.
void heads_to_seq(const comm::ProcessGroup& grp, const Geo& g, const float* full, float* dst,
                  int64_t stride, int64_t heads, bool accumulate, Workspace& ws, double& wait_s) {
  const int64_t hl = heads / g.G, blk = g.B * g.Tl * hl * g.HD;
  Span<float> send = ws.make<float>(size_t(g.G * blk)), recv = ws.make<float>(size_t(g.G * blk));
  for (int j = 0; j < g.G; ++j)  // block j: rank j's rows
    cp_scatter_rows(send.data() + j * blk, full, g.B, hl * g.HD, 4, g.layout, g.T, g.G, j);
  auto t0 = Clock::now();
  grp.all_to_all(comm::BufferRef(send.data(), g.G * blk, DType::f32), comm::BufferRef(recv.data(), g.G * blk, DType::f32)).wait();
  wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  for (int p = 0; p < g.G; ++p)
    for (int64_t row = 0; row < g.B * g.Tl; ++row) {
      const float* sp = recv.data() + p * blk + row * hl * g.HD;
      float* d = dst + row * stride + p * hl * g.HD;
      for (int64_t c = 0; c < hl * g.HD; ++c) d[c] = accumulate ? d[c] + sp[c] : sp[c];
    }
}

// Row vectors: (B, NH, Tl) local -> (B, NH/G, T) head-sharded, and back.
Span<float> rows_to_heads(const comm::ProcessGroup& grp, const Geo& g, const float* src,
                                 Workspace& ws, double& wait_s) {
  const int64_t hl = g.NH / g.G, blk = g.B * hl * g.Tl;
  Span<float> send = ws.make<float>(size_t(g.G * blk)), recv = ws.make<float>(size_t(g.G * blk));
  for (int p = 0; p < g.G; ++p)
    for (int64_t b = 0; b < g.B; ++b)
      std::memcpy(send.data() + p * blk + b * hl * g.Tl, src + (b * g.NH + p * hl) * g.Tl,
                  size_t(hl * g.Tl) * 4);
  auto t0 = Clock::now();
  grp.all_to_all(comm::BufferRef(send.data(), g.G * blk, DType::f32), comm::BufferRef(recv.data(), g.G * blk, DType::f32)).wait();
  wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  Span<float> full = ws.make<float>(size_t(g.G * blk));  // (B, hl, T)
  for (int j = 0; j < g.G; ++j)
    cp_gather_rows(full.data(), recv.data() + j * blk, g.B * hl, 1, 4, g.layout, g.T, g.G, j);
  return full;
}

void heads_to_rows(const comm::ProcessGroup& grp, const Geo& g, const float* full, float* dst,
                   Workspace& ws, double& wait_s) {
  const int64_t hl = g.NH / g.G, blk = g.B * hl * g.Tl;
  Span<float> send = ws.make<float>(size_t(g.G * blk)), recv = ws.make<float>(size_t(g.G * blk));
  for (int j = 0; j < g.G; ++j)
    cp_scatter_rows(send.data() + j * blk, full, g.B * hl, 1, 4, g.layout, g.T, g.G, j);
  auto t0 = Clock::now();
  grp.all_to_all(comm::BufferRef(send.data(), g.G * blk, DType::f32), comm::BufferRef(recv.data(), g.G * blk, DType::f32)).wait();
  wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  for (int p = 0; p < g.G; ++p)
    for (int64_t b = 0; b < g.B; ++b)
      std::memcpy(dst + (b * g.NH + p * hl) * g.Tl, recv.data() + p * blk + b * hl * g.Tl,
                  size_t(hl * g.Tl) * 4);
}

AttentionShape ulysses_shape(const Geo& g) {
  const int64_t hl = g.NH / g.G, kl = g.NKV / g.G;
  return AttentionShape{g.B,     g.T,     g.T,     hl,       kl,      g.HD, hl * g.HD,
                        kl * g.HD, kl * g.HD, hl * g.HD, g.causal, 0,       0,    g.scale};
}

void ulysses_forward(float* out, float* lse, const void* q, const void* k, const void* v,
                     const AttentionShape& s, const Geo& g, const comm::ProcessGroup& grp,
                     CallStats& cs) {
  Span<float> qf = seq_to_heads(grp, g, q, s.q_stride, g.NH, g.es, g.dtype, cs.ws, cs.wait_s);
  Span<float> kf = seq_to_heads(grp, g, k, s.k_stride, g.NKV, g.es, g.dtype, cs.ws, cs.wait_s);
  Span<float> vf = seq_to_heads(grp, g, v, s.v_stride, g.NKV, g.es, g.dtype, cs.ws, cs.wait_s);
  const AttentionShape fs = ulysses_shape(g);
  Span<float> of = cs.ws.make<float>(size_t(g.B * g.T * fs.NH * g.HD));  // (B, T, NH/G, HD)
  Span<float> lf = cs.ws.make<float>(size_t(g.B * fs.NH * g.T));         // (B, NH/G, T)
  if (g.dtype == DType::bf16)
    flash_attention_forward_bf16(of.data(), lf.data(), reinterpret_cast<const bf16*>(qf.data()),
                                 reinterpret_cast<const bf16*>(kf.data()),
                                 reinterpret_cast<const bf16*>(vf.data()), fs);
  else
    flash_attention_forward(of.data(), lf.data(), qf.data(), kf.data(), vf.data(), fs);
  heads_to_seq(grp, g, of.data(), out, s.o_stride, g.NH, false, cs.ws, cs.wait_s);
  heads_to_rows(grp, g, lf.data(), lse, cs.ws, cs.wait_s);
}

void ulysses_backward(float* dq, float* dk, float* dv, const void* dout, const void* q,
                      const void* k, const void* v, const float* D, const float* lse,
                      const AttentionShape& s, const Geo& g, const comm::ProcessGroup& grp,
                      CallStats& cs) {
  const AttentionShape fs = ulysses_shape(g);
  auto to_f32 = [&](Span<float> x, int64_t heads) {
    if (g.dtype == DType::f32) return x;
    const int64_t n = g.B * g.T * heads * g.HD;
    Span<float> w = cs.ws.make<float>(size_t(n));
    convert_bf16_to_f32(reinterpret_cast<const bf16*>(x.data()), w.data(), size_t(n));
    return w;
  };
  Span<float> qf = to_f32(seq_to_heads(grp, g, q, s.q_stride, g.NH, g.es, g.dtype, cs.ws, cs.wait_s), fs.NH);
  Span<float> kf = to_f32(seq_to_heads(grp, g, k, s.k_stride, g.NKV, g.es, g.dtype, cs.ws, cs.wait_s), fs.NKV);
  Span<float> vf = to_f32(seq_to_heads(grp, g, v, s.v_stride, g.NKV, g.es, g.dtype, cs.ws, cs.wait_s), fs.NKV);
  Span<float> dof = to_f32(seq_to_heads(grp, g, dout, s.o_stride, g.NH, g.es, g.dtype, cs.ws, cs.wait_s), fs.NH);
  Span<float> Df = rows_to_heads(grp, g, D, cs.ws, cs.wait_s);
  Span<float> lf = rows_to_heads(grp, g, lse, cs.ws, cs.wait_s);
  Span<float> dqf = cs.ws.make<float>(qf.size()), dkf = cs.ws.make<float>(kf.size()),
                     dvf = cs.ws.make<float>(vf.size());
  flash_attention_backward(dqf.data(), dkf.data(), dvf.data(), dof.data(), qf.data(), kf.data(),
                           vf.data(), lf.data(), Df.data(), fs);
  heads_to_seq(grp, g, dqf.data(), dq, s.q_stride, g.NH, true, cs.ws, cs.wait_s);
  heads_to_seq(grp, g, dkf.data(), dk, s.k_stride, g.NKV, true, cs.ws, cs.wait_s);
  heads_to_seq(grp, g, dvf.data(), dv, s.v_stride, g.NKV, true, cs.ws, cs.wait_s);
}

}  // namespace

// ----------------------------------------------------------------------------------------------

void check_cp_attention(const AttentionShape& s, DType dtype, const CpContext& ctx) {
  LOOM_CHECK(ctx.group.valid(), "cp attention: the cp group is null (build it from the topology)");
  const int G = ctx.group.size();
  const std::string pre = ctx.group.prefix();
  LOOM_CHECK(dtype == DType::f32 || dtype == DType::bf16,
             "{} cp attention: dtype {} not supported; use f32 or bf16", pre, dtype_name(dtype));
  LOOM_CHECK(s.B >= 1 && s.Tq >= 1 && s.NH >= 1 && s.NKV >= 1 && s.HD >= 1,
             "{} cp attention: sizes must be positive (B={} Tl={} NH={} NKV={} HD={})", pre, s.B,
             s.Tq, s.NH, s.NKV, s.HD);
  LOOM_CHECK(s.Tq == s.Tk, "{} cp attention: local Tq={} must equal Tk={} (each rank holds T/cp "
             "tokens of q, k and v)", pre, s.Tq, s.Tk);
  LOOM_CHECK(s.q_offset == 0 && s.k_offset == 0,
             "{} cp attention: q_offset={} k_offset={} must be 0; positions come from the cp "
             "layout", pre, s.q_offset, s.k_offset);
  LOOM_CHECK(s.NH % s.NKV == 0, "{} cp attention: NKV={} must divide NH={}", pre, s.NKV, s.NH);
  LOOM_CHECK(s.q_stride >= s.NH * s.HD && s.o_stride >= s.NH * s.HD &&
                 s.k_stride >= s.NKV * s.HD && s.v_stride >= s.NKV * s.HD,
             "{} cp attention: row strides (q {} k {} v {} o {}) narrower than a row (NH*HD={}, "
             "NKV*HD={})", pre, s.q_stride, s.k_stride, s.v_stride, s.o_stride, s.NH * s.HD,
             s.NKV * s.HD);
  check_cp_layout(ctx.layout, s.Tq * G, G);
  if (ctx.scheme == CpScheme::ulysses && s.NKV % G != 0) {
    std::string ok;
    for (int64_t d = 1; d <= s.NKV; ++d)
      if (s.NKV % d == 0) ok += fmt::format("{}{}", ok.empty() ? "" : ",", d);
    LOOM_CHECK(false,
               "{} cp scheme ulysses: degree cp={} must divide n_kv_heads={} (each rank takes "
               "whole kv heads); use cp in {{{}}}, or scheme burst, ring or allgather", pre, G,
               s.NKV, ok);
  }
  if (ctx.double_ring && ctx.ranks_per_node > 0)
    LOOM_CHECK(G % ctx.ranks_per_node == 0,
               "{} cp attention: ranks_per_node={} must divide cp={} for the double ring; use a "
               "divisor of {} or double_ring=false", pre, ctx.ranks_per_node, G, G);
}

// The sum of the buffers forward_call / backward_call and the functions they call allocate from
// their Workspace, statement by statement (keep the two in step: every call asserts equality).
int64_t cp_workspace_bytes(bool backward, const AttentionShape& s, DType dtype, CpScheme scheme,
                           CpBackward kind, int G, int nodes) {
  LOOM_CHECK(G >= 1 && nodes >= 1 && G % nodes == 0,
             "cp_workspace_bytes: nodes = {} must divide cp = {}", nodes, G);
  const int64_t es = int64_t(dtype_size(dtype)), B = s.B, Tl = s.Tq, NH = s.NH, NKV = s.NKV,
                HD = s.HD, rows = B * Tl, qcols = NH * HD, kcols = NKV * HD;
  const bool bf = dtype == DType::bf16;
  const int N = nodes, L = G / nodes;
  const int64_t ring_bufs = 2 * (N > 1) + 2 * (L > 1);  // receive buffers of a travelling block
  const int64_t ring_parts = 3 + 2 * (L > 1) + 2 * (N > 1);  // f32 partials (run_ring)
  const int64_t rowvec = B * NH * Tl * 4;  // a (B, NH, Tl) f32 row vector (lse, D)
  int64_t b = 0;
  if (!backward) {
    if (scheme == CpScheme::ulysses)  // q, k, v: send, recv, full; out: send, recv; lse likewise
      return 3 * es * rows * (NH + 2 * NKV) * HD + 3 * 4 * rows * qcols + 3 * rowvec;
    const int64_t block = 2 * rows * kcols * es;  // K|V
    b = Tl * qcols * 4 + NH * Tl * 4 + block;     // o_blk, lse_blk, K|V
    return b + block * (scheme == CpScheme::allgather ? G : ring_bufs);
  }
  b = (bf ? rows * s.o_stride * 4 : 0) + rowvec;  // widened dout, D
  if (scheme == CpScheme::ulysses) {
    const int64_t in = rows * (2 * NH + 2 * NKV) * HD;  // q, k, v, dout elements
    return b + 3 * es * in + (bf ? 4 * in : 0) + 6 * rowvec + 3 * 4 * rows * (NH + 2 * NKV) * HD;
  }
  b += 2 * NH * Tl * 4;  // lse_seg, D_seg
  if (scheme == CpScheme::burst && kind == CpBackward::auto_select)
    kind = choose_cp_backward(NH, NKV, HD, dtype);
  if (scheme == CpScheme::burst && kind == CpBackward::burst) {
    const int64_t block = 2 * rows * qcols * es + 2 * rowvec;  // Q | dO | D | LSE
    const int64_t P = rows * qcols;                           // dQ
    if (bf) b += rows * (s.k_stride + s.v_stride) * 4 + 2 * P * 4;  // k32, v32, q32, do32
    return b + block + P * 4 + block * ring_bufs + P * 4 * ring_parts;
  }
  const int64_t kvn = rows * kcols, block = 2 * kvn * es;  // K|V; P = dK|dV
  if (bf) b += rows * s.q_stride * 4 + 2 * kvn * 4;         // q32, k32, v32
  b += block + 2 * kvn * 4;                                 // K|V, dkv_own
  if (scheme == CpScheme::allgather) return b + G * block + G * 2 * kvn * 4;
  return b + block * ring_bufs + 2 * kvn * 4 * ring_parts;
}

int64_t cp_workspace_bytes(bool backward, const AttentionShape& local, DType dtype,
                           const CpContext& ctx) {
  return cp_workspace_bytes(backward, local, dtype, ctx.scheme, ctx.backward, ctx.group.size(),
                            make_topo(ctx).N);
}

static void forward_call(float* out, float* lse, const void* q, const void* k, const void* v,
                         const AttentionShape& local, const CpContext& ctx, const Geo& g,
                         CallStats& cs) {
  if (ctx.scheme == CpScheme::ulysses) {
    ulysses_forward(out, lse, q, k, v, local, g, ctx.group, cs);
    return;
  }
  init_state(out, lse, g, local.o_stride);
  Span<float> o_blk = cs.ws.make<float>(size_t(g.Tl * g.NH * g.HD));  // (Tl, NH, HD)
  Span<float> lse_blk = cs.ws.make<float>(size_t(g.NH * g.Tl));       // (NH, Tl)
  ForwardLocal fwd{g, out, lse, q, local.q_stride, local.o_stride, o_blk, lse_blk};
  Span<float> kv = pack_kv(g, k, v, local, cs.ws);  // (2, B, Tl, NKV, HD) in dtype
  const size_t block_bytes = size_t(2 * g.B * g.Tl * g.NKV * g.HD) * g.es;
  if (ctx.scheme == CpScheme::allgather) {
    Span<float> all = cs.ws.make_bytes(block_bytes * size_t(g.G));  // (G, 2, B, Tl, NKV, HD)
    auto t0 = Clock::now();
    ctx.group.all_gather(comm::BufferRef(kv.data(), int64_t(block_bytes), DType::u8),
                         comm::BufferRef(all.data(), int64_t(block_bytes) * g.G, DType::u8)).wait();
    cs.wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
    for (int j = 0; j < g.G; ++j)  // own block first, then the others in rank order
      fwd(reinterpret_cast<const char*>(all.data()) + block_bytes * size_t((g.r + j) % g.G),
          (g.r + j) % g.G, nullptr);
    return;
  }
  run_ring(ctx.group, make_topo(ctx), ctx.overlap, kv.data(), block_bytes, 0, fwd, nullptr, cs.ws,
           cs.wait_s);
}

static void backward_call(float* dq, float* dk, float* dv, const void* dout, const void* q,
                          const void* k, const void* v, const float* out, const float* lse,
                          DType dtype, const AttentionShape& local, const CpContext& ctx,
                          const Geo& g, CallStats& cs) {
  const int64_t rows = g.B * g.Tl, qcols = g.NH * g.HD, kcols = g.NKV * g.HD;

  // D = rowsum(dO * O)  (B, NH, Tl), from f32 dO (widened once when dout is bf16).
  Span<float> dout32;  // (B, Tl, o_stride)
  const float* dout_f = static_cast<const float*>(dout);
  if (dtype == DType::bf16) {
    dout32 = cs.ws.make<float>(size_t(rows * local.o_stride));
    widen_rows(dout32.data(), dout, dtype, rows, qcols, local.o_stride);
    dout_f = dout32.data();
  }
  Span<float> D = cs.ws.make<float>(size_t(g.B * g.NH * g.Tl));  // (B, NH, Tl)
  attention_backward_preprocess(D.data(), dout_f, out, local);

  if (ctx.scheme == CpScheme::ulysses) {
    if (ctx.stats) ctx.stats->last_backward = CpBackward::auto_select;
    ulysses_backward(dq, dk, dv, dout, q, k, v, D.data(), lse, local, g, ctx.group, cs);
    return;
  }
  CpBackward kind = CpBackward::ring;
  if (ctx.scheme == CpScheme::burst)
    kind = ctx.backward != CpBackward::auto_select ? ctx.backward
                                                   : choose_cp_backward(g.NH, g.NKV, g.HD, dtype);
  if (ctx.stats) ctx.stats->last_backward = kind;
  Span<float> lse_seg = cs.ws.make<float>(size_t(g.NH * g.Tl)),  // (NH, len)
      D_seg = cs.ws.make<float>(size_t(g.NH * g.Tl));

  if (kind == CpBackward::burst) {
    // K, V stay (f32, caller strides so dk/dv line up); Q|dO|D|LSE travel, dQ partial comes home.
    Span<float> k32, v32;
    const float *kp = static_cast<const float*>(k), *vp = static_cast<const float*>(v);
    if (dtype == DType::bf16) {
      k32 = cs.ws.make<float>(size_t(rows * local.k_stride));
      v32 = cs.ws.make<float>(size_t(rows * local.v_stride));
      widen_rows(k32.data(), k, dtype, rows, kcols, local.k_stride);
      widen_rows(v32.data(), v, dtype, rows, kcols, local.v_stride);
      kp = k32.data(), vp = v32.data();
    }
    const size_t qbytes = size_t(rows * qcols) * g.es, rbytes = size_t(g.B * g.NH * g.Tl) * 4;
    const size_t block_bytes = 2 * qbytes + 2 * rbytes;
    Span<float> blk = cs.ws.make_bytes(block_bytes);  // Q | dO | D | LSE
    char* bp = reinterpret_cast<char*>(blk.data());
    pack_rows(bp, q, g.es, rows, qcols, local.q_stride);
    pack_rows(bp + qbytes, dout, g.es, rows, qcols, local.o_stride);
    std::memcpy(bp + 2 * qbytes, D.data(), rbytes);
    std::memcpy(bp + 2 * qbytes + rbytes, lse, rbytes);
    Span<float> q32, do32;
    if (dtype == DType::bf16) q32 = cs.ws.make<float>(size_t(rows * qcols)), do32 = cs.ws.make<float>(size_t(rows * qcols));
    auto compute = [&](const void* block, int origin, float* dq_part) {
      const char* b8 = static_cast<const char*>(block);
      const float *Qb = reinterpret_cast<const float*>(b8), *dOb = reinterpret_cast<const float*>(b8 + qbytes);
      if (dtype == DType::bf16) {
        convert_bf16_to_f32(reinterpret_cast<const bf16*>(b8), q32.data(), size_t(rows * qcols));
        convert_bf16_to_f32(reinterpret_cast<const bf16*>(b8 + qbytes), do32.data(), size_t(rows * qcols));
        Qb = q32.data(), dOb = do32.data();
      }
      const float* Db = reinterpret_cast<const float*>(b8 + 2 * qbytes);
      const float* Lb = reinterpret_cast<const float*>(b8 + 2 * qbytes + rbytes);
      for (int64_t b = 0; b < g.B; ++b)
        for (const CpSegment& qs : g.segs[size_t(origin)])
          for (const CpSegment& ks : g.segs[size_t(g.r)]) {
            const PairMask m = pair_mask(qs, ks, g.causal);
            if (m.skip) continue;
            slice_rows(lse_seg.data(), Lb, g, b, qs);
            slice_rows(D_seg.data(), Db, g, b, qs);
            AttentionShape s{1,     qs.len, ks.len, g.NH, g.NKV, g.HD, qcols, local.k_stride,
                             local.v_stride, qcols, m.causal, m.q_offset, m.k_offset, g.scale};
            const int64_t qo = (b * g.Tl + qs.local_start) * qcols;
            const int64_t ko = b * g.Tl + ks.local_start;
            flash_attention_backward(dq_part + qo, dk + ko * local.k_stride, dv + ko * local.v_stride,
                                     dOb + qo, Qb + qo, kp + ko * local.k_stride,
                                     vp + ko * local.v_stride, lse_seg.data(), D_seg.data(), s);
          }
    };
    Span<float> dq_own = cs.ws.make<float>(size_t(rows * qcols));  // (B, Tl, NH, HD)
    run_ring(ctx.group, make_topo(ctx), ctx.overlap, blk.data(), block_bytes, rows * qcols,
             compute, dq_own.data(), cs.ws, cs.wait_s);
    add_rows(dq, dq_own.data(), rows, qcols, local.q_stride);
    return;
  }

  // Ring backward (and all-gather): Q, dO, LSE, D stay; K|V travel, dK|dV partials come home.
  Span<float> q32;
  const float* qp = static_cast<const float*>(q);
  if (dtype == DType::bf16) {
    q32 = cs.ws.make<float>(size_t(rows * local.q_stride));
    widen_rows(q32.data(), q, dtype, rows, qcols, local.q_stride);
    qp = q32.data();
  }
  const float* dop = dout_f;  // o_stride
  const int64_t kvn = rows * kcols;
  Span<float> kv = pack_kv(g, k, v, local, cs.ws);  // (2, B, Tl, NKV, HD) in dtype
  const size_t block_bytes = size_t(2 * kvn) * g.es;
  Span<float> k32, v32;
  if (dtype == DType::bf16) k32 = cs.ws.make<float>(size_t(kvn)), v32 = cs.ws.make<float>(size_t(kvn));
  auto compute = [&](const void* block, int origin, float* dkv_part) {
    const char* b8 = static_cast<const char*>(block);
    const float *Kb = reinterpret_cast<const float*>(b8), *Vb = reinterpret_cast<const float*>(b8 + size_t(kvn) * g.es);
    if (dtype == DType::bf16) {
      convert_bf16_to_f32(reinterpret_cast<const bf16*>(b8), k32.data(), size_t(kvn));
      convert_bf16_to_f32(reinterpret_cast<const bf16*>(b8 + size_t(kvn) * 2), v32.data(), size_t(kvn));
      Kb = k32.data(), Vb = v32.data();
    }
    for (int64_t b = 0; b < g.B; ++b)
      for (const CpSegment& qs : g.segs[size_t(g.r)])
        for (const CpSegment& ks : g.segs[size_t(origin)]) {
          const PairMask m = pair_mask(qs, ks, g.causal);
          if (m.skip) continue;
          slice_rows(lse_seg.data(), lse, g, b, qs);
          slice_rows(D_seg.data(), D.data(), g, b, qs);
          AttentionShape s{1,     qs.len, ks.len, g.NH, g.NKV, g.HD, local.q_stride, kcols, kcols,
                           local.o_stride, m.causal, m.q_offset, m.k_offset, g.scale};
          const int64_t qo = b * g.Tl + qs.local_start;
          const int64_t ko = (b * g.Tl + ks.local_start) * kcols;
          flash_attention_backward(dq + qo * local.q_stride, dkv_part + ko, dkv_part + kvn + ko,
                                   dop + qo * local.o_stride, qp + qo * local.q_stride, Kb + ko,
                                   Vb + ko, lse_seg.data(), D_seg.data(), s);
        }
  };
  Span<float> dkv_own = cs.ws.make<float>(size_t(2 * kvn));  // (2, B, Tl, NKV, HD)
  if (ctx.scheme == CpScheme::allgather) {
    // Megatron-CP: gather K|V again, compute every block's dK|dV, reduce_scatter them home.
    Span<float> all = cs.ws.make_bytes(block_bytes * size_t(g.G));
    Span<float> parts = cs.ws.make<float>(size_t(2 * kvn * g.G));  // (G, 2, B, Tl, NKV, HD)
    auto t0 = Clock::now();
    ctx.group.all_gather(comm::BufferRef(kv.data(), int64_t(block_bytes), DType::u8),
                         comm::BufferRef(all.data(), int64_t(block_bytes) * g.G, DType::u8)).wait();
    cs.wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
    for (int i = 0; i < g.G; ++i) {
      const int j = (g.r + i) % g.G;
      compute(reinterpret_cast<const char*>(all.data()) + block_bytes * size_t(j), j,
              parts.data() + size_t(j) * size_t(2 * kvn));
    }
    t0 = Clock::now();
    ctx.group.reduce_scatter(comm::BufferRef(parts.data(), 2 * kvn * g.G, DType::f32),
                             comm::BufferRef(dkv_own.data(), 2 * kvn, DType::f32)).wait();
    cs.wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  } else {
    run_ring(ctx.group, make_topo(ctx), ctx.overlap, kv.data(), block_bytes, 2 * kvn, compute,
             dkv_own.data(), cs.ws, cs.wait_s);
  }
  add_rows(dk, dkv_own.data(), rows, kcols, local.k_stride);
  add_rows(dv, dkv_own.data() + kvn, rows, kcols, local.v_stride);
}

void cp_attention_forward(float* out, float* lse, const void* q, const void* k, const void* v,
                          DType dtype, const AttentionShape& local, const CpContext& ctx) {
  check_cp_attention(local, dtype, ctx);
  const Geo g = make_geo(local, dtype, ctx);
  CallStats cs(ctx, true);
  forward_call(out, lse, q, k, v, local, ctx, g, cs);
  const int64_t predicted = cp_workspace_bytes(false, local, dtype, ctx);
  LOOM_ASSERT(cs.ws.bytes == predicted,
              "cp attention forward ({}) allocated {} bytes of workspace, cp_workspace_bytes "
              "says {}", cp_scheme_name(ctx.scheme), cs.ws.bytes, predicted);
}

void cp_attention_backward(float* dq, float* dk, float* dv, const void* dout, const void* q,
                           const void* k, const void* v, const float* out, const float* lse,
                           DType dtype, const AttentionShape& local, const CpContext& ctx) {
  check_cp_attention(local, dtype, ctx);
  const Geo g = make_geo(local, dtype, ctx);
  CallStats cs(ctx, false);
  backward_call(dq, dk, dv, dout, q, k, v, out, lse, dtype, local, ctx, g, cs);
  const int64_t predicted = cp_workspace_bytes(true, local, dtype, ctx);
  LOOM_ASSERT(cs.ws.bytes == predicted,
              "cp attention backward ({}) allocated {} bytes of workspace, cp_workspace_bytes "
              "says {}", cp_scheme_name(ctx.scheme), cs.ws.bytes, predicted);
}

}  // namespace loom::attention
