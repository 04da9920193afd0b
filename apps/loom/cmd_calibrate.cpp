// `loom calibrate [--out configs/clusters/local.toml] [--quick]`: measures this machine and writes
// a cluster file (planner/cluster.h) for `loom plan` and `loom train --auto`:
// - the matmul efficiency table: kernels::matmul_f32 (and matmul_bf16 where bf16 runs natively)
//   over square products of 32..1024 and the engine's row-heavy shapes, as a fraction of the best
//   rate measured (the host's peak with every core);
// - vector-op bandwidth: a triad a = b + s*c over arrays far larger than the caches;
// - loom's own kernels on one core ([kernels]: product layouts, flash attention by size,
//   nanoseconds per element of the elementwise passes, cross-entropy and the optimizer);
// - the cores of the host (ranks share them: core/threads.h), and what p ranks computing at once
//   each get: of 256^3 products, of memory streams, of loom's own training step (under mpirun,
//   p = 1..N; the concurrency tables of [host]);
// - under mpirun with N >= 2 ranks: every collective (all-reduce, all-gather, reduce-scatter)
//   and point-to-point send at group sizes 2..N with a small and a large message, fitted to the
//   alpha-beta form of cluster.h: alpha and beta from the all-gather, per-collective factors
//   from the others. Without MPI the links keep the figures of a single shared-memory host
//   measured on an earlier run, or (none known) a 1-rank file whose links are never used.
// Records the CPU model and the date. Progress goes to stderr; about a minute on 2 cores.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

#include "cli.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "core/threads.h"
#include "attention/flash_attention.h"
#include "core/memory_pool.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"
#include "model/block.h"
#include "model/gpt.h"
#include "model/head.h"
#include "model/stage.h"
#include "planner/cluster.h"
#include "planner/cost_model.h"

namespace {

using Clock = std::chrono::steady_clock;
using loom::planner::Cluster;
using loom::planner::Collective;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The sorted seconds of calls of `op` over at least `budget_s` (3 calls at least), after one
// warm-up call (which also creates oneDNN primitives).
template <class F>
std::vector<double> call_times(double budget_s, F op) {
  op();
  std::vector<double> t;
  const auto t0 = Clock::now();
  do {
    const auto t1 = Clock::now();
    op();
    t.push_back(seconds_since(t1));
  } while (seconds_since(t0) < budget_s || t.size() < 3);
  std::sort(t.begin(), t.end());
  return t;
}

// Median seconds of one call of `op` (call_times).
template <class F>
double median_call(double budget_s, F op) {
  const std::vector<double> t = call_times(budget_s, op);
  return t[t.size() / 2];
}

// Rate (FLOP/s) of an (m x k) @ (k x n) product on this thread count.
double matmul_rate(int64_t m, int64_t n, int64_t k, bool bf16_native, double budget_s,
                   double* best_out = nullptr, double* median_call_s = nullptr) {
  std::vector<float> A(size_t(m * k), 0.5f), B(size_t(k * n), 0.25f), C(size_t(m * n));
  std::vector<loom::bf16> Ab, Bb;
  if (bf16_native) {
    Ab.assign(A.size(), loom::bf16{});
    Bb.assign(B.size(), loom::bf16{});
  }
  auto once = [&] {
    if (bf16_native)
      loom::kernels::matmul_bf16(Ab.data(), Bb.data(), C.data(), m, n, k, false, false, false);
    else
      loom::kernels::matmul_f32(A.data(), B.data(), C.data(), m, n, k, false, false, false);
  };
  // The median call within the budget: what a rank gets on this machine as it is loaded now
  // (on a shared machine the fastest call is what the kernel could do alone; both printed).
  const std::vector<double> t = call_times(budget_s, once);
  const double flops = 2.0 * double(m) * double(n) * double(k);
  if (best_out) *best_out = flops / t.front();
  if (median_call_s) *median_call_s = t[t.size() / 2];
  return flops / t[t.size() / 2];
}

// Throughput (FLOP/s) of back-to-back 256^3 products over `budget_s` of wall time: unlike a
// single call's time, this sees the time slices other processes take.
double matmul_throughput(double budget_s) {
  const int64_t n = 256;
  std::vector<float> A(size_t(n * n), 0.5f), B(size_t(n * n), 0.25f), C(size_t(n * n));
  loom::kernels::matmul_f32(A.data(), B.data(), C.data(), n, n, n, false, false, false);
  const auto t0 = Clock::now();
  int64_t reps = 0;
  do {
    loom::kernels::matmul_f32(A.data(), B.data(), C.data(), n, n, n, false, false, false);
    ++reps;
  } while (seconds_since(t0) < budget_s);
  return 2.0 * double(n * n * n) * double(reps) / seconds_since(t0);
}

// Bytes/s of back-to-back AdamW passes (kernels/cpu/adamw.h: 4 arrays read, 3 written) over 4M
// parameters (64 MB, beyond what a process gets of the cache here), over `budget_s` of wall
// time: the memory-bound side of a rank's step (the optimizer, and activations that come back
// from memory), which ranks sharing a host's memory slow down more than they do products.
double stream_throughput(double budget_s) {
  const size_t n = size_t(1) << 22;
  static std::vector<float> w, g, m, v;  // kept between windows: allocated once
  if (w.size() != n) {
    w.assign(n, 0.1f);
    g.assign(n, 0.01f);
    m.assign(n, 0.0f);
    v.assign(n, 0.0f);
  }
  int64_t step = 0;
  loom::kernels::adamw_step(w.data(), g.data(), m.data(), v.data(), int64_t(n), 1e-4f, 0.9f,
                            0.95f, 1e-8f, 0.1f, ++step, 1.0f);
  const auto t0 = Clock::now();
  do {
    loom::kernels::adamw_step(w.data(), g.data(), m.data(), v.data(), int64_t(n), 1e-4f, 0.9f,
                              0.95f, 1e-8f, 0.1f, ++step, 1.0f);
  } while (seconds_since(t0) < budget_s);
  return 28.0 * double(n) * double(step - 1) / seconds_since(t0);
}

// Training steps per second of loom's own engine on a small built-in model (3 blocks + query
// layer, d_model 192, 3 heads, d_ff 768, vocab 2048; micro-batch 2 x 96 tokens, f32), each step
// a forward + backward and an AdamW update of every parameter, over `budget_s` of wall time.
// Unlike the product and stream probes, it runs everything a rank runs (products, attention,
// elementwise passes, the optimizer's memory traffic, allocation from the pool) with a rank's
// working set, so p of them at once show what p ranks sharing the host lose (caches, memory,
// time slices). The shape differs from the models the planner is validated on.
class StepProbe {
 public:
  StepProbe() {
    cfg_.name = "calibrate-step";
    cfg_.vocab = 2048;
    cfg_.n_layers = 3;
    cfg_.d_model = 192;
    cfg_.n_heads = 3;
    cfg_.n_kv_heads = 3;
    cfg_.d_ff = 768;
    cfg_.max_seq = 96;
    cfg_.activation = loom::model::Activation::fast_gelu;
    cfg_.query_layer = true;
    cfg_.validate();
    gpt_ = std::make_unique<loom::model::Gpt>(cfg_, pool_, loom::model::Precision::f32);
    gpt_->init_weights(7);
    const size_t n = size_t(gpt_->layout().total());
    m_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
    tokens_.resize(size_t(kB * (kT + 1)));
    for (size_t i = 0; i < tokens_.size(); ++i) tokens_[i] = int32_t((i * 7919 + 13) % 2048);
  }
  double steps_per_s(double budget_s) {
    step();
    const auto t0 = Clock::now();
    int64_t steps = 0;
    do {
      step();
      ++steps;
    } while (seconds_since(t0) < budget_s);
    return double(steps) / seconds_since(t0);
  }
  const loom::model::ModelConfig& config() const { return cfg_; }
  static constexpr int64_t kB = 2, kT = 96;
  // Steps per second of `steps` steps, each followed by a one-float all-reduce over `g`, as
  // the ranks of a training job meet at least once a step (the gradient reduction); every
  // member runs the same count. One step and one reduction warm up first.
  double coupled_steps_per_s(const loom::comm::ProcessGroup& g, int64_t steps) {
    float one = 1;
    auto sync = [&] { g.all_reduce(loom::comm::BufferRef(&one, 1, loom::DType::f32)).wait(); };
    step();
    sync();
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) {
      step();
      sync();
    }
    return double(steps) / seconds_since(t0);
  }

