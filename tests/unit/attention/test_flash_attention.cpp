// Tests for attention/flash_attention.h against the float64 reference (kernels/ref/attention_ref.h).
//
// Glossary: B batch, Tq/Tk query/key length, NH query heads, NKV kv heads, HD head dim.
//
// Tolerances: the kernel accumulates in f32 over at most Tk (<= 130 here) terms of O(1) size, so
// its relative error per output is ~sqrt(Tk) * 6e-8 ~ 1e-6, an NMSE of ~1e-12. We allow 1e-9
// (values) and 1e-8 (gradients, which sum over one more axis and subtract D): loose enough for
// any correct f32 summation order, six orders of magnitude below what an indexing or masking bug
// gives (NMSE ~ 1e-3 .. 1).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "attention/flash_attention.h"
#include "common/op_check.h"
#include "core/error.h"
#include "kernels/ref/attention_ref.h"

namespace loom::attention {
namespace {

using kernels::ref::AttentionRefShape;
using test::GuardedBuffer;

constexpr double kValueNmse = 1e-9;
constexpr double kGradNmse = 1e-8;

struct Case {
  int64_t B, Tq, Tk, NH, NKV, HD;
  bool causal;
  int64_t q_offset = 0, k_offset = 0;
  std::string name() const {
    return "B" + std::to_string(B) + "_Tq" + std::to_string(Tq) + "_Tk" + std::to_string(Tk) +
           "_NH" + std::to_string(NH) + "_NKV" + std::to_string(NKV) + "_HD" + std::to_string(HD) +
           (causal ? "_causal" : "_full") + "_qo" + std::to_string(q_offset) + "_ko" +
           std::to_string(k_offset);
  }
};

// gtest prints a failing parameter by name instead of its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

// Contiguous inputs of one case plus the fused-buffer variant.
struct Problem {
  Case c;
  std::vector<float> q, k, v, dout;  // contiguous: (B,Tq,NH,HD), (B,Tk,NKV,HD) x2, (B,Tq,NH,HD)
  explicit Problem(const Case& cs, uint64_t seed = 1) : c(cs) {
    q = test::random_normal(nq(), seed, 1.0f, 0.0f, 1);
    k = test::random_normal(nk(), seed, 1.0f, 0.0f, 2);
    v = test::random_normal(nk(), seed, 1.0f, 0.0f, 3);
    dout = test::random_normal(nq(), seed, 1.0f, 0.0f, 4);
  }
  int64_t nq() const { return c.B * c.Tq * c.NH * c.HD; }
  int64_t nk() const { return c.B * c.Tk * c.NKV * c.HD; }
  int64_t nlse() const { return c.B * c.NH * c.Tq; }
  AttentionShape shape() const {
    AttentionShape s{c.B, c.Tq, c.Tk, c.NH, c.NKV, c.HD, c.NH * c.HD, c.NKV * c.HD, c.NKV * c.HD,
                     c.NH * c.HD, c.causal, c.q_offset, c.k_offset,
                     float(1.0 / std::sqrt(double(c.HD)))};
    return s;
  }
  AttentionRefShape ref_shape() const {
    return AttentionRefShape{c.B,      c.Tq,       c.Tk,       c.NH,
                             c.NKV,    c.HD,       c.causal,   c.q_offset,
                             c.k_offset, double(shape().scale)};
  }
};

struct RefResult {
  std::vector<double> out, lse, dq, dk, dv;
};
RefResult reference(const Problem& p) {
  RefResult r;
  r.out.resize(size_t(p.nq()));
  r.lse.resize(size_t(p.nlse()));
  r.dq.resize(size_t(p.nq()));
  r.dk.resize(size_t(p.nk()));
  r.dv.resize(size_t(p.nk()));
  auto q = test::to_f64(p.q), k = test::to_f64(p.k), v = test::to_f64(p.v),
       g = test::to_f64(p.dout);
  kernels::ref::attention_forward_ref(r.out.data(), r.lse.data(), q.data(), k.data(), v.data(),
                                      p.ref_shape());
  kernels::ref::attention_backward_ref(r.dq.data(), r.dk.data(), r.dv.data(), g.data(), q.data(),
                                       k.data(), v.data(), p.ref_shape());
  return r;
}

// lse with -inf entries: both -inf at the same places, finite elsewhere and close.
void expect_lse_close(const float* lse, const std::vector<double>& ref, double tol) {
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      ASSERT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "lse[" << i << "]=" << lse[i];
    } else {
      ASSERT_TRUE(std::isfinite(lse[i])) << "lse[" << i << "]=" << lse[i];
      ASSERT_NEAR(lse[i], ref[i], tol) << "lse[" << i << "]";
    }
  }
}

