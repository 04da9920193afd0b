// tests/dist/attention/test_context_parallel.cpp: cp attention (attention/context_parallel.h)
// under mpirun against single-rank attention on the full sequence.
//
// Glossary: B batch, T global length, G cp size (= world size), Tl = T/G, NH, NKV, HD.
//
// Every rank builds the same full inputs from a fixed seed, computes the single-rank references
// on the full sequence (f32 flash attention, and the float64 naive reference), scatters its own
// rows with the layout and runs cp attention on them. Local inputs are column slices of a fused
// (B, Tl, (NH + 2 NKV) HD) buffer and out has a padded row, so strides are exercised.
//
// Tolerances:
// - f32: max|cp - ref| / max|ref| <= 1e-5 per tensor (the bound), for ref = single-rank
//   f32 flash attention and ref = float64. The cp result differs from single-rank flash only by
//   the order of f32 sums (blocks merged by LSE, partial gradients summed around the ring): a few
//   ulps (~1e-7 relative) at these sizes; an indexing or mask bug gives O(1e-1).
// - bf16 (q, k, v, dout rounded to bf16): error against float64 on the unrounded inputs at most
//   2x that of single-rank bf16 attention on the same rows (flash-attention's rule), plus 1e-6
//   for the f32 reordering above.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "attention/context_parallel.h"
#include "attention/cp_layout.h"
#include "attention/flash_attention.h"
#include "common/op_check.h"
#include "core/error.h"
#include "kernels/ref/attention_ref.h"

