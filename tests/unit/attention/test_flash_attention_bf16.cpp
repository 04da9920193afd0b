// Tests for the native bf16 flash attention (flash_attention.h, "Native bf16") on each of its
// backends (AMX tiles, AVX512-BF16 instructions) against float64 references on the same bf16
// inputs. A backend this CPU or OS cannot run prints SKIP (native_bf16_attention_usable() says
// which; the f32 and widened-bf16 kernels are tested in test_flash_attention.cpp everywhere).
//
// What the bounds mean. The kernel rounds P and dS * scale to bf16 (unit roundoff 2^-9) before
// they multiply V, dO, Q and K; every other step is f32. So it cannot be as close to the exact
// result as the f32 kernel; it must be as close as the same arithmetic done exactly with only
// those roundings. `bf16_model` below is that arithmetic in float64: P and dS rounded to bf16 at
// the kernel's points, everything else exact. The kernel's error against the exact float64
// attention must be within 2x the model's (f32 accumulation adds ~1e-7 relative; a masking,
// packing or indexing bug adds errors of order 1, NMSE ~1e-2 and above). lse comes from f32
// scores of exact bf16 products, so it is held to 1e-5 absolute like the f32 kernel's.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "attention/flash_attention.h"
#include "common/op_check.h"
#include "core/error.h"
#include "kernels/ref/attention_ref.h"

namespace loom::attention {
namespace {

struct Case {
  int64_t B, Tq, Tk, NH, NKV, HD;
  bool causal;
  int64_t q_offset = 0, k_offset = 0;
  int64_t pad = 0;  // extra elements per row between rows (strided operands)
  std::string name() const {
    return "B" + std::to_string(B) + "_Tq" + std::to_string(Tq) + "_Tk" + std::to_string(Tk) +
           "_NH" + std::to_string(NH) + "_NKV" + std::to_string(NKV) + "_HD" + std::to_string(HD) +
           (causal ? "_causal" : "_full") + "_qo" + std::to_string(q_offset) + "_ko" +
           std::to_string(k_offset) + "_pad" + std::to_string(pad);
  }
};

double bf16r(double x) { return double(bf16_to_f32(f32_to_bf16(float(x)))); }

struct Problem {
  Case c;
  // bf16-valued inputs, contiguous (B, T, heads, HD), as float and as double.
  std::vector<float> q, k, v, dout;
  AttentionShape shape() const {
    return AttentionShape{c.B,          c.Tq,         c.Tk,         c.NH,       c.NKV,
                          c.HD,         c.NH * c.HD + c.pad, c.NKV * c.HD + c.pad,
                          c.NKV * c.HD + c.pad,       c.NH * c.HD + c.pad, c.causal, c.q_offset,
                          c.k_offset,   float(1.0 / std::sqrt(double(c.HD)))};
  }
  int64_t nq() const { return c.B * c.Tq * c.NH * c.HD; }
  int64_t nk() const { return c.B * c.Tk * c.NKV * c.HD; }
  int64_t nlse() const { return c.B * c.NH * c.Tq; }
  explicit Problem(const Case& cs, uint64_t seed) : c(cs) {
    q = test::bf16_round(test::random_normal(nq(), seed, 1.0f, 0.0f, 1));
    k = test::bf16_round(test::random_normal(nk(), seed, 1.0f, 0.0f, 2));
    v = test::bf16_round(test::random_normal(nk(), seed, 1.0f, 0.0f, 3));
    dout = test::bf16_round(test::random_normal(nq(), seed, 1.0f, 0.0f, 4));
  }
};

// Contiguous (rows, width) -> strided (rows, width + pad) bf16, the gaps filled with NaN so a
// kernel that reads them poisons its output.
std::vector<bf16> strided_bf16(const std::vector<float>& x, int64_t width, int64_t pad) {
  const int64_t rows = int64_t(x.size()) / width;
  std::vector<bf16> out(size_t(rows * (width + pad)), f32_to_bf16(std::nanf("")));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i)
      out[size_t(r * (width + pad) + i)] = f32_to_bf16(x[size_t(r * width + i)]);
  return out;
}
// Strided f32 (rows, width + pad) -> contiguous.
std::vector<float> unstride(const std::vector<float>& x, int64_t width, int64_t pad) {
  const int64_t rows = int64_t(x.size()) / (width + pad);
  std::vector<float> out(size_t(rows * width));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) out[size_t(r * width + i)] = x[size_t(r * (width + pad) + i)];
  return out;
}

// gtest prints a failing parameter by name instead of its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

