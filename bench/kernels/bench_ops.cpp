// bench/kernels/bench_ops.cpp: the non-matmul kernels at GPT-2 124M sizes (batch 4 x 256).
//
// Glossary: N = B*T = 1024 rows, C = 768, V = 50257, 4C = 3072.
// Prints one JSON line per kernel: median milliseconds, effective GB/s over the bytes the kernel
// must touch, and for the fused LM head the GFLOP/s of its three products and the pool's
// workspace peak. Usage: bench_kernels_ops [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "core/dtype.h"
#include "core/memory_pool.h"
#include "core/rng.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/layernorm.h"

using namespace loom;

namespace {

double median_ms(const std::function<void()>& f, int reps) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<float> randn(int64_t n, uint64_t seed, float std) {
  std::vector<float> v(static_cast<size_t>(n));
  rng_fill_normal(v.data(), n, 0.0f, std, seed, 0, 0);
  return v;
}

void report(const char* name, double ms, double bytes) {
  std::printf("{\"bench\":\"%s\",\"ms\":%.3f,\"gbps\":%.1f}\n", name, ms, bytes / (ms * 1e-3) * 1e-9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int reps = quick ? 3 : 7;
  const int64_t N = 1024, C = 768, V = 50257, F = 4 * C;

  {  // LayerNorm forward + backward on (N, C)
    auto x = randn(N * C, 1, 1.0f), w = randn(C, 2, 1.0f), b = randn(C, 3, 1.0f);
    auto dout = randn(N * C, 4, 1.0f);
    std::vector<float> out(N * C), mean(N), rstd(N), dx(N * C), dw(C), db(C);
    double f = median_ms([&] { kernels::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f); }, reps * 5);
    report("layernorm_forward", f, 2.0 * N * C * 4);
    double bw = median_ms([&] { kernels::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C); }, reps * 5);
    report("layernorm_backward", bw, 4.0 * N * C * 4);
  }
  {  // GELU on the MLP hidden (N, 4C)
    auto x = randn(N * F, 5, 2.0f), dout = randn(N * F, 6, 1.0f);
    std::vector<float> out(N * F), dx(N * F);
    report("gelu_forward", median_ms([&] { kernels::gelu_forward(out.data(), x.data(), N * F); }, reps * 5), 2.0 * N * F * 4);
    report("gelu_backward", median_ms([&] { kernels::gelu_backward(dx.data(), dout.data(), x.data(), N * F); }, reps * 5), 3.0 * N * F * 4);
  }
  {  // AdamW on 16M parameters
    const int64_t P = 16 << 20;
    std::vector<float> p(P, 0.01f), g(P, 1e-3f), m(P, 0.0f), v(P, 0.0f);
    int64_t step = 0;
    double ms = median_ms([&] { kernels::adamw_step(p.data(), g.data(), m.data(), v.data(), P, 6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, ++step, 1.0f); }, reps);
    report("adamw_step_16M", ms, 7.0 * P * 4);
  }
  {  // Fused LM head + cross-entropy, f32 and bf16, two block sizes
    auto h = randn(N * C, 7, 1.0f), wte = randn(V * C, 8, 0.02f);
    std::vector<int32_t> targets(N);
    for (int64_t i = 0; i < N; ++i) targets[size_t(i)] = int32_t(rng_u64(9, 0, uint64_t(i)) % uint64_t(V));
    std::vector<bf16> hb(N * C), wb(V * C);
    convert_f32_to_bf16(h.data(), hb.data(), hb.size());
    convert_f32_to_bf16(wte.data(), wb.data(), wb.size());
    std::vector<float> dh(N * C), dwte(V * C, 0.0f);
    const double flops = 3.0 * 2.0 * double(N) * double(V) * double(C);  // logits, dh, dwte
    for (int64_t rpb : {int64_t(64), int64_t(256)}) {
      for (bool bf : {false, true}) {
        MemoryPool pool;
        double ms = median_ms([&] {
          if (bf) kernels::cross_entropy_head_bf16(dh.data(), dwte.data(), nullptr, hb.data(), wb.data(), targets.data(), N, C, V, 1.0f / N, pool, rpb);
          else kernels::cross_entropy_head(dh.data(), dwte.data(), nullptr, h.data(), wte.data(), targets.data(), N, C, V, 1.0f / N, pool, rpb);
        }, quick ? 1 : 3);
        std::printf("{\"bench\":\"cross_entropy_head\",\"dtype\":\"%s\",\"rows_per_block\":%ld,\"ms\":%.1f,\"gflops\":%.1f,\"workspace_peak_bytes\":%ld}\n",
                    bf ? "bf16" : "f32", long(rpb), ms, flops / (ms * 1e-3) * 1e-9, long(pool.peak(MemCategory::workspace)));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