namespace loom::attention {
namespace {

constexpr double kF32Rel = 1e-5;

comm::ProcessGroup make_world(int ranks_per_node = 0) {
  comm::GroupOptions o;
  o.timeout_s = 30;  // a hang fails the test well inside ctest's limit
  o.ranks_per_node = ranks_per_node;
  return comm::ProcessGroup::world(o);
}

struct Heads {
  int64_t NH, NKV;
};

// Full-sequence inputs and the two single-rank references.
struct Full {
  int64_t B, T, NH, NKV, HD;
  bool causal;
  std::vector<float> q, k, v, dout;          // (B,T,NH,HD), (B,T,NKV,HD) x2, (B,T,NH,HD)
  std::vector<float> out, lse, dq, dk, dv;  // single-rank flash on the same (possibly rounded) inputs
  std::vector<double> out64, lse64, dq64, dk64, dv64;  // float64 on the unrounded inputs
  float scale() const { return float(1.0 / std::sqrt(double(HD))); }
};

Full make_full(int64_t B, int64_t T, Heads h, int64_t HD, bool causal, bool bf16_inputs) {
  Full f{B, T, h.NH, h.NKV, HD, causal, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int64_t nq = B * T * h.NH * HD, nk = B * T * h.NKV * HD;
  f.q = test::random_normal(nq, 42, 1.0f, 0.0f, 1);
  f.k = test::random_normal(nk, 42, 1.0f, 0.0f, 2);
  f.v = test::random_normal(nk, 42, 1.0f, 0.0f, 3);
  f.dout = test::random_normal(nq, 42, 1.0f, 0.0f, 4);
  kernels::ref::AttentionRefShape rs{B, T, T, h.NH, h.NKV, HD, causal, 0, 0, double(f.scale())};
  f.out64.resize(size_t(nq));
  f.lse64.resize(size_t(B * h.NH * T));
  f.dq64.resize(size_t(nq));
  f.dk64.resize(size_t(nk));
  f.dv64.resize(size_t(nk));
  auto q64 = test::to_f64(f.q), k64 = test::to_f64(f.k), v64 = test::to_f64(f.v),
       do64 = test::to_f64(f.dout);
  kernels::ref::attention_forward_ref(f.out64.data(), f.lse64.data(), q64.data(), k64.data(),
                                      v64.data(), rs);
  kernels::ref::attention_backward_ref(f.dq64.data(), f.dk64.data(), f.dv64.data(), do64.data(),
                                       q64.data(), k64.data(), v64.data(), rs);
  if (bf16_inputs) {  // what a bf16 run really sees
    f.q = test::bf16_round(f.q);
    f.k = test::bf16_round(f.k);
    f.v = test::bf16_round(f.v);
    f.dout = test::bf16_round(f.dout);
  }
  AttentionShape s{B, T, T, h.NH, h.NKV, HD, h.NH * HD, h.NKV * HD, h.NKV * HD, h.NH * HD,
                   causal, 0, 0, f.scale()};
  f.out.resize(size_t(nq));
  f.lse.resize(size_t(B * h.NH * T));
  if (bf16_inputs) {
    auto qb = test::to_bf16(f.q), kb = test::to_bf16(f.k), vb = test::to_bf16(f.v);
    flash_attention_forward_bf16(f.out.data(), f.lse.data(), qb.data(), kb.data(), vb.data(), s);
  } else {
    flash_attention_forward(f.out.data(), f.lse.data(), f.q.data(), f.k.data(), f.v.data(), s);
  }
  std::vector<float> D(size_t(B * h.NH * T));
  attention_backward_preprocess(D.data(), f.dout.data(), f.out.data(), s);
  f.dq.assign(size_t(nq), 0.0f);
  f.dk.assign(size_t(nk), 0.0f);
  f.dv.assign(size_t(nk), 0.0f);
  flash_attention_backward(f.dq.data(), f.dk.data(), f.dv.data(), f.dout.data(), f.q.data(),
                           f.k.data(), f.v.data(), f.lse.data(), D.data(), s);
  return f;
}

struct Case {
  CpLayout layout = CpLayout::zigzag;
  CpScheme scheme = CpScheme::burst;
  CpBackward backward = CpBackward::auto_select;
  int ranks_per_node = 0;
  bool double_ring = false;
  bool overlap = true;
  DType dtype = DType::f32;
  std::string name() const {
    return std::string(cp_layout_name(layout)) + "/" + std::string(cp_scheme_name(scheme)) + "/" +
           std::string(cp_backward_name(backward)) +
           (double_ring ? "/double_L" + std::to_string(ranks_per_node) : "/flat") +
           (overlap ? "" : "/no-overlap") + "/" + std::string(dtype_name(dtype));
  }
};

// This rank's results of one cp forward + backward, as contiguous local tensors.
struct Local {
  std::vector<float> out, lse, dq, dk, dv;  // (B,Tl,NH,HD), (B,NH,Tl), (B,Tl,NH,HD), (B,Tl,NKV,HD) x2
  CpStats stats;
};

Local run_cp(const Full& f, const Case& c, const comm::ProcessGroup& group) {
  const int G = group.size(), r = group.rank();
  const int64_t Tl = f.T / G, B = f.B, NH = f.NH, NKV = f.NKV, HD = f.HD;
  const int64_t W = (NH + 2 * NKV) * HD, OS = NH * HD + 8;  // fused qkv row, padded out row
  // Fused local qkv (B, Tl, W) in f32, from the full tensors' rows of this rank.
  std::vector<float> ql(size_t(B * Tl * NH * HD)), kl(size_t(B * Tl * NKV * HD)), vl(kl.size()),
      dol(ql.size());
  cp_scatter_rows(ql.data(), f.q.data(), B, NH * HD, 4, c.layout, f.T, G, r);
  cp_scatter_rows(kl.data(), f.k.data(), B, NKV * HD, 4, c.layout, f.T, G, r);
  cp_scatter_rows(vl.data(), f.v.data(), B, NKV * HD, 4, c.layout, f.T, G, r);
  cp_scatter_rows(dol.data(), f.dout.data(), B, NH * HD, 4, c.layout, f.T, G, r);
  std::vector<float> qkv(size_t(B * Tl * W)), dout(size_t(B * Tl * OS), 0.0f);
  for (int64_t i = 0; i < B * Tl; ++i) {
    std::copy_n(ql.data() + i * NH * HD, NH * HD, qkv.data() + i * W);
    std::copy_n(kl.data() + i * NKV * HD, NKV * HD, qkv.data() + i * W + NH * HD);
    std::copy_n(vl.data() + i * NKV * HD, NKV * HD, qkv.data() + i * W + (NH + NKV) * HD);
    std::copy_n(dol.data() + i * NH * HD, NH * HD, dout.data() + i * OS);
  }
  std::vector<bf16> qkv_b, dout_b;
  const void *qp = qkv.data(), *kp = qkv.data() + NH * HD, *vp = qkv.data() + (NH + NKV) * HD,
             *dop = dout.data();
  if (c.dtype == DType::bf16) {
    qkv_b = test::to_bf16(qkv);
    dout_b = test::to_bf16(dout);
    qp = qkv_b.data(), kp = qkv_b.data() + NH * HD, vp = qkv_b.data() + (NH + NKV) * HD;
    dop = dout_b.data();
  }
  AttentionShape s{B, Tl, Tl, NH, NKV, HD, W, W, W, OS, f.causal, 0, 0, f.scale()};
  Local res;
  CpContext ctx;
  ctx.group = group;
  ctx.scheme = c.scheme;
  ctx.backward = c.backward;
  ctx.layout = c.layout;
  ctx.overlap = c.overlap;
  ctx.ranks_per_node = c.ranks_per_node;
  ctx.double_ring = c.double_ring;
  ctx.stats = &res.stats;
  // The workspace comes from the caller's pool: its peak is exactly cp_workspace_bytes (which
  // the memory model uses), and all of it is released by the time the call returns.
  MemoryPool pool;
  ctx.pool = &pool;
  std::vector<float> out(size_t(B * Tl * OS), 7.0f), lse(size_t(B * NH * Tl));
  cp_attention_forward(out.data(), lse.data(), qp, kp, vp, c.dtype, s, ctx);
  EXPECT_EQ(pool.current(MemCategory::workspace), 0) << c.name();
  EXPECT_EQ(pool.peak(MemCategory::workspace), cp_workspace_bytes(false, s, c.dtype, ctx)) << c.name();
  EXPECT_EQ(res.stats.peak_workspace_bytes, pool.peak(MemCategory::workspace)) << c.name();
  pool.reset_peaks();
  // Backward accumulates: start the gradients at kPrior and subtract it again below.
  constexpr float kPrior = 0.5f;
  std::vector<float> dqkv(size_t(B * Tl * W), kPrior);
  cp_attention_backward(dqkv.data(), dqkv.data() + NH * HD, dqkv.data() + (NH + NKV) * HD, dop,
                        qp, kp, vp, out.data(), lse.data(), c.dtype, s, ctx);
  EXPECT_EQ(pool.current(MemCategory::workspace), 0) << c.name();
  EXPECT_EQ(pool.peak(MemCategory::workspace), cp_workspace_bytes(true, s, c.dtype, ctx)) << c.name();
  EXPECT_GT(pool.peak(MemCategory::workspace), 0) << c.name();
  res.lse = lse;
  for (float& x : dqkv) x -= kPrior;
  for (int64_t i = 0; i < B * Tl; ++i) {
    EXPECT_EQ(out[size_t(i * OS + NH * HD)], 7.0f) << "out padding overwritten";
    res.out.insert(res.out.end(), out.begin() + i * OS, out.begin() + i * OS + NH * HD);
    res.dq.insert(res.dq.end(), dqkv.begin() + i * W, dqkv.begin() + i * W + NH * HD);
    res.dk.insert(res.dk.end(), dqkv.begin() + i * W + NH * HD,
                  dqkv.begin() + i * W + (NH + NKV) * HD);
    res.dv.insert(res.dv.end(), dqkv.begin() + i * W + (NH + NKV) * HD, dqkv.begin() + (i + 1) * W);
  }
  return res;
}

template <typename T>
std::vector<T> rows_of(const std::vector<T>& full, int64_t outer, int64_t inner, CpLayout l,
                       int64_t TT, int G, int r) {
  std::vector<T> loc(full.size() / size_t(G));
  cp_scatter_rows(loc.data(), full.data(), outer, inner, sizeof(T), l, TT, G, r);
  return loc;
}

// max|a - ref| / max|ref|
template <typename A, typename R>
double rel_err(const std::vector<A>& a, const std::vector<R>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(ref[i]));
    num = std::isnan(d) ? INFINITY : std::max(num, d);
    den = std::max(den, std::abs(double(ref[i])));
  }
  return num / den;
}

struct Errors {
  double e[5];  // out, lse, dq, dk, dv
};
const char* kNames[5] = {"out", "lse", "dq", "dk", "dv"};

template <typename R>
Errors errors(const Local& L, const std::vector<R>* refs[5], const Full& f, CpLayout l, int G,
              int r) {
  const int64_t outer[5] = {f.B, f.B * f.NH, f.B, f.B, f.B};
  const int64_t inner[5] = {f.NH * f.HD, 1, f.NH * f.HD, f.NKV * f.HD, f.NKV * f.HD};
  const std::vector<float>* got[5] = {&L.out, &L.lse, &L.dq, &L.dk, &L.dv};
  Errors e{};
  for (int i = 0; i < 5; ++i)
    e.e[i] = rel_err(*got[i], rows_of(*refs[i], outer[i], inner[i], l, f.T, G, r));
  return e;
}

// Worst relative errors seen by expect_f32_exact (printed by rank 0 at the end of a test).
struct Worst {
  double vs_flash = 0, vs_f64 = 0;
  int cases = 0;
  void print(const comm::ProcessGroup& g, const char* what) {
    if (g.rank() == 0)
      std::printf("[cp] G=%d %s: %d cases, worst rel err vs single-rank flash %.2e, vs float64 %.2e\n",
                  g.size(), what, cases, vs_flash, vs_f64);
    *this = Worst{};
  }
};
Worst g_worst;

void expect_f32_exact(const Full& f, const Case& c, const comm::ProcessGroup& g) {
  SCOPED_TRACE(c.name() + (f.causal ? " causal" : " full") + " NH" + std::to_string(f.NH) +
               " NKV" + std::to_string(f.NKV) + " T" + std::to_string(f.T));
  Local L = run_cp(f, c, g);
  const std::vector<float>* r32[5] = {&f.out, &f.lse, &f.dq, &f.dk, &f.dv};
  const std::vector<double>* r64[5] = {&f.out64, &f.lse64, &f.dq64, &f.dk64, &f.dv64};
  Errors a = errors(L, r32, f, c.layout, g.size(), g.rank());
  Errors b = errors(L, r64, f, c.layout, g.size(), g.rank());
  for (int i = 0; i < 5; ++i) {
    EXPECT_LE(a.e[i], kF32Rel) << kNames[i] << " vs single-rank flash";
    EXPECT_LE(b.e[i], kF32Rel) << kNames[i] << " vs float64";
    g_worst.vs_flash = std::max(g_worst.vs_flash, a.e[i]);
    g_worst.vs_f64 = std::max(g_worst.vs_f64, b.e[i]);
  }
  g_worst.cases += 1;
}

const Heads kMha{4, 4}, kGqa{4, 1};  // GQA: 4 query heads per kv head

// Topologies to run for this world size: flat, and emulated (N nodes x L) double rings.
std::vector<std::pair<bool, int>> topologies(int G) {
  std::vector<std::pair<bool, int>> t = {{false, 0}};
  if (G == 2 || G == 3) t.push_back({true, 1});  // N = G nodes of 1: the outer ring alone
  if (G == 4) t.push_back({true, 2});            // 2 x 2
  if (G == 8) t.push_back({true, 4}), t.push_back({true, 2});  // 2 x 4 and 4 x 2
  return t;
}

TEST(ContextParallel, RingSchemesMatchSingleRankF32) {
  comm::ProcessGroup world = make_world();
  const int G = world.size();
  const int64_t T = 2 * G * 5, B = 2, HD = 16;  // zigzag chunks of 5 rows
  for (bool causal : {true, false})
    for (Heads h : {kMha, kGqa}) {
      Full f = make_full(B, T, h, HD, causal, false);
      for (CpLayout l : {CpLayout::zigzag, CpLayout::striped, CpLayout::contiguous})
        for (CpBackward bw : {CpBackward::burst, CpBackward::ring})
          for (auto [dbl, L] : topologies(G)) {
            Case c;
            c.layout = l;
            c.backward = bw;
            c.double_ring = dbl;
            c.ranks_per_node = L;
            expect_f32_exact(f, c, world);
          }
    }
  g_worst.print(world, "ring schemes f32");
}

TEST(ContextParallel, BaselinesMatchSingleRankF32) {
  comm::ProcessGroup world = make_world();
  const int G = world.size();
  const int64_t T = 2 * G * 3, B = 2, HD = 13;  // odd head dim
  for (bool causal : {true, false})
    for (int gqa : {1, 4}) {
      // Ulysses needs G | NKV: NKV = G kv heads, NH = gqa * G.
      Full f = make_full(B, T, Heads{gqa * G, G}, HD, causal, false);
      for (CpLayout l : {CpLayout::zigzag, CpLayout::striped})
        for (CpScheme s : {CpScheme::allgather, CpScheme::ulysses, CpScheme::ring}) {
          Case c;
          c.layout = l;
          c.scheme = s;
          expect_f32_exact(f, c, world);
        }
    }
  g_worst.print(world, "allgather/ulysses/ring f32");
}

TEST(ContextParallel, DoubleRingFromGroupNodeInfo) {
  const int G = comm::ProcessGroup::world().size();
  if (G % 2 != 0 || G < 4) GTEST_SKIP() << "SKIP: needs an even world of >= 4 ranks, have " << G;
  comm::ProcessGroup world = make_world(2);  // emulated nodes of 2 ranks
  ASSERT_EQ(world.num_nodes(), G / 2);
  Full f = make_full(1, 2 * G * 4, kMha, 16, true, false);
  for (CpBackward bw : {CpBackward::burst, CpBackward::ring}) {
    Case c;
    c.backward = bw;
    c.double_ring = true;  // ranks_per_node = 0: from the group
    expect_f32_exact(f, c, world);
  }
  g_worst.print(world, "double ring from group node info");
}

// Messages of 32 KiB and up (Tl = 32 rows x 4 heads x 64 x 4 bytes) go by rendezvous, so a send
// completes only once its receive is posted: a schedule in which every rank waits on its send
// before posting the receive its predecessor needs would hang here (and time out) instead of
// passing on eager buffering.
TEST(ContextParallel, OverlapOffAndRepeatsAreBitIdentical) {
  comm::ProcessGroup world = make_world();
  const int G = world.size();
  Full f = make_full(1, 2 * G * 16, kMha, 64, true, false);
  for (CpBackward bw : {CpBackward::burst, CpBackward::ring})
    for (auto [dbl, L] : topologies(G)) {
      Case c;
      c.backward = bw, c.double_ring = dbl, c.ranks_per_node = L;
      SCOPED_TRACE(c.name());
      Local a = run_cp(f, c, world), b = run_cp(f, c, world);
      c.overlap = false;
      Local d = run_cp(f, c, world);
      for (const Local* x : {&b, &d}) {
        EXPECT_EQ(a.out, x->out);
        EXPECT_EQ(a.lse, x->lse);
        EXPECT_EQ(a.dq, x->dq);
        EXPECT_EQ(a.dk, x->dk);
        EXPECT_EQ(a.dv, x->dv);
      }
    }
}

// bf16: cp error vs float64 at most 2x single-rank bf16 attention's on the same rows.
TEST(ContextParallel, Bf16WithinTwiceSingleRankError) {
  comm::ProcessGroup world = make_world();
  const int G = world.size(), r = world.rank();
  const int64_t T = 2 * G * 8, B = 1, HD = 32;
  for (Heads h : {Heads{G, G}, Heads{4 * G, G}}) {
    Full f = make_full(B, T, h, HD, true, true);
    const std::vector<float>* r32[5] = {&f.out, &f.lse, &f.dq, &f.dk, &f.dv};
    const std::vector<double>* r64[5] = {&f.out64, &f.lse64, &f.dq64, &f.dk64, &f.dv64};
    std::vector<Case> cases;
    for (CpBackward bw : {CpBackward::burst, CpBackward::ring})
      for (auto [dbl, L] : topologies(G)) {
        Case c;
        c.backward = bw, c.double_ring = dbl, c.ranks_per_node = L, c.dtype = DType::bf16;
        cases.push_back(c);
      }
    for (CpScheme s : {CpScheme::allgather, CpScheme::ulysses}) {
      Case c;
      c.scheme = s, c.dtype = DType::bf16;
      cases.push_back(c);
    }
    for (const Case& c : cases) {
      SCOPED_TRACE(c.name() + " NH" + std::to_string(h.NH) + " NKV" + std::to_string(h.NKV));
      Local L = run_cp(f, c, world);
      // Single-rank bf16's own rows, against float64: errors(...) with its full tensors as "got".
      Local single;
      const int64_t outer[5] = {B, B * h.NH, B, B, B};
      const int64_t inner[5] = {h.NH * HD, 1, h.NH * HD, h.NKV * HD, h.NKV * HD};
      std::vector<float>* dst[5] = {&single.out, &single.lse, &single.dq, &single.dk, &single.dv};
      for (int i = 0; i < 5; ++i) *dst[i] = rows_of(*r32[i], outer[i], inner[i], c.layout, T, G, r);
      Errors cp = errors(L, r64, f, c.layout, G, r), one = errors(single, r64, f, c.layout, G, r);
      if (r == 0)
        std::printf("[cp] G=%d bf16 %s NH%lld NKV%lld: rel err vs f64 cp/single out %.2e/%.2e "
                    "dq %.2e/%.2e dk %.2e/%.2e\n", G, c.name().c_str(), (long long)h.NH,
                    (long long)h.NKV, cp.e[0], one.e[0], cp.e[2], one.e[2], cp.e[3], one.e[3]);
      for (int i = 0; i < 5; ++i)
        EXPECT_LE(cp.e[i], 2 * one.e[i] + 1e-6)
            << kNames[i] << ": cp " << cp.e[i] << " single-rank bf16 " << one.e[i];
    }
  }
}

// The long-sequence check: at T = 32768 the bf16 error of cp attention against float64
// does not grow with G. A full float64 reference is O(T^2) per tensor (~1e11 operations here),
// so the check is made on two blocks of 64 query rows, the middle and the last of the sequence
// (the last sees every key), whose out, lse and dq depend only on their own rows: float64 on
// the unrounded inputs, single-rank bf16 attention (the widened kernel on the rounded inputs,
// called on those rows against every key they see) and the cp result (zigzag, Burst, f32 state),
// gathered from the ranks that hold the rows. One head of 64, causal. dk and dv of a key row need
// every query row that sees it; for the last 64 key rows those are exactly the last block's 64
// query rows, so dk and dv are checked on those key rows. The cp error must stay within 1.1x the
// single-rank error: they differ by the f32 merges of the ring (~1e-7 relative), far below the
// bf16 roundings (~1e-3).
TEST(ContextParallel, Bf16ErrorDoesNotGrowWithGAt32K) {
  comm::ProcessGroup world = make_world();
  const int G = world.size(), r = world.rank();
  const int64_t T = 32768, B = 1, HD = 64, kRows = 64;
  if (T % (2 * G) != 0) GTEST_SKIP() << "SKIP: zigzag needs 2G = " << 2 * G << " to divide T";
  const int64_t blocks[2] = {T / 2, T - kRows};  // first global row of each sampled block
  Full f{B, T, 1, 1, HD, true, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::vector<float> q = test::random_normal(T * HD, 77, 1.0f, 0.0f, 1),
                           k = test::random_normal(T * HD, 77, 1.0f, 0.0f, 2),
                           v = test::random_normal(T * HD, 77, 1.0f, 0.0f, 3),
                           dout = test::random_normal(T * HD, 77, 1.0f, 0.0f, 4);
  f.q = test::bf16_round(q), f.k = test::bf16_round(k), f.v = test::bf16_round(v);
  f.dout = test::bf16_round(dout);
  Case c;
  c.dtype = DType::bf16;
  const Local L = run_cp(f, c, world);
  // The sampled rows' cp values, (2 x 64) rows of out | dq | lse, summed over the ranks (each
  // row comes from the one rank that holds it).
  const int64_t W = 2 * HD + 1, Tl = T / G;
  std::vector<double> got(size_t(2 * kRows * W), 0.0), got_kv(size_t(kRows * 2 * HD), 0.0);
  for (int64_t i = 0; i < Tl; ++i) {
    const int64_t p = cp_global_position(c.layout, T, G, r, i);
    for (int blk = 0; blk < 2; ++blk) {
      if (p < blocks[blk] || p >= blocks[blk] + kRows) continue;
      double* row = got.data() + (blk * kRows + p - blocks[blk]) * W;
      for (int64_t d = 0; d < HD; ++d) {
        row[d] = L.out[size_t(i * HD + d)];
        row[HD + d] = L.dq[size_t(i * HD + d)];
      }
      row[2 * HD] = L.lse[size_t(i)];
    }
    if (p >= T - kRows) {  // dk | dv of the last key rows
      double* row = got_kv.data() + (p - (T - kRows)) * 2 * HD;
      for (int64_t d = 0; d < HD; ++d) {
        row[d] = L.dk[size_t(i * HD + d)];
        row[HD + d] = L.dv[size_t(i * HD + d)];
      }
    }
  }
  world.all_reduce(comm::BufferRef(got.data(), int64_t(got.size()), DType::f64)).wait();
  world.all_reduce(comm::BufferRef(got_kv.data(), int64_t(got_kv.size()), DType::f64)).wait();
  if (r != 0) return;
  const float scale = f.scale();
  std::vector<double> exact(got.size()), single(got.size()), exact_kv(got_kv.size()),
      single_kv(got_kv.size());
  for (int blk = 0; blk < 2; ++blk) {
    const int64_t i0 = blocks[blk], Tk = i0 + kRows;  // the keys these rows see
    // float64 on the unrounded inputs.
    kernels::ref::AttentionRefShape rs{B, kRows, Tk, 1, 1, HD, true, i0, 0, double(scale)};
    auto q64 = test::to_f64(std::vector<float>(q.begin() + i0 * HD, q.begin() + Tk * HD));
    auto do64 = test::to_f64(std::vector<float>(dout.begin() + i0 * HD, dout.begin() + Tk * HD));
    auto k64 = test::to_f64(std::vector<float>(k.begin(), k.begin() + Tk * HD));
    auto v64 = test::to_f64(std::vector<float>(v.begin(), v.begin() + Tk * HD));
    std::vector<double> o64(size_t(kRows * HD)), l64(static_cast<size_t>(kRows)), dq64(o64.size()),
        dk64(size_t(Tk * HD)), dv64(dk64.size());
    kernels::ref::attention_forward_ref(o64.data(), l64.data(), q64.data(), k64.data(),
                                        v64.data(), rs);
    kernels::ref::attention_backward_ref(dq64.data(), dk64.data(), dv64.data(), do64.data(),
                                         q64.data(), k64.data(), v64.data(), rs);
    // Single-rank bf16: the widened kernel on the rounded inputs (as make_full's references).
    AttentionShape s{B, kRows, Tk, 1, 1, HD, HD, HD, HD, HD, true, i0, 0, scale};
    auto qb = test::to_bf16(std::vector<float>(f.q.begin() + i0 * HD, f.q.begin() + Tk * HD));
    auto kb = test::to_bf16(std::vector<float>(f.k.begin(), f.k.begin() + Tk * HD));
    auto vb = test::to_bf16(std::vector<float>(f.v.begin(), f.v.begin() + Tk * HD));
    std::vector<float> o(size_t(kRows * HD)), l(static_cast<size_t>(kRows)), D(static_cast<size_t>(kRows)),
        dq(o.size(), 0.0f), dk(size_t(Tk * HD), 0.0f), dv(dk.size(), 0.0f);
    flash_attention_forward_bf16(o.data(), l.data(), qb.data(), kb.data(), vb.data(), s);
    const float* go = f.dout.data() + i0 * HD;
    attention_backward_preprocess(D.data(), go, o.data(), s);
    flash_attention_backward(dq.data(), dk.data(), dv.data(), go, f.q.data() + i0 * HD,
                             f.k.data(), f.v.data(), l.data(), D.data(), s);
    for (int64_t i = 0; i < kRows; ++i) {
      double* e = exact.data() + (blk * kRows + i) * W;
      double* g = single.data() + (blk * kRows + i) * W;
      for (int64_t d = 0; d < HD; ++d) {
        e[d] = o64[size_t(i * HD + d)], e[HD + d] = dq64[size_t(i * HD + d)];
        g[d] = o[size_t(i * HD + d)], g[HD + d] = dq[size_t(i * HD + d)];
      }
      e[2 * HD] = l64[size_t(i)], g[2 * HD] = l[size_t(i)];
    }
    if (blk == 1)  // keys [T - 64, T): only these 64 query rows see them
      for (int64_t j = 0; j < kRows; ++j)
        for (int64_t d = 0; d < HD; ++d) {
          const size_t src = size_t((T - kRows + j) * HD + d), dst = size_t(j * 2 * HD + d);
          exact_kv[dst] = dk64[src], exact_kv[dst + HD] = dv64[src];
          single_kv[dst] = dk[src], single_kv[dst + HD] = dv[src];
        }
  }
  // Relative errors per quantity (out: columns [0, HD), dq: [HD, 2HD), lse: column 2HD).
  // (dk: columns [0, HD) of the kv rows, dv: [HD, 2HD).)
  auto err = [&](const std::vector<double>& a, const std::vector<double>& ref, int64_t width,
                 int64_t c0, int64_t c1) {
    double num = 0, den = 0;
    for (int64_t row = 0; row < int64_t(ref.size()) / width; ++row)
      for (int64_t col = c0; col < c1; ++col) {
        const double x = a[size_t(row * width + col)], y = ref[size_t(row * width + col)];
        num = std::isnan(x) ? INFINITY : std::max(num, std::abs(x - y));
        den = std::max(den, std::abs(y));
      }
    return num / den;
  };
  const char* names[5] = {"out", "dq", "lse", "dk", "dv"};
  const int64_t cols[4] = {0, HD, 2 * HD, 2 * HD + 1};
  for (int i = 0; i < 5; ++i) {
    const bool kv = i >= 3;
    const int64_t c0 = kv ? (i == 3 ? 0 : HD) : cols[i], c1 = kv ? c0 + HD : cols[i + 1];
    const double e_cp = kv ? err(got_kv, exact_kv, 2 * HD, c0, c1) : err(got, exact, W, c0, c1);
    const double e_one =
        kv ? err(single_kv, exact_kv, 2 * HD, c0, c1) : err(single, exact, W, c0, c1);
    std::printf("[cp] T=%lld G=%d bf16 %s: rel err vs float64 cp %.3e, single-rank %.3e\n",
                (long long)T, G, names[i], e_cp, e_one);
    EXPECT_LE(e_cp, 1.1 * e_one + 1e-7) << names[i];
    EXPECT_GT(e_one, 1e-5) << names[i] << ": bf16 rounding should show (inputs not rounded?)";
  }
}

// Bytes by the group counters against the closed forms of context_parallel.h.
TEST(ContextParallel, BytesMatchClosedForms) {
  comm::ProcessGroup world = make_world();
  const int G = world.size();
  const int64_t T = 2 * G * 4, B = 1, HD = 64;
  Full mha = make_full(B, T, Heads{4, 4}, HD, true, false);
  int64_t ring_bwd = 0, burst_bwd = 0;
  for (CpBackward bw : {CpBackward::burst, CpBackward::ring})
    for (auto [dbl, L] : topologies(G)) {
      Case c;
      c.backward = bw, c.double_ring = dbl, c.ranks_per_node = L;
      SCOPED_TRACE(c.name());
      Local res = run_cp(mha, c, world);
      EXPECT_EQ(res.stats.forward_bytes_sent, cp_forward_bytes(B, T, G, 4, HD, DType::f32));
      // forward: 2*T*H_kv*d*(G-1)/G elements (K and V together), 4 bytes each.
      EXPECT_EQ(res.stats.forward_bytes_sent, 2 * T * 4 * HD * (G - 1) / G * 4);
      const int64_t closed = cp_backward_bytes(bw, B, T, G, 4, 4, HD, DType::f32);
      EXPECT_LE(std::abs(double(res.stats.backward_bytes_sent - closed)), 0.02 * double(closed));
      EXPECT_EQ(res.stats.last_backward, bw);
      (bw == CpBackward::burst ? burst_bwd : ring_bwd) = res.stats.backward_bytes_sent;
    }
  // MHA: Burst <= 0.78 x ring ((12 d + 8) / 16 d = 0.758 at d = 64).
  EXPECT_LE(double(burst_bwd), 0.78 * double(ring_bwd));
  if (world.rank() == 0)
    std::printf("[cp] G=%d T=%lld NH=NKV=4 HD=%lld f32 bytes/rank: fwd %lld (closed %lld), burst "
                "bwd %lld (closed %lld), ring bwd %lld (closed %lld), burst/ring %.4f\n", G,
                (long long)T, (long long)HD, (long long)cp_forward_bytes(B, T, G, 4, HD, DType::f32),
                (long long)cp_forward_bytes(B, T, G, 4, HD, DType::f32), (long long)burst_bwd,
                (long long)cp_backward_bytes(CpBackward::burst, B, T, G, 4, 4, HD, DType::f32),
                (long long)ring_bwd,
                (long long)cp_backward_bytes(CpBackward::ring, B, T, G, 4, 4, HD, DType::f32),
                double(burst_bwd) / double(ring_bwd));
  EXPECT_EQ(choose_cp_backward(4, 4, HD, DType::f32), CpBackward::burst);
  EXPECT_EQ(choose_cp_backward(4, 4, HD, DType::bf16), CpBackward::burst);
  // GQA with 8 query heads per kv head: the per-layer choice runs the ring.
  Full gqa = make_full(B, T, Heads{8, 1}, HD, true, false);
  Case c;  // scheme burst, backward auto
  Local res = run_cp(gqa, c, world);
  EXPECT_EQ(res.stats.last_backward, CpBackward::ring);
  EXPECT_EQ(res.stats.backward_bytes_sent, cp_backward_bytes(CpBackward::ring, B, T, G, 8, 1, HD, DType::f32));
  EXPECT_EQ(choose_cp_backward(8, 1, HD, DType::bf16), CpBackward::ring);
  // Baselines: all-gather moves the ring's bytes; Ulysses its all_to_all closed form.
  Full base = make_full(B, T, Heads{2 * G, G}, HD, true, false);
  for (CpScheme s : {CpScheme::allgather, CpScheme::ulysses})
    for (DType dt : {DType::f32, DType::bf16}) {
      Case cb;
      cb.scheme = s, cb.dtype = dt;
      SCOPED_TRACE(cb.name());
      Local rb = run_cp(base, cb, world);
      if (s == CpScheme::allgather) {
        EXPECT_EQ(rb.stats.forward_bytes_sent, cp_forward_bytes(B, T, G, G, HD, dt));
        EXPECT_EQ(rb.stats.backward_bytes_sent,
                  cp_backward_bytes(CpBackward::ring, B, T, G, 2 * G, G, HD, dt));
      } else {
        EXPECT_EQ(rb.stats.forward_bytes_sent, cp_ulysses_bytes(false, B, T, G, 2 * G, G, HD, dt));
        EXPECT_EQ(rb.stats.backward_bytes_sent, cp_ulysses_bytes(true, B, T, G, 2 * G, G, HD, dt));
      }
    }
  EXPECT_EQ(choose_cp_backward(32, 8, 128, DType::bf16), CpBackward::ring);
}

TEST(ContextParallel, BadInputNamesValues) {
  comm::ProcessGroup world = make_world();
  const int G = world.size();
  const int64_t Tl = 5, HD = 8;  // T = 5G: not divisible by 2G
  std::vector<float> buf(size_t(64 * Tl * 8 * HD)), lse(size_t(64 * Tl));
  AttentionShape s{1, Tl, Tl, 2, 1, HD, 2 * HD, HD, HD, 2 * HD, true, 0, 0, 0.3f};
  CpContext ctx;
  ctx.group = world;
  try {
    cp_attention_forward(buf.data(), lse.data(), buf.data(), buf.data(), buf.data(), DType::f32, s, ctx);
    ADD_FAILURE() << "zigzag with T=5*cp accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cp=" + std::to_string(G)), std::string::npos) << m;
    EXPECT_NE(m.find("T=" + std::to_string(5 * G)), std::string::npos) << m;
    EXPECT_NE(m.find("divisible by " + std::to_string(2 * G)), std::string::npos) << m;
  }
  ctx.layout = CpLayout::striped;  // T = 5G is fine striped; Ulysses with NKV = 1 < G is not
  ctx.scheme = CpScheme::ulysses;
  try {
    cp_attention_forward(buf.data(), lse.data(), buf.data(), buf.data(), buf.data(), DType::f32, s, ctx);
    ADD_FAILURE() << "ulysses with NKV=1 accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("n_kv_heads=1"), std::string::npos) << m;
    EXPECT_NE(m.find("cp in {1}"), std::string::npos) << m;
  }
  ctx.scheme = CpScheme::burst;
  ctx.double_ring = true;
  ctx.ranks_per_node = G + 1;
  EXPECT_THROW(cp_attention_forward(buf.data(), lse.data(), buf.data(), buf.data(), buf.data(),
                                    DType::f32, s, ctx),
               Error);
  // The group still works after the rejected calls (nothing was sent).
  int64_t v = 1;
  world.all_reduce(comm::BufferRef(&v, 1, DType::i64)).wait();
  EXPECT_EQ(v, G);
}

}  // namespace
}  // namespace loom::attention
