// bench/attention/bench_attention.cpp: flash attention forward + backward at one sequence length.
//
// Glossary: B batch, T sequence (Tq = Tk), NH heads, HD head dim.
// Prints one JSON line: seconds per forward, backward (preprocess + backward) and both, achieved
// GFLOP/s under the usual convention (causal forward 2*B*T^2*NH*HD, backward 2.5x the forward)
// and as a fraction of a measured oneDNN sgemm peak, the bytes of the inputs/outputs (pool, by
// category) and the peak resident memory growth during the kernels (workspace + page faults).
// Usage: bench_attention --T 4096 [--B 1] [--heads 12] [--hd 64] [--iters 3] [--noncausal]
//                        [--dtype f32|bf16] [--two-pass]
// --dtype bf16 runs the native bf16 kernels (q, k, v, dout in bf16, rounded from the same f32
// inputs; impl "loom_flash_bf16_native", "backend" amx or avx512_bf16), or prints a "skipped" line
// where this CPU or OS has neither AMX-BF16 nor AVX512-BF16. --two-pass forces the native
// kernel's two-pass backward (the same bits as its one-pass one, the default where B * heads
// gives every thread two tasks).
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "attention/flash_attention.h"
#include "core/memory_pool.h"
#include "core/rng.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Peak resident set size of this process so far, in bytes (ru_maxrss is in KiB on Linux).
int64_t peak_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_maxrss) * 1024;
}

