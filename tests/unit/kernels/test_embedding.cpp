// Tests for kernels/cpu/embedding.h: lookup and scatter vs the float64 reference (with repeated
// tokens and a position offset), guard bytes, the bad-token error, determinism.
#include <gtest/gtest.h>

#include <string>

#include "common/op_check.h"
#include "core/error.h"
#include "kernels/cpu/embedding.h"
#include "kernels/ref/embedding_ref.h"

using namespace loom;
using namespace loom::test;

namespace {
// Forward is one add per element; backward sums at most B*T values per element in f32.
// NMSE < 1e-10 is far above that rounding (~1e-13) and far below any indexing error (~1).
constexpr double kTol = 1e-10;
struct Dims {
  int64_t B, T, C, V, pos_offset;
};
const Dims kDims[] = {{1, 1, 5, 7, 0}, {2, 5, 7, 13, 3}, {3, 13, 127, 5, 1}, {4, 64, 96, 50, 10}};
}  // namespace

TEST(KernelsEmbedding, ForwardAndBackwardMatchReference) {
  uint64_t seed = 1;
  for (const Dims& d : kDims) {
    SCOPED_TRACE(testing::Message() << "B=" << d.B << " T=" << d.T << " C=" << d.C << " V=" << d.V
                                    << " pos_offset=" << d.pos_offset);
    const int64_t P = d.pos_offset + d.T;  // rows of the position table
    auto tokens = random_tokens(d.B * d.T, d.V, seed++);  // V small: many repeats
    auto wte = random_normal(d.V * d.C, seed++), wpe = random_normal(P * d.C, seed++);
    auto dout = random_normal(d.B * d.T * d.C, seed++);
    GuardedBuffer<float> out(d.B * d.T * d.C), qout(d.B * d.T * d.C);
    kernels::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), d.B, d.T, d.C,
                               d.V, d.pos_offset);
    kernels::position_forward(qout.data(), wpe.data(), d.B, d.T, d.C, d.pos_offset);
    std::vector<double> out_r(static_cast<size_t>(d.B * d.T * d.C)), qout_r(out_r.size());
    kernels::ref::embedding_forward(out_r.data(), tokens.data(), to_f64(wte).data(),
                                    to_f64(wpe).data(), d.B, d.T, d.C, d.V, d.pos_offset);
    kernels::ref::position_forward(qout_r.data(), to_f64(wpe).data(), d.B, d.T, d.C, d.pos_offset);
    EXPECT_TRUE(out.guards_intact() && qout.guards_intact());
    EXPECT_LT(nmse(out.data(), out_r.data(), out.size()), kTol);
    EXPECT_LT(nmse(qout.data(), qout_r.data(), qout.size()), kTol);

    auto dwte0 = random_normal(d.V * d.C, seed++), dwpe0 = random_normal(P * d.C, seed++);
    GuardedBuffer<float> dwte(d.V * d.C), dwpe(P * d.C), dtab(P * d.C);
    dwte.assign(dwte0);
    dwpe.assign(dwpe0);
    dtab.assign(dwpe0);
    kernels::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), d.B, d.T,
                                d.C, d.V, d.pos_offset);
    kernels::position_backward(dtab.data(), dout.data(), d.B, d.T, d.C, d.pos_offset);
    auto dwte_r = to_f64(dwte0), dwpe_r = to_f64(dwpe0), dtab_r = to_f64(dwpe0);
    kernels::ref::embedding_backward(dwte_r.data(), dwpe_r.data(), to_f64(dout).data(),
                                     tokens.data(), d.B, d.T, d.C, d.V, d.pos_offset);
    kernels::ref::position_backward(dtab_r.data(), to_f64(dout).data(), d.B, d.T, d.C,
                                    d.pos_offset);
    EXPECT_TRUE(dwte.guards_intact() && dwpe.guards_intact() && dtab.guards_intact());
    EXPECT_LT(nmse(dwte.data(), dwte_r.data(), dwte.size()), kTol);
    EXPECT_LT(nmse(dwpe.data(), dwpe_r.data(), dwpe.size()), kTol);
    EXPECT_LT(nmse(dtab.data(), dtab_r.data(), dtab.size()), kTol);
    // Rows of the position table before pos_offset are untouched.
    for (int64_t i = 0; i < d.pos_offset * d.C; ++i) EXPECT_EQ(dwpe[i], dwpe0[size_t(i)]);
  }
}