 private:
  void step() {
    gpt_->zero_grads();
    gpt_->forward_backward(tokens_.data(), kB, kT, 1.0f / float(kB * kT));
    loom::kernels::adamw_step(gpt_->weights(), gpt_->grads(), m_.data(), v_.data(),
                              gpt_->layout().total(), 1e-5f, 0.9f, 0.95f, 1e-8f, 0.1f, ++t_,
                              1.0f);
  }
  loom::model::ModelConfig cfg_;
  loom::MemoryPool pool_;
  std::unique_ptr<loom::model::Gpt> gpt_;
  std::vector<float> m_, v_;
  std::vector<int32_t> tokens_;
  int64_t t_ = 0;
};

// Triad bandwidth in bytes/s (3 arrays of 4-byte floats per element): the median pass.
double triad_bandwidth(double min_s) {
  const int64_t n = int64_t(1) << 23;  // 32 MiB per array: beyond any last-level cache here
  std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n), 1.0f), c(static_cast<size_t>(n), 2.0f);
  std::vector<double> t;
  const auto t0 = Clock::now();
  do {
    const auto t1 = Clock::now();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) a[size_t(i)] = b[size_t(i)] + 0.5f * c[size_t(i)];
    t.push_back(seconds_since(t1));
  } while (seconds_since(t0) < min_s || t.size() < 3);
  std::sort(t.begin(), t.end());
  return 3.0 * 4.0 * double(n) / t[t.size() / 2];
}