// f32 GEMM peak on this machine: best of a few 1536^3 oneDNN sgemm calls.
double sgemm_peak_gflops() {
  const int64_t n = 1536;
  std::vector<float> a(size_t(n * n), 0.5f), b(size_t(n * n), 0.25f), c(size_t(n * n));
  double best = 1e30;
  for (int it = 0; it < 4; ++it) {
    auto t0 = Clock::now();
    dnnl_sgemm('N', 'N', n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * double(n) * n * n / best / 1e9;
}

struct Buffer {
  loom::MemoryPool& pool;
  loom::MemCategory cat;
  size_t bytes;
  float* p;
  Buffer(loom::MemoryPool& pl, int64_t n, loom::MemCategory c)
      : pool(pl), cat(c), bytes(size_t(n) * 4), p(static_cast<float*>(pl.allocate(bytes, c))) {}
  ~Buffer() { pool.release(p, bytes, cat); }
};

}  // namespace

int main(int argc, char** argv) {
  int64_t B = 1, T = 1024, NH = 12, HD = 64, iters = 3;
  bool causal = true, two_pass = false;
  std::string dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> int64_t {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", a.c_str());
        std::exit(2);
      }
      return std::atoll(argv[++i]);
    };
    if (a == "--T") T = next();
    else if (a == "--B") B = next();
    else if (a == "--heads") NH = next();
    else if (a == "--hd") HD = next();
    else if (a == "--iters") iters = next();
    else if (a == "--noncausal") causal = false;
    else if (a == "--two-pass") two_pass = true;
    else if (a == "--dtype" && i + 1 < argc) dtype = argv[++i];
    else {
      std::fprintf(stderr, "unknown argument %s; see the usage line in bench_attention.cpp\n",
                   a.c_str());
      return 2;
    }
  }
  if (dtype != "f32" && dtype != "bf16") {
    std::fprintf(stderr, "--dtype %s: use f32 or bf16\n", dtype.c_str());
    return 2;
  }
  const bool bf16 = dtype == "bf16";
  if (bf16 && !loom::attention::native_bf16_attention_usable()) {
    std::printf("{\"bench\":\"attention\",\"impl\":\"loom_flash_bf16_native\",\"dtype\":\"bf16\","
                "\"T\":%lld,\"skipped\":\"this CPU or OS has neither AMX-BF16 tiles nor "
                "AVX512-BF16\"}\n",
                (long long)T);
    return 0;
  }
  using loom::MemCategory;
  loom::MemoryPool pool;
  const int64_t n = B * T * NH * HD, nl = B * NH * T;
  Buffer q(pool, n, MemCategory::activations), k(pool, n, MemCategory::activations),
      v(pool, n, MemCategory::activations), out(pool, n, MemCategory::activations),
      lse(pool, nl, MemCategory::activations), dout(pool, n, MemCategory::grads),
      D(pool, nl, MemCategory::workspace), dq(pool, n, MemCategory::grads),
      dk(pool, n, MemCategory::grads), dv(pool, n, MemCategory::grads);
  loom::rng_fill_normal(q.p, n, 0.0f, 1.0f, 1, 1, 0);
  loom::rng_fill_normal(k.p, n, 0.0f, 1.0f, 1, 2, 0);
  loom::rng_fill_normal(v.p, n, 0.0f, 1.0f, 1, 3, 0);
  loom::rng_fill_normal(dout.p, n, 0.0f, 1.0f, 1, 4, 0);
  std::memset(out.p, 0, size_t(n) * 4);
  std::memset(lse.p, 0, size_t(nl) * 4);
  std::memset(D.p, 0, size_t(nl) * 4);
  std::memset(dq.p, 0, size_t(n) * 4);
  std::memset(dk.p, 0, size_t(n) * 4);
  std::memset(dv.p, 0, size_t(n) * 4);

  // bf16 copies of the inputs (counted in the pool beside the f32 ones).
  auto to_bf16 = [&](const Buffer& x) {
    auto* p = static_cast<loom::bf16*>(pool.allocate(size_t(n) * 2, MemCategory::activations));
    for (int64_t i = 0; i < n; ++i) p[i] = loom::f32_to_bf16(x.p[i]);
    return p;
  };
  loom::bf16 *qb = nullptr, *kb = nullptr, *vb = nullptr, *gb = nullptr;
  if (bf16) {
    qb = to_bf16(q);
    kb = to_bf16(k);
    vb = to_bf16(v);
    gb = to_bf16(dout);
  }

  const int64_t rss_before = peak_rss_bytes();  // inputs allocated and touched

  loom::attention::AttentionShape s{B, T, T, NH, NH, HD, NH * HD, NH * HD, NH * HD, NH * HD,
                                    causal, 0, 0, float(1.0 / std::sqrt(double(HD)))};
  double best_fwd = 1e30, best_bwd = 1e30, best_total = 1e30;
  for (int64_t it = 0; it < iters + 1; ++it) {  // the first round warms up
    auto t0 = Clock::now();
    if (bf16)
      loom::attention::flash_attention_forward_bf16_native(out.p, lse.p, qb, kb, vb, s);
    else
      loom::attention::flash_attention_forward(out.p, lse.p, q.p, k.p, v.p, s);
    const double tf = seconds_since(t0);
    auto t1 = Clock::now();
    if (bf16) {
      loom::attention::attention_backward_preprocess(D.p, gb, out.p, s);
      loom::attention::flash_attention_backward_bf16_native(
          dq.p, dk.p, dv.p, gb, qb, kb, vb, lse.p, D.p, s, nullptr,
          loom::attention::Bf16Backend::best, /*fused=*/!two_pass);
    } else {
      loom::attention::attention_backward_preprocess(D.p, dout.p, out.p, s);
      loom::attention::flash_attention_backward(dq.p, dk.p, dv.p, dout.p, q.p, k.p, v.p, lse.p,
                                                D.p, s);
    }
    const double tb = seconds_since(t1);
    if (it == 0) continue;
    best_fwd = std::min(best_fwd, tf);
    best_bwd = std::min(best_bwd, tb);
    best_total = std::min(best_total, tf + tb);
  }
  const double fwd_flop = 4.0 * double(B) * T * T * NH * HD * (causal ? 0.5 : 1.0);
  const double total_flop = 3.5 * fwd_flop;
  const int64_t extra = peak_rss_bytes() - rss_before;  // workspace, before the sgemm probe
  const double peak = sgemm_peak_gflops();
  std::printf(
      "{\"bench\":\"attention\",\"impl\":\"%s\",\"dtype\":\"%s\",\"B\":%lld,\"T\":%lld,\"heads\":%lld,"
      "\"hd\":%lld,\"causal\":%s,\"threads\":%d,\"fwd_s\":%.6f,\"bwd_s\":%.6f,\"fwd_bwd_s\":%.6f,"
      "\"fwd_gflops\":%.1f,\"fwd_bwd_gflops\":%.1f,\"sgemm_peak_gflops\":%.1f,"
      "\"fwd_bwd_frac_of_peak\":%.3f,\"tokens_per_s\":%.1f,\"tensor_bytes\":%lld,"
      "\"pool_peaks\":%s,\"extra_rss_bytes\":%lld,\"peak_rss_bytes\":%lld,\"backend\":\"%s\","
      "\"backward\":\"%s\"}\n",
      bf16 ? "loom_flash_bf16_native" : "loom_flash", dtype.c_str(), (long long)B, (long long)T,
      (long long)NH, (long long)HD, causal ? "true" : "false",
      omp_get_max_threads(), best_fwd, best_bwd, best_total, fwd_flop / best_fwd / 1e9,
      total_flop / best_total / 1e9, peak, total_flop / best_total / 1e9 / peak,
      double(B * T) / best_total, (long long)pool.peak_total(), pool.peaks_json().c_str(),
      (long long)extra, (long long)peak_rss_bytes(),
      bf16 ? loom::attention::native_bf16_attention_backend() : "f32",
      bf16 && two_pass ? "two_pass" : "default");
  for (loom::bf16* b : {qb, kb, vb, gb})
    if (b) pool.release(b, size_t(n) * 2, MemCategory::activations);
  return 0;
}