struct Grads {
  std::vector<double> out, lse, dq, dk, dv;
};

// Exact float64 attention (kernels/ref) on the bf16-valued inputs.
Grads exact(const Problem& p) {
  const Case& c = p.c;
  kernels::ref::AttentionRefShape rs{c.B,  c.Tq,     c.Tk,       c.NH,
                                     c.NKV, c.HD,    c.causal,   c.q_offset,
                                     c.k_offset, double(p.shape().scale)};
  Grads g;
  g.out.resize(size_t(p.nq()));
  g.lse.resize(size_t(p.nlse()));
  g.dq.resize(size_t(p.nq()));
  g.dk.resize(size_t(p.nk()));
  g.dv.resize(size_t(p.nk()));
  auto q = test::to_f64(p.q), k = test::to_f64(p.k), v = test::to_f64(p.v),
       d = test::to_f64(p.dout);
  kernels::ref::attention_forward_ref(g.out.data(), g.lse.data(), q.data(), k.data(), v.data(), rs);
  kernels::ref::attention_backward_ref(g.dq.data(), g.dk.data(), g.dv.data(), d.data(), q.data(),
                                       k.data(), v.data(), rs);
  return g;
}

// The kernel's arithmetic done exactly except for its bf16 roundings of P and dS * scale.
Grads bf16_model(const Problem& p) {
  const Case& c = p.c;
  const double scale = double(p.shape().scale);
  const int64_t group = c.NH / c.NKV;
  Grads g;
  g.out.assign(size_t(p.nq()), 0.0);
  g.dq.assign(size_t(p.nq()), 0.0);
  g.dk.assign(size_t(p.nk()), 0.0);
  g.dv.assign(size_t(p.nk()), 0.0);
  std::vector<double> s(size_t(c.Tk)), pr(size_t(c.Tk)), dp(size_t(c.Tk));
  auto Q = [&](int64_t b, int64_t i, int64_t h) { return &p.q[size_t(((b * c.Tq + i) * c.NH + h) * c.HD)]; };
  auto G = [&](int64_t b, int64_t i, int64_t h) { return &p.dout[size_t(((b * c.Tq + i) * c.NH + h) * c.HD)]; };
  auto K = [&](int64_t b, int64_t j, int64_t h) { return &p.k[size_t(((b * c.Tk + j) * c.NKV + h) * c.HD)]; };
  auto V = [&](int64_t b, int64_t j, int64_t h) { return &p.v[size_t(((b * c.Tk + j) * c.NKV + h) * c.HD)]; };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.NH; ++h)
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t kvh = h / group;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < c.Tk; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < c.HD; ++d) dot += double(Q(b, i, h)[d]) * K(b, j, kvh)[d];
          const bool vis = !c.causal || c.k_offset + j <= c.q_offset + i;
          s[size_t(j)] = vis ? dot * scale : -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[size_t(j)]);
        }
        if (std::isinf(mx)) continue;  // no visible key: zero output and gradients
        double sum = 0.0;
        for (int64_t j = 0; j < c.Tk; ++j) sum += std::exp(s[size_t(j)] - mx);
        const double lse = mx + std::log(sum);
        double Di = 0.0;
        for (int64_t j = 0; j < c.Tk; ++j) {
          const double pe = std::exp(s[size_t(j)] - lse);
          pr[size_t(j)] = pe;
          double t = 0.0;
          for (int64_t d = 0; d < c.HD; ++d) t += double(G(b, i, h)[d]) * V(b, j, kvh)[d];
          dp[size_t(j)] = t;
          Di += pe * t;
        }
        double* o = &g.out[size_t(((b * c.Tq + i) * c.NH + h) * c.HD)];
        double* dqi = &g.dq[size_t(((b * c.Tq + i) * c.NH + h) * c.HD)];
        for (int64_t j = 0; j < c.Tk; ++j) {
          // The forward rounds P~ = exp(s - max) and divides by the sum of unrounded P~ (its
          // running max differs per key block; the rounding's size is the same).
          const double pf = bf16r(std::exp(s[size_t(j)] - mx)) / sum;
          const double pb = bf16r(pr[size_t(j)]);
          const double ds = bf16r(pr[size_t(j)] * (dp[size_t(j)] - Di) * scale);
          double* dkj = &g.dk[size_t(((b * c.Tk + j) * c.NKV + kvh) * c.HD)];
          double* dvj = &g.dv[size_t(((b * c.Tk + j) * c.NKV + kvh) * c.HD)];
          for (int64_t d = 0; d < c.HD; ++d) {
            o[d] += pf * V(b, j, kvh)[d];
            dvj[d] += pb * G(b, i, h)[d];
            dkj[d] += ds * Q(b, i, h)[d];
            dqi[d] += ds * K(b, j, kvh)[d];
          }
        }
      }
  return g;
}