// Contiguous forward + backward through the kernel, with guard bytes around every output.
struct KernelResult {
  std::vector<float> out, lse, D, dq, dk, dv;
};
KernelResult run_kernel(const Problem& p) {
  const AttentionShape s = p.shape();
  GuardedBuffer<float> out(p.nq()), lse(p.nlse()), D(p.nlse()), dq(p.nq(), 0.0f),
      dk(p.nk(), 0.0f), dv(p.nk(), 0.0f);
  flash_attention_forward(out.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), s);
  attention_backward_preprocess(D.data(), p.dout.data(), out.data(), s);
  flash_attention_backward(dq.data(), dk.data(), dv.data(), p.dout.data(), p.q.data(),
                           p.k.data(), p.v.data(), lse.data(), D.data(), s);
  EXPECT_TRUE(out.guards_intact() && lse.guards_intact() && D.guards_intact());
  EXPECT_TRUE(dq.guards_intact() && dk.guards_intact() && dv.guards_intact());
  return {out.vec(), lse.vec(), D.vec(), dq.vec(), dk.vec(), dv.vec()};
}

// ---------------------------------------------------------------------------------------------
// The reference's gradients against float64 central finite differences.

TEST(AttentionRef, GradientsMatchFiniteDifferences) {
  // Small, odd, GQA, causal with offsets so some rows see no key and some keys no query.
  for (const Case& c : {Case{1, 5, 7, 4, 2, 3, true, 2, 0}, Case{2, 3, 4, 2, 1, 5, false},
                       Case{1, 6, 5, 3, 3, 4, true, 0, 2}}) {
    SCOPED_TRACE(c.name());
    Problem p(c, 7);
    RefResult r = reference(p);
    auto q = test::to_f64(p.q), k = test::to_f64(p.k), v = test::to_f64(p.v),
         g = test::to_f64(p.dout);
    const AttentionRefShape rs = p.ref_shape();
    // L = sum(dout * out): its gradient is exactly what attention_backward_ref returns.
    auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk,
                    const std::vector<double>& vv) {
      std::vector<double> out(size_t(p.nq()));
      kernels::ref::attention_forward_ref(out.data(), nullptr, qq.data(), kk.data(), vv.data(),
                                          rs);
      return test::dot(out, g);
    };
    auto fq = test::fd_gradient([&](const std::vector<double>& x) { return loss(x, k, v); }, q);
    auto fk = test::fd_gradient([&](const std::vector<double>& x) { return loss(q, x, v); }, k);
    auto fv = test::fd_gradient([&](const std::vector<double>& x) { return loss(q, k, x); }, v);
    // Central differences with h = 1e-6 on O(1) smooth functions are accurate to ~1e-9.
    for (size_t i = 0; i < fq.size(); ++i) EXPECT_NEAR(r.dq[i], fq[i], 1e-7) << "dq " << i;
    for (size_t i = 0; i < fk.size(); ++i) EXPECT_NEAR(r.dk[i], fk[i], 1e-7) << "dk " << i;
    for (size_t i = 0; i < fv.size(); ++i) EXPECT_NEAR(r.dv[i], fv[i], 1e-7) << "dv " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel against the reference over odd shapes.

class FlashVsRef : public ::testing::TestWithParam<Case> {};

TEST_P(FlashVsRef, ForwardAndBackward) {
  Problem p(GetParam());
  RefResult r = reference(p);
  KernelResult kr = run_kernel(p);
  ASSERT_TRUE(test::all_finite(kr.out));
  EXPECT_LT(test::nmse(kr.out, r.out), kValueNmse);
  // lse = m + log(l): absolute error ~ f32 eps * |lse| (|lse| <= ~10 here).
  expect_lse_close(kr.lse.data(), r.lse, 1e-5);
  ASSERT_TRUE(test::all_finite(kr.dq) && test::all_finite(kr.dk) && test::all_finite(kr.dv));
  EXPECT_LT(test::nmse(kr.dq, r.dq), kGradNmse);
  EXPECT_LT(test::nmse(kr.dk, r.dk), kGradNmse);
  EXPECT_LT(test::nmse(kr.dv, r.dv), kGradNmse);
  // Rows with no visible key: exactly zero output and lse = -inf (checked above).
  for (int64_t b = 0; b < p.c.B; ++b)
    for (int64_t h = 0; h < p.c.NH; ++h)
      for (int64_t i = 0; i < p.c.Tq; ++i)
        if (std::isinf(r.lse[size_t((b * p.c.NH + h) * p.c.Tq + i)]))
          for (int64_t d = 0; d < p.c.HD; ++d) {
            const size_t idx = size_t(((b * p.c.Tq + i) * p.c.NH + h) * p.c.HD + d);
            ASSERT_EQ(kr.out[idx], 0.0f);
            ASSERT_EQ(kr.dq[idx], 0.0f);
          }
}

std::vector<Case> odd_cases() {
  std::vector<Case> cs;
  for (int64_t T : {1, 5, 13, 127, 130})
    for (bool causal : {false, true}) cs.push_back(Case{1, T, T, 2, 2, 64, causal});
  for (int64_t HD : {8, 80}) cs.push_back(Case{2, 13, 13, 2, 1, HD, true});
  // GQA: 6 query heads over 2 or 1 kv heads.
  cs.push_back(Case{1, 70, 70, 6, 2, 16, true});
  cs.push_back(Case{2, 33, 33, 6, 1, 8, false});
  // Tq != Tk with offsets (a block of a longer causal sequence).
  cs.push_back(Case{1, 70, 130, 2, 1, 16, true, 100, 0});   // queries after the keys start
  cs.push_back(Case{1, 130, 67, 2, 2, 16, true, 0, 65});    // first 65 queries see no key
  cs.push_back(Case{1, 5, 13, 2, 1, 8, true, 3, 7});        // a few rows see nothing
  cs.push_back(Case{1, 64, 64, 1, 1, 16, true, 0, 64});     // every row sees nothing
  cs.push_back(Case{1, 67, 129, 3, 1, 80, false, 0, 0});    // non-causal rectangle
  return cs;
}
INSTANTIATE_TEST_SUITE_P(Shapes, FlashVsRef, ::testing::ValuesIn(odd_cases()),
                         [](const auto& info) { return info.param.name(); });

// ---------------------------------------------------------------------------------------------
// q/k/v as column slices of one fused qkv buffer, out with a wider stride: the kernel must read
// only its slice and write only (B, T, NH, HD) of out, never the gaps.

TEST(FlashAttention, StridedFusedBuffersAndGaps) {
  const Case c{2, 37, 37, 6, 2, 16, true};
  Problem p(c, 3);
  RefResult r = reference(p);
  const int64_t qw = c.NH * c.HD, kw = c.NKV * c.HD, fused = qw + 2 * kw, ostride = qw + 5;
  std::vector<float> qkv(size_t(c.B * c.Tq * fused));  // (B, T, (NH + 2 NKV) HD)
  std::vector<float> g(size_t(c.B * c.Tq * ostride));   // dout (B, T, o_stride)
  for (int64_t t = 0; t < c.B * c.Tq; ++t) {
    std::memcpy(&qkv[size_t(t * fused)], &p.q[size_t(t * qw)], size_t(qw) * 4);
    std::memcpy(&qkv[size_t(t * fused + qw)], &p.k[size_t(t * kw)], size_t(kw) * 4);
    std::memcpy(&qkv[size_t(t * fused + qw + kw)], &p.v[size_t(t * kw)], size_t(kw) * 4);
    std::memcpy(&g[size_t(t * ostride)], &p.dout[size_t(t * qw)], size_t(qw) * 4);
  }
  AttentionShape s = p.shape();
  s.q_stride = s.k_stride = s.v_stride = fused;
  s.o_stride = ostride;
  const float kGap = 12345.0f;
  GuardedBuffer<float> out(c.B * c.Tq * ostride, kGap), lse(p.nlse()), D(p.nlse());
  GuardedBuffer<float> dqkv(int64_t(qkv.size()), 0.0f);
  flash_attention_forward(out.data(), lse.data(), qkv.data(), qkv.data() + qw,
                          qkv.data() + qw + kw, s);
  attention_backward_preprocess(D.data(), g.data(), out.data(), s);
  flash_attention_backward(dqkv.data(), dqkv.data() + qw, dqkv.data() + qw + kw, g.data(),
                           qkv.data(), qkv.data() + qw, qkv.data() + qw + kw, lse.data(),
                           D.data(), s);
  ASSERT_TRUE(out.guards_intact() && lse.guards_intact() && D.guards_intact() &&
              dqkv.guards_intact());
  std::vector<float> o(size_t(p.nq())), dq(size_t(p.nq())), dk(size_t(p.nk())), dv(size_t(p.nk()));
  for (int64_t t = 0; t < c.B * c.Tq; ++t) {
    for (int64_t e = qw; e < ostride; ++e) ASSERT_EQ(out[t * ostride + e], kGap) << "gap written";
    std::memcpy(&o[size_t(t * qw)], &out[t * ostride], size_t(qw) * 4);
    std::memcpy(&dq[size_t(t * qw)], &dqkv[t * fused], size_t(qw) * 4);
    std::memcpy(&dk[size_t(t * kw)], &dqkv[t * fused + qw], size_t(kw) * 4);
    std::memcpy(&dv[size_t(t * kw)], &dqkv[t * fused + qw + kw], size_t(kw) * 4);
  }
  EXPECT_LT(test::nmse(o, r.out), kValueNmse);
  EXPECT_LT(test::nmse(dq, r.dq), kGradNmse);
  EXPECT_LT(test::nmse(dk, r.dk), kGradNmse);
  EXPECT_LT(test::nmse(dv, r.dv), kGradNmse);
}

// backward accumulates: starting from x it must return x + grad.
TEST(FlashAttention, BackwardAccumulates) {
  Problem p(Case{1, 20, 20, 2, 1, 16, true}, 5);
  KernelResult once = run_kernel(p);
  const AttentionShape s = p.shape();
  std::vector<float> dq = once.dq, dk = once.dk, dv = once.dv;
  flash_attention_backward(dq.data(), dk.data(), dv.data(), p.dout.data(), p.q.data(),
                           p.k.data(), p.v.data(), once.lse.data(), once.D.data(), s);
  for (size_t i = 0; i < dq.size(); ++i) ASSERT_EQ(dq[i], once.dq[i] + once.dq[i]);
  for (size_t i = 0; i < dk.size(); ++i) ASSERT_EQ(dk[i], once.dk[i] + once.dk[i]);
  for (size_t i = 0; i < dv.size(); ++i) ASSERT_EQ(dv[i], once.dv[i] + once.dv[i]);
}

// Same inputs, 1, 2 and 4 threads: bit-identical (each output has one writer in a fixed order).
// B*NKV = 4 tasks: with 1 and 2 threads the backward runs its fused single pass, with 4 threads
// (< 2 tasks per thread) the two-pass path, so this also checks that the two paths agree bitwise.
// The causal offsets leave a last query block that sees none of the last key block.
TEST(FlashAttention, DeterministicAcrossThreadCountsAndBackwardPaths) {
  for (const Case& c : {Case{2, 150, 150, 4, 2, 64, true}, Case{2, 70, 150, 2, 2, 16, true, 3, 0},
                        Case{1, 33, 40, 8, 4, 8, false}}) {
    SCOPED_TRACE(c.name());
    Problem p(c, 9);
    const int saved = omp_get_max_threads();
    std::vector<KernelResult> runs;
    for (int threads : {1, 2, 4}) {
      omp_set_num_threads(threads);
      runs.push_back(run_kernel(p));
    }
    omp_set_num_threads(saved);
    auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
      return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * 4) == 0;
    };
    for (size_t r = 1; r < runs.size(); ++r) {
      EXPECT_TRUE(same(runs[0].out, runs[r].out) && same(runs[0].lse, runs[r].lse)) << r;
      EXPECT_TRUE(same(runs[0].dq, runs[r].dq)) << r;
      EXPECT_TRUE(same(runs[0].dk, runs[r].dk) && same(runs[0].dv, runs[r].dv)) << r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Blockwise use, exactly as BurstAttention calls the kernel: keys split in two blocks with their
// own k_offset; forward partials merged with lse, backward per block with the global lse and D.

TEST(FlashAttention, BlockwiseForwardMergeAndBackwardEqualFull) {
  for (bool causal : {true, false}) {
    const Case c{1, 96, 150, 4, 2, 32, causal, 54, 0};  // queries are the last 96 of 150
    SCOPED_TRACE(c.name());
    Problem p(c, 11);
    KernelResult full = run_kernel(p);
    const AttentionShape s = p.shape();
    const int64_t split = 77;  // not a tile multiple on purpose
    const int64_t kw = c.NKV * c.HD;
    std::vector<float> merged_out(size_t(p.nq()), 0.0f), lse_acc(size_t(p.nlse()));
    std::vector<std::vector<float>> outs, lses;
    std::vector<float> dq(size_t(p.nq()), 0.0f), dk(size_t(p.nk()), 0.0f), dv(size_t(p.nk()), 0.0f);
    for (int blk = 0; blk < 2; ++blk) {
      AttentionShape sb = s;
      const int64_t j0 = blk == 0 ? 0 : split;
      sb.Tk = blk == 0 ? split : c.Tk - split;
      sb.k_offset = j0;
      std::vector<float> o(size_t(p.nq())), l(size_t(p.nlse()));
      flash_attention_forward(o.data(), l.data(), p.q.data(), p.k.data() + j0 * kw,
                              p.v.data() + j0 * kw, sb);
      outs.push_back(o);
      lses.push_back(l);
      flash_attention_backward(dq.data(), dk.data() + j0 * kw, dv.data() + j0 * kw,
                               p.dout.data(), p.q.data(), p.k.data() + j0 * kw,
                               p.v.data() + j0 * kw, full.lse.data(), full.D.data(), sb);
    }
    // lse = log(exp(lse0) + exp(lse1)), out = sum_i exp(lse_i - lse) out_i; -inf blocks drop out.
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.NH; ++h)
        for (int64_t i = 0; i < c.Tq; ++i) {
          const size_t li = size_t((b * c.NH + h) * c.Tq + i);
          const double l0 = lses[0][li], l1 = lses[1][li];
          const double mx = std::max(l0, l1);
          const double lse = mx + std::log(std::exp(l0 - mx) + std::exp(l1 - mx));
          EXPECT_NEAR(lse, full.lse[li], 1e-5);
          for (int64_t d = 0; d < c.HD; ++d) {
            const size_t oi = size_t(((b * c.Tq + i) * c.NH + h) * c.HD + d);
            merged_out[oi] =
                float(std::exp(l0 - lse) * outs[0][oi] + std::exp(l1 - lse) * outs[1][oi]);
          }
        }
    auto ref_full = test::to_f64(full.out);
    EXPECT_LT(test::nmse(merged_out, ref_full), kValueNmse);
    EXPECT_LT(test::nmse(dq, test::to_f64(full.dq)), kGradNmse);
    EXPECT_LT(test::nmse(dk, test::to_f64(full.dk)), kGradNmse);
    EXPECT_LT(test::nmse(dv, test::to_f64(full.dv)), kGradNmse);
  }
}

// A query block split the other way (BurstAttention's Q-travelling backward): per query block
// with its own q_offset, the dK/dV contributions summed over blocks equal the full gradients.
TEST(FlashAttention, BlockwiseQueryBackwardEqualsFull) {
  const Case c{1, 140, 140, 2, 1, 16, true};
  Problem p(c, 13);
  KernelResult full = run_kernel(p);
  const AttentionShape s = p.shape();
  const int64_t qw = c.NH * c.HD, split = 71;
  std::vector<float> dq(size_t(p.nq()), 0.0f), dk(size_t(p.nk()), 0.0f), dv(size_t(p.nk()), 0.0f);
  for (int blk = 0; blk < 2; ++blk) {
    AttentionShape sb = s;
    const int64_t i0 = blk == 0 ? 0 : split;
    sb.Tq = blk == 0 ? split : c.Tq - split;
    sb.q_offset = i0;
    // lse/D are (B=1, NH, Tq): slice rows [i0, i0+Tq_b) of every head.
    std::vector<float> lse_b, D_b;
    for (int64_t h = 0; h < c.NH; ++h)
      for (int64_t i = 0; i < sb.Tq; ++i) {
        lse_b.push_back(full.lse[size_t(h * c.Tq + i0 + i)]);
        D_b.push_back(full.D[size_t(h * c.Tq + i0 + i)]);
      }
    flash_attention_backward(dq.data() + i0 * qw, dk.data(), dv.data(), p.dout.data() + i0 * qw,
                             p.q.data() + i0 * qw, p.k.data(), p.v.data(), lse_b.data(),
                             D_b.data(), sb);
  }
  EXPECT_LT(test::nmse(dq, test::to_f64(full.dq)), kGradNmse);
  EXPECT_LT(test::nmse(dk, test::to_f64(full.dk)), kGradNmse);
  EXPECT_LT(test::nmse(dv, test::to_f64(full.dv)), kGradNmse);
}

// Forward tasks take 8 query blocks and the fused backward 8 key blocks at once, sharing the
// loaded tiles; each block's arithmetic must stay what it is alone. A query block computed by
// itself (Tq = its rows, q_offset = its start: the same key tiles in the same order) gives its
// rows of the whole call's out, lse and dQ bit for bit, for blocks in the first, a middle and
// the last, partial group of 19 query blocks, on the fused backward (B * NKV >= 2 threads) and
// with 1 and 2 threads.
TEST(FlashAttention, GroupedBlocksComputeEachBlockAsAloneBitwise) {
  const Case c{2, 1200, 1200, 4, 2, 64, true};
  Problem p(c, 21);
  const AttentionShape s = p.shape();
  const int64_t qw = c.NH * c.HD;
  for (int threads : {1, 2}) {
    SCOPED_TRACE(testing::Message() << threads << " thread(s)");
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    KernelResult full = run_kernel(p);
    for (int64_t qb : {0, 5, 9, 16, 18}) {  // groups [0, 8), [8, 16), [16, 19)
      SCOPED_TRACE(testing::Message() << "query block " << qb);
      const int64_t i0 = qb * 64, n = std::min<int64_t>(64, c.Tq - i0);
      AttentionShape sb = s;
      sb.B = 1;
      sb.Tq = n;
      sb.q_offset = i0;
      for (int64_t b = 0; b < c.B; ++b) {
        const float* qb_ptr = p.q.data() + (b * c.Tq + i0) * qw;
        const float* kb_ptr = p.k.data() + b * c.Tk * c.NKV * c.HD;
        const float* vb_ptr = p.v.data() + b * c.Tk * c.NKV * c.HD;
        std::vector<float> out(size_t(n * qw)), lse(size_t(c.NH * n)), D(size_t(c.NH * n)),
            dq(size_t(n * qw), 0.0f), dk(size_t(c.Tk * c.NKV * c.HD), 0.0f), dv(dk.size(), 0.0f);
        flash_attention_forward(out.data(), lse.data(), qb_ptr, kb_ptr, vb_ptr, sb);
        EXPECT_EQ(std::memcmp(out.data(), full.out.data() + (b * c.Tq + i0) * qw, out.size() * 4), 0);
        for (int64_t h = 0; h < c.NH; ++h)
          EXPECT_EQ(std::memcmp(lse.data() + h * n, full.lse.data() + (b * c.NH + h) * c.Tq + i0,
                                size_t(n) * 4),
                    0)
              << "lse of head " << h;
        const float* db = p.dout.data() + (b * c.Tq + i0) * qw;
        attention_backward_preprocess(D.data(), db, out.data(), sb);
        flash_attention_backward(dq.data(), dk.data(), dv.data(), db, qb_ptr, kb_ptr, vb_ptr,
                                 lse.data(), D.data(), sb);
        EXPECT_EQ(std::memcmp(dq.data(), full.dq.data() + (b * c.Tq + i0) * qw, dq.size() * 4), 0);
      }
    }
    omp_set_num_threads(saved);
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 forward

// A plain bf16 attention, as a framework computes it in bf16: scores rounded to bf16, softmax
// in f32 rounded to bf16, P V accumulated in f32 and rounded to bf16.
std::vector<double> plain_bf16_attention(const Problem& p, const std::vector<float>& q,
                                         const std::vector<float>& k,
                                         const std::vector<float>& v) {
  const Case& c = p.c;
  const float scale = p.shape().scale;
  auto r = [](float x) { return bf16_to_f32(f32_to_bf16(x)); };
  std::vector<double> out(size_t(p.nq()));
  std::vector<float> sc(size_t(c.Tk));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.NH; ++h)
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t kvh = h / (c.NH / c.NKV);
        const float* qi = &q[size_t(((b * c.Tq + i) * c.NH + h) * c.HD)];
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < c.Tk; ++j) {
          const float* kj = &k[size_t(((b * c.Tk + j) * c.NKV + kvh) * c.HD)];
          float dot = 0.0f;
          for (int64_t d = 0; d < c.HD; ++d) dot += qi[d] * kj[d];
          const bool vis = !c.causal || c.k_offset + j <= c.q_offset + i;
          sc[size_t(j)] = vis ? r(r(dot) * scale) : -std::numeric_limits<float>::infinity();
          mx = std::max(mx, sc[size_t(j)]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < c.Tk; ++j) sum += std::exp(sc[size_t(j)] - mx);
        for (int64_t d = 0; d < c.HD; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < c.Tk; ++j) {
            const float pj = r(std::exp(sc[size_t(j)] - mx) / sum);
            acc += pj * v[size_t(((b * c.Tk + j) * c.NKV + kvh) * c.HD + d)];
          }
          out[size_t(((b * c.Tq + i) * c.NH + h) * c.HD + d)] = r(acc);
        }
      }
  return out;
}