// The embedding is linear in wte, so its reference gradient is checked against finite
// differences of L = sum(G .* embedding(wte)) with repeated tokens.
TEST(KernelsEmbedding, ReferenceGradientMatchesFiniteDifferences) {
  const int64_t B = 2, T = 5, C = 3, V = 4;
  auto tokens = random_tokens(B * T, V, 3);
  auto wte = to_f64(random_normal(V * C, 4)), wpe = to_f64(random_normal(T * C, 5));
  auto G = to_f64(random_normal(B * T * C, 6));
  auto loss = [&](const std::vector<double>& w) {
    std::vector<double> out(static_cast<size_t>(B * T * C));
    kernels::ref::embedding_forward(out.data(), tokens.data(), w.data(), wpe.data(), B, T, C, V, 0);
    return dot(out, G);
  };
  std::vector<double> dwte(static_cast<size_t>(V * C), 0.0);
  kernels::ref::embedding_backward(dwte.data(), nullptr, G.data(), tokens.data(), B, T, C, V, 0);
  EXPECT_LT(nmse(dwte, fd_gradient(loss, wte)), 1e-16);  // linear: FD exact up to rounding
}

TEST(KernelsEmbedding, OutOfRangeTokenGivesClearErrorAndWritesNothing) {
  const int64_t B = 2, T = 3, C = 4, V = 10;
  std::vector<int32_t> tokens = {1, 2, 3, 4, 10, 5};  // id 10 at (b=1, t=1)
  std::vector<float> wte(V * C, 1.0f), wpe(T * C, 1.0f);
  GuardedBuffer<float> out(B * T * C, -7.0f);
  try {
    kernels::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C, V, 0);
    FAIL() << "expected loom::Error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("token id 10"), std::string::npos) << msg;
    EXPECT_NE(msg.find("b=1, t=1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("V=10"), std::string::npos) << msg;
  }
  for (int64_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i], -7.0f);
  tokens[4] = -1;
  EXPECT_THROW(kernels::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T,
                                          C, V, 0),
               Error);
  std::vector<float> dwte(V * C, 0.0f), dout(B * T * C, 1.0f);
  EXPECT_THROW(kernels::embedding_backward(dwte.data(), nullptr, dout.data(), tokens.data(), B, T,
                                           C, V, 0),
               Error);
}

TEST(KernelsEmbedding, BackwardIsBitReproducible) {
  const int64_t B = 4, T = 256, C = 768, V = 1000;
  auto tokens = random_tokens(B * T, V, 1);
  auto dout = random_normal(B * T * C, 2);
  std::vector<float> a(V * C, 0.f), b(V * C, 0.f), pa(T * C, 0.f), pb(T * C, 0.f);
  kernels::embedding_backward(a.data(), pa.data(), dout.data(), tokens.data(), B, T, C, V, 0);
  kernels::embedding_backward(b.data(), pb.data(), dout.data(), tokens.data(), B, T, C, V, 0);
  EXPECT_EQ(a, b);
  EXPECT_EQ(pa, pb);
}

TEST(KernelsEmbedding, NullPositionGradientIsAllowed) {
  const int64_t B = 2, T = 3, C = 5, V = 7;
  auto tokens = random_tokens(B * T, V, 8);
  auto dout = random_normal(B * T * C, 9);
  GuardedBuffer<float> dwte(V * C, 0.0f);
  kernels::embedding_backward(dwte.data(), nullptr, dout.data(), tokens.data(), B, T, C, V, 0);
  std::vector<double> ref(static_cast<size_t>(V * C), 0.0);
  kernels::ref::embedding_backward(ref.data(), nullptr, to_f64(dout).data(), tokens.data(), B, T,
                                   C, V, 0);
  EXPECT_TRUE(dwte.guards_intact());
  EXPECT_LT(nmse(dwte.data(), ref.data(), V * C), kTol);
}