// loom's own kernels on one thread (cluster.h [kernels]), at the engine's shapes: rows of a
// micro-batch (2048 = 8 x 256 tokens), widths of a small model. `peak_core` is one core's f32
// matmul peak (the attention table's unit), `peak_core_bf16` its bf16 peak (the unit of bf16
// attention on the native bf16 kernel, measured where model::native_attention_available()).
loom::planner::KernelCosts measure_kernels(double budget_s, double peak_core, double peak_core_bf16,
                                           bool bf16_native,
                                           const std::function<void(const std::string&)>& progress) {
  namespace K = loom::kernels;
  loom::planner::KernelCosts k;
  k.measured = true;
  // Operand layouts: per (rows, out, in) weight product, x @ W^T (forward), dY @ W (input
  // gradient, the table's plain product) and dY^T @ X accumulating (weight gradient): the same
  // FLOPs; geometric mean of the rate ratios over three shapes.
  auto layouts = [&](bool bf16) {
    double lnt = 0, ltn = 0;
    const int64_t shapes[3][3] = {{2048, 256, 256}, {2048, 1024, 256}, {2048, 256, 1024}};
    for (const auto& sh : shapes) {
      const int64_t R = sh[0], O = sh[1], I = sh[2];
      std::vector<float> x(size_t(R * I), 0.5f), w(size_t(O * I), 0.25f), y(size_t(R * O), 0.1f),
          dx(size_t(R * I)), g(size_t(O * I));
      std::vector<loom::bf16> xb(bf16 ? x.size() : 0), wb(bf16 ? w.size() : 0),
          yb(bf16 ? y.size() : 0);
      auto mm = [&](const float* a, const loom::bf16* ab, const float* b, const loom::bf16* bb,
                    float* c, int64_t m, int64_t n, int64_t kk, bool ta, bool tb, bool acc) {
        if (bf16) K::matmul_bf16(ab, bb, c, m, n, kk, ta, tb, acc);
        else K::matmul_f32(a, b, c, m, n, kk, ta, tb, acc);
      };
      const double nt = median_call(budget_s, [&] {
        mm(x.data(), xb.data(), w.data(), wb.data(), y.data(), R, O, I, false, true, false);
      });
      const double nn = median_call(budget_s, [&] {
        mm(y.data(), yb.data(), w.data(), wb.data(), dx.data(), R, I, O, false, false, false);
      });
      const double tn = median_call(budget_s, [&] {
        mm(y.data(), yb.data(), x.data(), xb.data(), g.data(), O, I, R, true, false, true);
      });
      lnt += std::log(nn / nt) / 3;
      ltn += std::log(nn / tn) / 3;
    }
    return std::make_pair(std::min(10.0, std::exp(lnt)), std::min(10.0, std::exp(ltn)));
  };
  k.layout_f32 = layouts(false);
  k.layout_bf16 = bf16_native ? layouts(true) : k.layout_f32;
  progress(fmt::format("matmul layouts over dY @ W: f32 x @ W^T {:.3f}, dY^T @ X {:.3f}; bf16 "
                       "{:.3f}, {:.3f}",
                       k.layout_f32.first, k.layout_f32.second, k.layout_bf16.first,
                       k.layout_bf16.second));
  // Flash attention, causal, 8 heads of 64, one sequence, forward and backward (with its
  // preprocess), by sequence length.
  for (int64_t T : {64, 128, 256, 512, 1024}) {
    const int64_t NH = 8, HD = 64, W = NH * HD;
    std::vector<float> q(size_t(T * W)), kk(size_t(T * W)), v(size_t(T * W)), o(size_t(T * W)),
        lse(size_t(NH * T)), D(size_t(NH * T)), dq(size_t(T * W)), dk(size_t(T * W)),
        dv(size_t(T * W)), dout(size_t(T * W));
    for (size_t i = 0; i < q.size(); ++i) {  // varied values: exp() of real scores
      q[i] = float((i * 7919) % 997) / 997.0f - 0.5f;
      kk[i] = float((i * 104729) % 991) / 991.0f - 0.5f;
      v[i] = float((i * 31) % 89) / 89.0f;
      dout[i] = float((i * 17) % 83) / 83.0f - 0.5f;
    }
    loom::attention::AttentionShape s{};
    s.B = 1;
    s.Tq = s.Tk = T;
    s.NH = s.NKV = NH;
    s.HD = HD;
    s.q_stride = s.k_stride = s.v_stride = s.o_stride = W;
    s.causal = true;
    s.scale = 1.0f / 8.0f;
    const double fwd = median_call(budget_s / 2, [&] {
      loom::attention::flash_attention_forward(o.data(), lse.data(), q.data(), kk.data(), v.data(), s);
    });
    const double bwd = median_call(budget_s / 2, [&] {
      loom::attention::attention_backward_preprocess(D.data(), dout.data(), o.data(), s);
      loom::attention::flash_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(),
                                                q.data(), kk.data(), v.data(), lse.data(),
                                                D.data(), s);
    });
    const double each = double(T) * double(T) * double(HD), flops = each * double(NH) * 2;
    // One table point per direction: the fraction of `peak` the forward's two products (and the
    // backward's 2.5x that) reached.
    auto record = [&](double fwd_s, double bwd_s, double peak, loom::planner::EfficiencyTable& tf,
                      loom::planner::EfficiencyTable& tb) {
      const double ef = std::min(1.0, flops / (fwd_s * peak)),
                   eb = std::min(1.0, 2.5 * flops / (bwd_s * peak));
      tf.points.emplace_back(each / 1e9, ef);
      tb.points.emplace_back(each / 1e9, eb);
      return std::pair{ef, eb};
    };
    const auto [ef, eb] = record(fwd, bwd, peak_core, k.attention_fwd, k.attention_bwd);
    progress(fmt::format("flash attention T {} (8 x 64, causal): forward {:.3f} ms ({:.2f} of "
                         "peak), backward {:.3f} ms ({:.2f})",
                         T, fwd * 1e3, ef, bwd * 1e3, eb));
    if (!loom::model::native_attention_available() || peak_core_bf16 <= 0) continue;
    // bf16 training's attention (model/block.cpp): q, k, v (and dout) rounded to bf16, then the
    // native bf16 kernel (AMX or AVX512-BF16) with its packed operands in a workspace.
    std::vector<loom::bf16> q16(q.size()), k16(q.size()), v16(q.size()), g16(q.size());
    std::vector<float> ws(size_t(std::max(loom::attention::flash_attention_native_workspace_bytes(true, s),
                                          loom::attention::flash_attention_native_workspace_bytes(false, s)) /
                                     4 + 16));
    void* w = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 63) & ~uintptr_t(63));
    auto round_qkv = [&] {
      loom::convert_f32_to_bf16(q.data(), q16.data(), q.size());
      loom::convert_f32_to_bf16(kk.data(), k16.data(), q.size());
      loom::convert_f32_to_bf16(v.data(), v16.data(), q.size());
    };
    const double fwd16 = median_call(budget_s / 2, [&] {
      round_qkv();
      loom::attention::flash_attention_forward_bf16_native(o.data(), lse.data(), q16.data(),
                                                        k16.data(), v16.data(), s, w);
    });
    const double bwd16 = median_call(budget_s / 2, [&] {
      round_qkv();
      loom::convert_f32_to_bf16(dout.data(), g16.data(), q.size());
      loom::attention::attention_backward_preprocess(D.data(), g16.data(), o.data(), s);
      loom::attention::flash_attention_backward_bf16_native(dq.data(), dk.data(), dv.data(),
                                                         g16.data(), q16.data(), k16.data(),
                                                         v16.data(), lse.data(), D.data(), s, w);
    });
    const auto [ef16, eb16] =
        record(fwd16, bwd16, peak_core_bf16, k.attention_fwd_bf16, k.attention_bwd_bf16);
    progress(fmt::format("bf16 attention ({}) T {}: forward {:.3f} ms ({:.3f} of the bf16 "
                         "peak), backward {:.3f} ms ({:.3f})",
                         loom::attention::native_bf16_attention_backend(), T, fwd16 * 1e3, ef16,
                         bwd16 * 1e3, eb16));
  }
  // Elementwise kernels: nanoseconds per element on (2048, 256) rows, the activation on
  // (2048, 1024), all resident in cache as a micro-batch's activations are.
  const int64_t R = 2048, C = 256, F = 1024;
  const size_t RF_n = static_cast<size_t>(R * F), R_n = static_cast<size_t>(R),
               C_n = static_cast<size_t>(C), F_n = static_cast<size_t>(F);
  std::vector<float> a(RF_n, 0.3f), b(RF_n, 0.2f), c(RF_n, 0.1f), bias(F_n, 0.01f), mean(R_n),
      rstd(R_n), gw(C_n, 1.0f), gb(C_n, 0.0f), dgw(C_n), dgb(C_n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 101) / 50.0f - 1.0f;
  auto per = [&](double n, auto op) { return median_call(budget_s / 4, op) / n; };
  const double RC = double(R * C), RF = double(R * F);
  k.layernorm_fwd = per(RC, [&] {
    K::layernorm_forward(b.data(), mean.data(), rstd.data(), a.data(), gw.data(), gb.data(), R, C, 1e-5f);
  });
  k.layernorm_bwd = per(RC, [&] {
    K::layernorm_backward(c.data(), dgw.data(), dgb.data(), b.data(), a.data(), gw.data(),
                          mean.data(), rstd.data(), R, C);
  });
  k.bias_add = per(RC, [&] { K::bias_add_rows(b.data(), bias.data(), R, C); });
  k.add = per(RC, [&] { K::add_inplace(b.data(), c.data(), R * C); });
  k.bias_bwd = per(RC, [&] { K::bias_backward(bias.data(), b.data(), R, C); });
  k.zero = per(RC, [&] { std::fill(c.begin(), c.begin() + R * C, 0.0f); });
  // model::Activation order: gelu (tanh form), fast_gelu, gelu_erf.
  const K::GeluKind kinds[3] = {K::GeluKind::tanh, K::GeluKind::fast, K::GeluKind::erf};
  for (int i = 0; i < 3; ++i) {
    k.act_fwd[size_t(i)] = per(RF, [&] {
      K::bias_gelu_forward(b.data(), c.data(), bias.data(), R, F, kinds[i]);
    });
    k.act_bwd[size_t(i)] = per(RF, [&] {
      K::gelu_kind_backward(kinds[i], b.data(), b.data(), a.data(), R * F);
    });
  }
  // The fused head's own work per logit: its time less that of the products it runs (the head's
  // row blocks, model/head.h), each timed alone.
  {
    const int64_t N = 1024, V = 4096, Rb = loom::model::kHeadRowsPerBlock;
    std::vector<float> h(size_t(N * C), 0.01f), wte(size_t(V * C), 0.02f), dh(size_t(N * C)),
        dwte(size_t(V * C)), lg(size_t(Rb * V));
    for (size_t i = 0; i < h.size(); ++i) h[i] = float(i % 97) / 97.0f - 0.5f;
    for (size_t i = 0; i < wte.size(); ++i) wte[i] = float(i % 89) / 89.0f - 0.5f;
    std::vector<int32_t> targets(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) targets[size_t(i)] = int32_t((i * 37) % V);
    loom::MemoryPool pool;
    const double head = median_call(budget_s, [&] {
      K::cross_entropy_head(dh.data(), dwte.data(), nullptr, h.data(), wte.data(), targets.data(),
                            N, C, V, 1.0f / float(N), pool, Rb);
    });
    const double blocks = double(N / Rb);
    const double mm =
        blocks * (median_call(budget_s / 4, [&] {
                    K::matmul_f32(h.data(), wte.data(), lg.data(), Rb, V, C, false, true, false);
                  }) +
                  median_call(budget_s / 4, [&] {
                    K::matmul_f32(lg.data(), wte.data(), dh.data(), Rb, C, V, false, false, false);
                  }) +
                  median_call(budget_s / 4, [&] {
                    K::matmul_f32(lg.data(), h.data(), dwte.data(), V, C, Rb, true, false, true);
                  }));
    k.cross_entropy = std::max(0.0, head - mm) / double(N * V);
    progress(fmt::format("cross-entropy head {}x{}x{}: {:.2f} ms, its products {:.2f} ms", N, V,
                         C, head * 1e3, mm * 1e3));
  }
  // Optimizer per parameter: AdamW, the gradient's sum of squares (the norm) and its zeroing,
  // over 16M parameters (256 MB of weights, gradients and moments): the optimizer streams every
  // parameter once per step, after the step's activations have passed through the caches, so
  // its state comes from memory. (This CPU reports a 480 MiB L3 but AdamW on 64 MB already ran
  // at 0.59 ns per parameter and on 256 MB at 1.04, the rate a 5M-parameter model's optimizer
  // pass showed inside training: the cache a process gets is far smaller than the one reported.)
  {
    const size_t n = size_t(1) << 24;
    std::vector<float> w(n, 0.1f), g(n, 0.01f), m(n, 0.0f), vv(n, 0.0f);
    int64_t step = 0;
    k.optimizer = per(double(n), [&] {
      volatile double ss = K::sum_squares(g.data(), int64_t(n));
      (void)ss;
      K::adamw_step(w.data(), g.data(), m.data(), vv.data(), int64_t(n), 1e-4f, 0.9f, 0.95f,
                    1e-8f, 0.1f, ++step, 1.0f);
      std::fill(g.begin(), g.end(), 0.01f);  // zeroing the gradient (to a value: it is re-read)
    });
  }
  progress(fmt::format("ns per element: layernorm {:.2f} / {:.2f}, bias add {:.2f}, add {:.2f}, "
                       "bias grad {:.2f}, zero {:.2f}, gelu {:.2f} / {:.2f}, fast_gelu {:.2f} / "
                       "{:.2f}, gelu_erf {:.2f} / {:.2f}, cross-entropy {:.2f}, optimizer {:.2f}",
                       k.layernorm_fwd * 1e9, k.layernorm_bwd * 1e9, k.bias_add * 1e9, k.add * 1e9,
                       k.bias_bwd * 1e9, k.zero * 1e9, k.act_fwd[0] * 1e9, k.act_bwd[0] * 1e9,
                       k.act_fwd[1] * 1e9, k.act_bwd[1] * 1e9, k.act_fwd[2] * 1e9,
                       k.act_bwd[2] * 1e9, k.cross_entropy * 1e9, k.optimizer * 1e9));
  return k;
}