TEST(FlashAttention, Bf16ForwardWithinTwiceThePlainBf16Error) {
  for (const Case& c : {Case{1, 127, 127, 4, 2, 64, true}, Case{2, 13, 29, 6, 1, 80, false}}) {
    SCOPED_TRACE(c.name());
    Problem p(c, 17);
    // The reference sees the same bf16-rounded inputs (flash-attention's rule).
    Problem pr = p;
    pr.q = test::bf16_round(p.q);
    pr.k = test::bf16_round(p.k);
    pr.v = test::bf16_round(p.v);
    RefResult ref = reference(pr);
    const AttentionShape s = p.shape();
    auto qb = test::to_bf16(p.q), kb = test::to_bf16(p.k), vb = test::to_bf16(p.v);
    GuardedBuffer<float> out(p.nq()), lse(p.nlse());
    flash_attention_forward_bf16(out.data(), lse.data(), qb.data(), kb.data(), vb.data(), s);
    ASSERT_TRUE(out.guards_intact() && lse.guards_intact());
    ASSERT_TRUE(test::all_finite(out.data(), out.size()));
    std::vector<double> plain = plain_bf16_attention(pr, pr.q, pr.k, pr.v);
    const double err = test::max_abs_diff(out.data(), ref.out.data(), p.nq());
    const double plain_err = test::max_abs_diff(plain.data(), ref.out.data(), p.nq());
    EXPECT_LE(err, 2.0 * plain_err) << "kernel " << err << " plain bf16 " << plain_err;
    expect_lse_close(lse.data(), ref.lse, 1e-5);
    // Widening happens at load, so the bf16 kernel equals the f32 kernel on widened inputs.
    std::vector<float> out32(size_t(p.nq())), lse32(size_t(p.nlse()));
    flash_attention_forward(out32.data(), lse32.data(), pr.q.data(), pr.k.data(), pr.v.data(), s);
    EXPECT_EQ(std::memcmp(out32.data(), out.data(), out32.size() * 4), 0);
    EXPECT_EQ(std::memcmp(lse32.data(), lse.data(), lse32.size() * 4), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input

TEST(FlashAttention, RejectsBadShapes) {
  Problem p(Case{1, 4, 4, 4, 2, 8, true});
  std::vector<float> out(size_t(p.nq())), lse(size_t(p.nlse()));
  auto run = [&](AttentionShape s) {
    flash_attention_forward(out.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), s);
  };
  AttentionShape s = p.shape();
  s.NKV = 3;  // does not divide NH = 4
  EXPECT_THROW(run(s), loom::Error);
  s = p.shape();
  s.q_stride = s.NH * s.HD - 1;
  EXPECT_THROW(run(s), loom::Error);
  s = p.shape();
  s.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(run(s), loom::Error);
  s = p.shape();
  s.HD = 0;
  EXPECT_THROW(run(s), loom::Error);
  // Nothing was written by the rejected calls.
  for (float x : out) ASSERT_EQ(x, 0.0f);
}

TEST(FlashAttention, EmptyKeysGiveZeroOutputAndNegInfLse) {
  Problem p(Case{1, 5, 0, 2, 1, 8, false});
  std::vector<float> out(size_t(p.nq()), 7.0f), lse(size_t(p.nlse()), 7.0f);
  flash_attention_forward(out.data(), lse.data(), p.q.data(), nullptr, nullptr, p.shape());
  for (float x : out) ASSERT_EQ(x, 0.0f);
  for (float x : lse) ASSERT_TRUE(std::isinf(x) && x < 0);
}

}  // namespace
}  // namespace loom::attention
