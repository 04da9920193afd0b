// bench/kernels/bench_matmul.cpp: matmul_f32 / matmul_bf16 throughput on the GPT-2 124M shapes.
//
// Prints one JSON line per (shape, transposes, dtype): milliseconds per call (median of repeats),
// GFLOP/s and the fraction of the measured 2048^3 peak. Because the development machines are
// shared, it also reports "cpu_gflops": flops / (process CPU seconds / threads), the rate the
// call would have with its threads' cores to itself (a lower bound: OpenMP spin-waits count as
// CPU time). Usage: bench_kernels_matmul [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include <omp.h>
#include <time.h>

#include "core/dtype.h"
#include "kernels/cpu/matmul.h"

using namespace loom;

namespace {

struct Case {
  const char* name;
  int64_t M, N, K;
  bool ta, tb, acc;
};

double process_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Returns the median wall seconds per call; *cpu_per_call gets process CPU seconds per call.
double time_case(const Case& c, bool bf16, double min_seconds, double* cpu_per_call) {
  size_t a_n = size_t(c.M * c.K), b_n = size_t(c.K * c.N), c_n = size_t(c.M * c.N);
  std::vector<float> af(a_n, 0.01f), bf(b_n, 0.02f), out(c_n, 0.0f);
  std::vector<loom::bf16> ah(bf16 ? a_n : 0, f32_to_bf16(0.01f)), bh(bf16 ? b_n : 0, f32_to_bf16(0.02f));
  auto once = [&] {
    if (bf16) kernels::matmul_bf16(ah.data(), bh.data(), out.data(), c.M, c.N, c.K, c.ta, c.tb, c.acc);
    else kernels::matmul_f32(af.data(), bf.data(), out.data(), c.M, c.N, c.K, c.ta, c.tb, c.acc);
  };
  once();
  once();
  std::vector<double> times;
  using clock = std::chrono::steady_clock;
  auto start = clock::now();
  double cpu0 = process_cpu_seconds();
  while (times.size() < 5 ||
         std::chrono::duration<double>(clock::now() - start).count() < min_seconds) {
    auto t0 = clock::now();
    once();
    times.push_back(std::chrono::duration<double>(clock::now() - t0).count());
  }
  *cpu_per_call = (process_cpu_seconds() - cpu0) / double(times.size());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  double min_s = quick ? 0.1 : 0.5;
  // GPT-2 124M at batch 4 x 256 (BT = 1024 rows, C = 768): qkv, attn proj, fc, fc proj, and for
  // each the two backward products dX = dY @ W^T and dW += X^T @ dY (weights stored (in, out)).
  std::vector<Case> cases = {
      {"square2048", 2048, 2048, 2048, false, false, false},
  };
  const int64_t BT = 1024;
  struct Lin { const char* name; int64_t in, out; };
  for (Lin l : {Lin{"qkv", 768, 2304}, Lin{"attproj", 768, 768}, Lin{"fc", 768, 3072},
                Lin{"fcproj", 3072, 768}}) {
    cases.push_back({l.name, BT, l.out, l.in, false, false, false});      // Y = X @ W
    cases.push_back({l.name, BT, l.in, l.out, false, true, false});       // dX = dY @ W^T
    cases.push_back({l.name, l.in, l.out, BT, true, false, true});        // dW += X^T @ dY
  }
  for (bool bf16 : {false, true}) {
    double peak = kernels::measure_matmul_peak_gflops(bf16);
    std::printf("{\"bench\":\"matmul_peak\",\"dtype\":\"%s\",\"gflops\":%.1f}\n",
                bf16 ? "bf16" : "f32", peak);
    for (const Case& c : cases) {
      double cpu = 0.0;
      double s = time_case(c, bf16, min_s, &cpu);
      double flops = 2.0 * double(c.M) * double(c.N) * double(c.K);
      double gf = flops / s * 1e-9;
      double cpu_gf = flops / (cpu / double(omp_get_max_threads())) * 1e-9;
      std::printf("{\"bench\":\"matmul\",\"case\":\"%s\",\"dtype\":\"%s\",\"M\":%ld,\"N\":%ld,"
                  "\"K\":%ld,\"trans_a\":%d,\"trans_b\":%d,\"accumulate\":%d,\"ms\":%.3f,"
                  "\"gflops\":%.1f,\"frac_peak\":%.3f,\"cpu_gflops\":%.1f,\"threads\":%d}\n",
                  c.name, bf16 ? "bf16" : "f32", long(c.M), long(c.N), long(c.K), int(c.ta),
                  int(c.tb), int(c.acc), s * 1e3, gf, gf / peak, cpu_gf, omp_get_max_threads());
      std::fflush(stdout);
    }
  }
  return 0;
}