struct NativeRun {
  std::vector<float> out, lse, dq, dk, dv;
};
// ws_fill: null, the calls allocate their packed operands; else they come from a caller's
// workspace of exactly flash_attention_native_workspace_bytes, filled with *ws_fill first.
// fused false: the two-pass backward whatever the shape.
NativeRun run_native(const Problem& p, Bf16Backend backend, const float* ws_fill = nullptr,
                     bool fused = true) {
  const AttentionShape s = p.shape();
  const Case& c = p.c;
  const int64_t qw = c.NH * c.HD, kw = c.NKV * c.HD;
  auto q = strided_bf16(p.q, qw, c.pad), k = strided_bf16(p.k, kw, c.pad),
       v = strided_bf16(p.v, kw, c.pad), g = strided_bf16(p.dout, qw, c.pad);
  const int64_t qn = c.B * c.Tq * (qw + c.pad), kn = c.B * c.Tk * (kw + c.pad);
  test::GuardedBuffer<float> out(qn, 0.0f), lse(p.nlse()), D(p.nlse()), dq(qn, 0.0f),
      dk(kn, 0.0f), dv(kn, 0.0f);
  auto workspace = [&](bool backward) -> void* {
    if (!ws_fill) return nullptr;
    const int64_t bytes = flash_attention_native_workspace_bytes(backward, s);
    static std::vector<float> ws;
    ws.assign(size_t(bytes / 4 + 16), *ws_fill);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 63) & ~uintptr_t(63));
  };
  flash_attention_forward_bf16_native(out.data(), lse.data(), q.data(), k.data(), v.data(), s,
                                      workspace(false), backend);
  attention_backward_preprocess(D.data(), g.data(), out.data(), s);
  flash_attention_backward_bf16_native(dq.data(), dk.data(), dv.data(), g.data(), q.data(),
                                       k.data(), v.data(), lse.data(), D.data(), s,
                                       workspace(true), backend, fused);
  EXPECT_TRUE(out.guards_intact() && lse.guards_intact() && D.guards_intact());
  EXPECT_TRUE(dq.guards_intact() && dk.guards_intact() && dv.guards_intact());
  return {unstride(out.vec(), qw, c.pad), lse.vec(), unstride(dq.vec(), qw, c.pad),
          unstride(dk.vec(), kw, c.pad), unstride(dv.vec(), kw, c.pad)};
}

const char* backend_name(Bf16Backend b) { return b == Bf16Backend::amx ? "amx" : "avx512_bf16"; }

class FlashAttentionNative : public ::testing::TestWithParam<std::tuple<Bf16Backend, Case>> {
 protected:
  Bf16Backend backend() const { return std::get<0>(GetParam()); }
  const Case& cs() const { return std::get<1>(GetParam()); }
  void SetUp() override {
    if (!native_bf16_attention_usable(backend()))
      GTEST_SKIP() << "SKIP: this CPU or OS cannot run the " << backend_name(backend())
                   << " backend (CPUID, XCR0, arch_prctl, or LOOM_AMX / LOOM_AVX512_BF16 = 0)";
  }
};

TEST_P(FlashAttentionNative, WithinTwiceTheBf16ModelErrorOfExactAttention) {
  const Case c = cs();
  Problem p(c, 23);
  const Grads ex = exact(p), model = bf16_model(p);
  const NativeRun r = run_native(p, backend());
  auto check = [&](const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                   const std::vector<double>& mod) {
    const double err = test::nmse(got, ref), model_err = test::nmse(mod, ref);
    std::printf("%s %s %s: NMSE kernel %.3g, bf16 model %.3g\n", backend_name(backend()),
                c.name().c_str(), what, err, model_err);
    // A floor of 1e-12 for outputs the model gets exactly (e.g. all-masked rows).
    EXPECT_LE(err, 2.0 * model_err + 1e-12)
        << what << ": kernel NMSE " << err << ", bf16 model NMSE " << model_err;
    EXPECT_LT(err, 1e-4) << what;
  };
  check("out", r.out, ex.out, model.out);
  check("dq", r.dq, ex.dq, model.dq);
  check("dk", r.dk, ex.dk, model.dk);
  check("dv", r.dv, ex.dv, model.dv);
  for (size_t i = 0; i < ex.lse.size(); ++i) {
    if (std::isinf(ex.lse[i])) {
      ASSERT_TRUE(std::isinf(r.lse[i]) && r.lse[i] < 0) << "lse[" << i << "]";
    } else {
      ASSERT_NEAR(r.lse[i], ex.lse[i], 1e-5) << "lse[" << i << "]";
    }
  }
}