// Median seconds of `reps` calls of op on group g (every member calls).
template <class F>
double median_time(const loom::comm::ProcessGroup& g, int reps, F op) {
  std::vector<double> t;
  op();  // warm-up
  for (int i = 0; i < reps; ++i) {
    g.barrier().wait();
    const auto t0 = Clock::now();
    op();
    t.push_back(seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// A barrier that sleeps while it waits, so that ranks not being measured leave the cores to the
// ones that are (MPI's own waits poll and would take a core each).
void sleepy_barrier(const loom::comm::ProcessGroup& g) {
  const loom::comm::Work w = g.barrier();
  while (!w.test()) usleep(2000);
  w.wait();
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  return buf;
}

}  // namespace

void loom::cli::calibrate_to_file(const std::string& out, bool quick,
                                  const loom::comm::ProcessGroup& world) {
  const auto start = Clock::now();
  const int W = world.valid() ? world.size() : 1;
  const bool root = !world.valid() || world.rank() == 0;
  auto progress = [&](const std::string& s) {
    if (root) std::fprintf(stderr, "[calibrate %5.1f s] %s\n", seconds_since(start), s.c_str());
  };
  Cluster c;
  c.name = "this machine (loom calibrate)";
  c.nodes = 1;
  c.cpu_model = loom::planner::this_cpu_model();
  c.calibrated = today();
  c.host_cores = loom::available_cores();
  // Ranks on this host share its cores; allow as many ranks as a plan may ask for.
  c.devices_per_node = 64;
  c.bf16_emulated = loom::model::bf16_emulated();
  const double min_s = quick ? 0.05 : 0.25;  // seconds per measurement
  double alone_256 = 0;                       // root: one-thread 256^3 rate alone

  if (root) {
    // Compute: one thread, as each rank runs when ranks fill the cores (core/threads.h), scaled
    // to the host by its cores (the cost model divides the host among the ranks again).
    loom::set_num_threads(1);
    const bool native = loom::kernels::bf16_matmul_path() == loom::kernels::Bf16MatmulPath::native;
    struct Shape { int64_t m, n, k; };
    std::vector<Shape> shapes;
    for (int64_t s : {16, 32, 64, 128, 256, 512, 1024}) shapes.push_back({s, s, s});
    // Row-heavy products as the blocks run them (rows N = b*T, widths of a small model).
    for (int64_t w : {64, 256}) shapes.push_back({2048, w, w});
    std::vector<std::pair<double, double>> f32_pts, bf16_pts;  // (flops, rate)
    for (const Shape& s : shapes) {
      const double fl = 2.0 * double(s.m * s.n * s.k);
      double best = 0;
      const double r = matmul_rate(s.m, s.n, s.k, false, min_s, &best);
      f32_pts.emplace_back(fl, r);
      progress(fmt::format("matmul f32 {}x{}x{}: {:.2f} GFLOP/s (median call; fastest {:.2f})",
                           s.m, s.n, s.k, r / 1e9, best / 1e9));
      if (native) {
        const double rb = matmul_rate(s.m, s.n, s.k, true, min_s);
        bf16_pts.emplace_back(fl, rb);
        progress(fmt::format("matmul bf16 {}x{}x{}: {:.2f} GFLOP/s", s.m, s.n, s.k, rb / 1e9));
      }
    }
    // Emulated bf16 runs the f32 kernel on rounded values (model/stage.h): the same table.
    if (!native) bf16_pts = f32_pts;
    auto table = [](std::vector<std::pair<double, double>> pts, double& peak) {
      std::sort(pts.begin(), pts.end());
      peak = 0;
      for (auto [f, r] : pts) peak = std::max(peak, r);
      loom::planner::EfficiencyTable t;
      for (auto [f, r] : pts) {
        const double g = f / 1e9;
        if (!t.points.empty() && g <= t.points.back().first) {  // same size twice: keep the best
          t.points.back().second = std::max(t.points.back().second, r / peak);
          continue;
        }
        t.points.emplace_back(g, std::min(1.0, r / peak));
      }
      return t;
    };
    // The concurrency table's unit: one thread alone on 256^3 products, the best of three
    // windows like every concurrency entry below, measured after the sweep has warmed the core
    // (a single first window read ~1.6x low here and made every rank look 1.6x faster than it
    // is: the cost model then predicted half the measured step times on a quiet host).
    for (int w = 0; w < 3; ++w) alone_256 = std::max(alone_256, matmul_throughput(min_s));
    c.eff_f32 = table(f32_pts, c.peak_flops_f32);
    c.eff_bf16 = table(bf16_pts, c.peak_flops_bf16);
    c.peak_flops_f32 *= c.host_cores;
    c.peak_flops_bf16 *= c.host_cores;
    // Kernel-call overhead: the median time of an 8x8x8 product (1 kFLOP: all dispatch).
    double call_s = 0;
    (void)matmul_rate(8, 8, 8, false, min_s / 4, nullptr, &call_s);
    c.op_overhead_s = call_s;
    progress(fmt::format("kernel call overhead: {:.2f} us", call_s * 1e6));
    c.memory_bandwidth_Bps = triad_bandwidth(min_s / 3) * c.host_cores;  // one thread x cores
    progress(fmt::format("vector triad: {:.2f} GB/s", c.memory_bandwidth_Bps / 1e9));
    c.memory_bytes = int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGE_SIZE));
    c.kernels = measure_kernels(min_s, c.peak_flops_f32 / c.host_cores,
                                c.peak_flops_bf16 / c.host_cores, native, progress);
  }
  if (world.valid()) sleepy_barrier(world);  // the others slept through the compute timings

  // Concurrency: p ranks (each with the engine's max(1, cores/p) threads) computing 256^3
  // products at once; each one's throughput in cores' worth of the one-thread throughput alone.
  // This sees oversubscription and whatever else loads the host now. Then the same for a
  // memory-bound pass (stream_throughput), in units of one thread's stream alone.
  // And for loom's own training step (StepProbe), in units of one thread's steps alone, the
  // ranks meeting once a step.
  // The step probe's groups: ranks 0..p-1 for p >= 2, split by every rank before the root
  // measures alone (a blocking split spins in MPI and would take the cores it measures).
  std::vector<loom::comm::ProcessGroup> step_groups(size_t(W + 1));
  if (world.valid()) {
    for (int p = 2; p <= W; ++p) {
      std::vector<int> members(static_cast<size_t>(p));
      for (int i = 0; i < p; ++i) members[size_t(i)] = i;
      step_groups[size_t(p)] = world.split({members}, fmt::format("calib-step{}", p));
    }
  }
  double alone_stream = 0, alone_step = 0;
  StepProbe probe;
  if (root) {
    loom::set_num_threads(1);
    for (int w = 0; w < 3; ++w) alone_stream = std::max(alone_stream, stream_throughput(min_s));
    for (int w = 0; w < 3; ++w) alone_step = std::max(alone_step, probe.steps_per_s(min_s));
    // The step table's unit (one thread's steps alone) in cores of the cost model's price: the
    // probe's one-core price by the figures above over its measured time (cluster.h step_unit).
    const double price = loom::planner::one_core_step_price(
        probe.config(), c, StepProbe::kB, StepProbe::kT, loom::model::Precision::f32);
    c.step_unit = std::clamp(price * alone_step, 0.1, 10.0);
    c.step_unit_read = true;  // the step table then prices every rank count
    progress(fmt::format("training step probe alone: {:.2f} ms measured, {:.2f} ms priced by the "
                         "figures above (step_unit {:.3f})",
                         1e3 / alone_step, price * 1e3, c.step_unit));
  }
  // The steps a coupled window runs at each p, the root's count for every member (each rank's
  // own cores and quick flag could differ, and a count that differs between members would leave
  // them making different numbers of collectives): its one-thread rate alone times p's share of
  // the cores (cores / p threads each below p = cores, a time slice above), over min_s.
  std::vector<double> step_counts(static_cast<size_t>(W + 1), 0.0);
  if (root)
    for (int p = 2; p <= W; ++p)
      step_counts[size_t(p)] =
          std::max(3.0, std::floor(alone_step * min_s * double(c.host_cores) / double(p)));
  if (world.valid()) {
    // The others wait asleep while the root measures alone.
    const loom::comm::Work w =
        world.all_reduce(loom::comm::BufferRef(step_counts.data(), W + 1, loom::DType::f64));
    while (!w.test()) usleep(2000);
    w.wait();
  }
  for (int p = 1; p <= W; ++p) {
    // products, then streams, then steps
    std::vector<double> rates(static_cast<size_t>(3 * W), 0.0);
    const int me = world.valid() ? world.rank() : 0;
    // The median of three windows per rank: robust to a burst of outside load in one window,
    // and not biased up as the best window is (ranks sharing cores get uneven slices from one
    // window to the next, so summing each rank's best window counts slices the others had in
    // theirs). On the quiet 2-core development host both read about the same (step table 0.45
    // and 0.21 at 4 and 8 ranks; a run with the best window an hour earlier read 0.51 and 0.25),
    // while 4 and 8 one-rank `loom train` runs of codegeex-small at once ran at 0.40 and 0.18 of
    // their speed alone (docs/planner.md, session 12: not explained by the probe's size).
    auto median3 = [](auto&& window) {
      double r[3];
      for (double& x : r) x = window();
      std::sort(r, r + 3);
      return r[1];
    };
    // One rank alone (p = 1: the root, all the cores' threads) is timed in pairs, each window
    // of its threads right after one of a single thread, and the entry is the median pair's
    // ratio (scaled by the unit, which the division below takes out again): the host's memory
    // reads switch rate from one minute to the next (Zen 4 host, session 17), and a unit
    // measured a minute before read 28-45 GB/s for one thread's stream, so the one-rank memory
    // entry read 2.05-2.89 streams (two threads) across calibrations.
    const int threads = std::max(1, c.host_cores / p);
    auto entry = [&](auto&& window, double unit) {
      if (p >= 2 || threads == 1) return median3(window);
      return unit * median3([&] {
        loom::set_num_threads(1);
        const double one = window();
        loom::set_num_threads(threads);
        return window() / one;
      });
    };
    if (me < p) {
      loom::set_num_threads(threads);
      rates[size_t(me)] = entry([&] { return matmul_throughput(min_s); }, alone_256);
    }
    if (world.valid()) sleepy_barrier(world);
    if (me < p)
      rates[size_t(W + me)] = entry([&] { return stream_throughput(min_s); }, alone_stream);
    if (world.valid()) sleepy_barrier(world);
    // p >= 2 probes meet once a step (StepProbe::coupled_steps_per_s): on the 2-core Zen 4 host
    // that read 4% less at 8 ranks than 8 independent ones (0.235 against 0.245 of a step alone;
    // docs/planner.md, session 17), which the validated plans showed as compute priced low.
    if (me < p) {
      const int64_t n = int64_t(step_counts[size_t(p)]);
      rates[size_t(2 * W + me)] =
          p >= 2 ? median3([&] { return probe.coupled_steps_per_s(step_groups[size_t(p)], n); })
                 : entry([&] { return probe.steps_per_s(min_s); }, alone_step);
    }
    if (world.valid()) {
      // Ranks not computing wait asleep (MPI's own wait polls and would take a core).
      const loom::comm::Work w =
          world.all_reduce(loom::comm::BufferRef(rates.data(), 3 * W, loom::DType::f64));
      while (!w.test()) usleep(2000);
      w.wait();
    }
    if (root) {
      double sum = 0, sum_stream = 0, sum_step = 0;
      for (int i = 0; i < p; ++i) {
        sum += rates[size_t(i)];
        sum_stream += rates[size_t(W + i)];
        sum_step += rates[size_t(2 * W + i)];
      }
      c.concurrency.emplace_back(p, sum / p / alone_256);
      c.memory_concurrency.emplace_back(p, sum_stream / p / alone_stream);
      c.step_concurrency.emplace_back(p, sum_step / p / alone_step);
      progress(fmt::format("{} rank(s) at once, each: {:.2f} cores' worth computing, {:.2f} "
                           "one-thread streams reading memory ({:.1f} GB/s alone), {:.2f} "
                           "one-thread training steps ({:.1f} steps/s alone)",
                           p, c.concurrency.back().second, c.memory_concurrency.back().second,
                           alone_stream / 1e9, c.step_concurrency.back().second, alone_step));
    }
  }

  // Links: one shared-memory level; inter is the same (one node).
  loom::planner::LinkLevel link;
  link.latency_s = 5e-6;
  link.bandwidth_Bps = 1e9;
  link.efficiency = 1;
  if (W >= 2) {
    loom::set_num_threads(std::max(1, c.host_cores / W));
    const int reps = quick ? 5 : 11;
    const int64_t small = 16, large = int64_t(1) << 20;  // floats: 64 B and 4 MiB buffers
    struct Fit { double lat_sum = 0, bw_sum = 0; int n = 0; };
    // [collective][size]: median seconds per group size.
    std::vector<std::array<std::array<double, 2>, 4>> t(size_t(W + 1));
    for (int p = 2; p <= W; ++p) {
      std::vector<int> members(static_cast<size_t>(p));
      for (int i = 0; i < p; ++i) members[size_t(i)] = i;
      std::vector<std::vector<int>> parts = {members};
      const loom::comm::ProcessGroup g = world.split(parts, fmt::format("calib{}", p));
      if (g.valid()) {
        for (int si = 0; si < 2; ++si) {
          const int64_t n = si ? large : small;  // the full buffer, elements
          std::vector<float> full(size_t(n * p), 1.0f), part(size_t(n), 1.0f);
          using loom::DType;
          t[size_t(p)][0][size_t(si)] = median_time(g, reps, [&] {
            g.all_reduce(loom::comm::BufferRef(full.data(), n, DType::f32)).wait();
          });
          std::vector<float> blk(size_t(n / p + 1), 1.0f), whole(size_t((n / p + 1) * p));
          const int64_t b = std::max<int64_t>(1, n / p);
          t[size_t(p)][1][size_t(si)] = median_time(g, reps, [&] {
            g.all_gather(loom::comm::BufferRef(blk.data(), b, DType::f32),
                         loom::comm::BufferRef(whole.data(), b * p, DType::f32)).wait();
          });
          t[size_t(p)][2][size_t(si)] = median_time(g, reps, [&] {
            g.reduce_scatter(loom::comm::BufferRef(whole.data(), b * p, DType::f32),
                             loom::comm::BufferRef(blk.data(), b, DType::f32)).wait();
          });
          // Send: rank 0 -> 1, one way (the others only take part in the barrier).
          t[size_t(p)][3][size_t(si)] = median_time(g, reps, [&] {
            if (g.rank() == 0) g.send(loom::comm::BufferRef(full.data(), n, DType::f32), 1, 7);
            if (g.rank() == 1) g.recv(loom::comm::BufferRef(full.data(), n, DType::f32), 0, 7);
          });
        }
        if (g.rank() == 0)
          progress(fmt::format("collectives at {} ranks: all_reduce {:.1f} us / {:.2f} ms (64 B / "
                               "4 MiB), all_gather {:.1f} us / {:.2f} ms, send {:.1f} us / {:.2f} ms",
                               p, t[size_t(p)][0][0] * 1e6, t[size_t(p)][0][1] * 1e3,
                               t[size_t(p)][1][0] * 1e6, t[size_t(p)][1][1] * 1e3,
                               t[size_t(p)][3][0] * 1e6, t[size_t(p)][3][1] * 1e3));
      }
      sleepy_barrier(world);
    }
    if (root) {
      // Alpha, beta from the all-gather (factors [1, 1] by definition), averaged over p:
      // t_small = (p-1) alpha, t_large - t_small = (p-1)/p * bytes / beta.
      const double bytes = double(large) * 4;
      double a = 0, inv_b = 0;
      for (int p = 2; p <= W; ++p) {
        a += t[size_t(p)][1][0] / (p - 1);
        inv_b += std::max(1e-12, t[size_t(p)][1][1] - t[size_t(p)][1][0]) / ((p - 1.0) / p * bytes);
      }
      a /= (W - 1);
      inv_b /= (W - 1);
      link.latency_s = a;
      link.bandwidth_Bps = 1.0 / inv_b;
      for (int ci : {0, 2, 3}) {
        double fl = 0, fb = 0;
        for (int p = 2; p <= W; ++p) {
          const double steps = ci == 3 ? 1.0 : p - 1.0, share = ci == 3 ? 1.0 : (p - 1.0) / p;
          fl += t[size_t(p)][size_t(ci)][0] / (steps * a);
          fb += std::max(1e-12, t[size_t(p)][size_t(ci)][1] - t[size_t(p)][size_t(ci)][0]) /
                (share * bytes * inv_b);
        }
        link.factors[size_t(ci)] = {fl / (W - 1), fb / (W - 1)};
      }
      link.factors[1] = {1, 1};
    }
  } else {
    progress("not under mpirun: link figures are placeholders (alpha 5 us, beta 1 GB/s); run "
             "`mpirun -np 4 loom calibrate` to measure the collectives");
  }
  if (root) {
    c.intra = link;
    c.inter = link;
    std::string text = fmt::format(
        "# Written by `loom calibrate` on {} ({} cores, {} MPI ranks measured). Every figure is a\n"
        "# measurement of this host: peaks are the best one-thread matmul rate x cores; efficiency\n"
        "# is each size's rate over that peak; memory_bandwidth_GBps a triad; links an\n"
        "# alpha-beta fit of the collectives at 2..{} ranks (all_gather defines alpha and beta).\n"
        "# Ranks share the host's cores ([host] cores): the cost model divides these figures\n"
        "# among the ranks. Re-run after changing the machine: loom calibrate --out {}\n",
        c.calibrated, c.host_cores, W, W, out);
    text += c.to_toml();
    std::ofstream f(out);
    LOOM_CHECK(f.good(), "cannot write '{}': check the directory exists and is writable", out);
    f << text;
    progress(fmt::format("wrote {}", out));
  }
}