TEST_P(FlashAttentionNative, SameBitsAtAnyThreadCount) {
  Problem p(cs(), 5);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const NativeRun one = run_native(p, backend());
  omp_set_num_threads(2);
  const NativeRun two = run_native(p, backend());
  omp_set_num_threads(saved);
  for (auto [a, b] : {std::pair<const std::vector<float>*, const std::vector<float>*>{&one.out, &two.out}, {&one.lse, &two.lse}, {&one.dq, &two.dq},
                      {&one.dk, &two.dk}, {&one.dv, &two.dv}})
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->size() * 4), 0);
}

// The packed operands in a caller's workspace (as training takes them from its pool), filled
// with NaN beforehand: every padding element is written by the packing, so the bits are those of
// the call's own zero-initialised buffers.
TEST_P(FlashAttentionNative, CallersWorkspaceGivesTheSameBits) {
  Problem p(cs(), 9);
  const float nan = std::nanf("");
  const NativeRun own = run_native(p, backend()), given = run_native(p, backend(), &nan);
  for (auto [a, b] : {std::pair<const std::vector<float>*, const std::vector<float>*>{&own.out, &given.out}, {&own.lse, &given.lse}, {&own.dq, &given.dq},
                      {&own.dk, &given.dk}, {&own.dv, &given.dv}})
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->size() * 4), 0);
}

// The one-pass backward (one task per (b, kv head), used where B * NKV gives each thread two
// tasks) against the two passes: the same products and accumulation orders, so the same bits.
// Run on one thread, where every case with B * NKV >= 2 takes the one-pass path.
TEST_P(FlashAttentionNative, OnePassBackwardEqualsTwoPassesBitwise) {
  const Case c = cs();
  if (c.B * c.NKV < 2)
    GTEST_SKIP() << "SKIP: B * NKV = " << c.B * c.NKV << " < 2 tasks: always two passes";
  Problem p(c, 11);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const NativeRun one = run_native(p, backend(), nullptr, true);
  const NativeRun two = run_native(p, backend(), nullptr, false);
  omp_set_num_threads(saved);
  for (auto [a, b] : {std::pair<const std::vector<float>*, const std::vector<float>*>{&one.dq, &two.dq},
                      {&one.dk, &two.dk}, {&one.dv, &two.dv}})
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->size() * 4), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, FlashAttentionNative,
    ::testing::Combine(
        ::testing::Values(Bf16Backend::amx, Bf16Backend::avx512),
        ::testing::Values(Case{1, 127, 127, 4, 2, 64, true},         // GQA, ragged last block
                          Case{2, 13, 29, 6, 1, 80, false},          // HD not a multiple of 32
                          Case{1, 200, 200, 2, 2, 128, true, 0, 0, 24},  // strided, HD 128
                          Case{1, 64, 130, 4, 1, 16, true, 66, 0},   // causal block with offsets
                          Case{1, 70, 70, 2, 1, 33, true, 0, 40},    // odd HD; first rows see nothing
                          Case{1, 256, 256, 8, 2, 64, false},
                          Case{2, 600, 600, 4, 2, 64, true},         // key groups of 8 blocks, 2 batches
                          // the offset cases with 2 batches, so that the one-pass backward
                          // (B * NKV >= 2 tasks on one thread) sees offsets and empty rows
                          Case{2, 64, 130, 4, 1, 16, true, 66, 0},
                          Case{2, 70, 70, 2, 1, 33, true, 0, 40})),
    [](const auto& info) {
      return std::string(backend_name(std::get<0>(info.param))) + "_" +
             std::get<1>(info.param).name();
    });

TEST(FlashAttentionNativeErrors, RefusesBadShapes) {
  if (!native_bf16_attention_usable()) GTEST_SKIP() << "SKIP: neither AMX-BF16 nor AVX512-BF16 here";
  Problem p(Case{1, 4, 4, 4, 2, 8, true}, 1);
  AttentionShape s = p.shape();
  s.NKV = 3;
  std::vector<float> out(64), lse(16);
  std::vector<bf16> q(64), k(32), v(32);
  EXPECT_THROW(flash_attention_forward_bf16_native(out.data(), lse.data(), q.data(), k.data(),
                                                v.data(), s),
               loom::Error);
}

}  // namespace
}  // namespace loom::attention