namespace {

void run_calibrate(const std::string& out, bool quick, loom::cli::Context& ctx) {
  std::unique_ptr<loom::comm::MpiRuntime> mpi;
  loom::comm::ProcessGroup world;
  if (loom::cli::launched_by_mpi()) {
    mpi = std::make_unique<loom::comm::MpiRuntime>(nullptr, nullptr);
    world = loom::comm::ProcessGroup::world();
  }
  loom::cli::calibrate_to_file(out, quick, world);
  ctx.exit_code = 0;
}

void add_calibrate(CLI::App& root, loom::cli::Context& ctx) {
  auto out = std::make_shared<std::string>("configs/clusters/local.toml");
  auto quick = std::make_shared<bool>(false);
  CLI::App* sub = root.add_subcommand(
      "calibrate",
      "measure this machine (matmul, loom's own kernels, bandwidth, ranks sharing the host, MPI "
      "collectives) into a cluster file");
  sub->add_option("--out", *out, "cluster file to write (default configs/clusters/local.toml)");
  sub->add_flag("--quick", *quick, "shorter timing windows (tests)");
  sub->callback([out, quick, &ctx] { run_calibrate(*out, *quick, ctx); });
}

}  // namespace

LOOM_REGISTER_COMMAND(calibrate, add_calibrate);
