// bench/attention/bench_peaks.cpp: the peak multiply-add rate of one core for the instructions
// the attention kernels can use, measured with independent accumulator chains (no memory
// traffic): f32 FMA (vfmadd231ps zmm), AVX512-BF16 (vdpbf16ps zmm: 16 lanes x 2 bf16 products)
// and AMX-BF16 (tdpbf16ps: a 16x16 f32 tile += 16x32 by 32x16 bf16). Prints one JSON line with
// GFLOP/s (2 FLOPs per multiply-add) for each, or "null" where this CPU or OS cannot run it.
// Usage: bench_peaks [--seconds 0.5]
// The file is compiled for AVX-512, AVX512-BF16 and AMX whatever the build's -march (a pragma);
// each probe runs only after a CPUID check (and, for AMX, amx_bf16_usable()).
#include <cpuid.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "attention/flash_attention.h"

#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")
#endif

namespace {

using Clock = std::chrono::steady_clock;

bool has_avx512f() {
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return (b >> 16) & 1;
}
bool has_avx512bf16() {
  unsigned a, b, c, d;
  if (!has_avx512f()) return false;
  __cpuid_count(7, 1, a, b, c, d);
  return (a >> 5) & 1;
}

// Best rate of 5 windows of `seconds`/5 each: `step(n)` runs n rounds of `flops_per_round`.
template <typename F>
double rate(F step, double flops_per_round, double seconds) {
  double best = 0;
  for (int w = 0; w < 5; ++w) {
    int64_t rounds = 0;
    auto t0 = Clock::now();
    double dt = 0;
    do {
      step(4096);
      rounds += 4096;
      dt = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (dt < seconds / 5);
    best = std::max(best, flops_per_round * double(rounds) / dt / 1e9);
  }
  return best;
}

// 12 independent accumulator chains (enough to cover latency x ports), kept in registers: the
// loop is local to a noinline function and the result is consumed at the end.
__attribute__((noinline)) float fma_rounds(int64_t n) {
  __m512 a0 = _mm512_set1_ps(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
         a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-9f);
  for (int64_t i = 0; i < n; ++i) {
    a0 = _mm512_fmadd_ps(a0, x, y); a1 = _mm512_fmadd_ps(a1, x, y);
    a2 = _mm512_fmadd_ps(a2, x, y); a3 = _mm512_fmadd_ps(a3, x, y);
    a4 = _mm512_fmadd_ps(a4, x, y); a5 = _mm512_fmadd_ps(a5, x, y);
    a6 = _mm512_fmadd_ps(a6, x, y); a7 = _mm512_fmadd_ps(a7, x, y);
    a8 = _mm512_fmadd_ps(a8, x, y); a9 = _mm512_fmadd_ps(a9, x, y);
    a10 = _mm512_fmadd_ps(a10, x, y); a11 = _mm512_fmadd_ps(a11, x, y);
    // Opaque to the compiler: the 12 identical chains must stay 12 chains.
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),
                     "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
  }
  const __m512 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  return _mm512_reduce_add_ps(s);
}

__attribute__((noinline)) float dpbf16_rounds(int64_t n) {
  __m512 a0 = _mm512_set1_ps(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
         a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3000);
  for (int64_t i = 0; i < n; ++i) {
    a0 = _mm512_dpbf16_ps(a0, x, y); a1 = _mm512_dpbf16_ps(a1, x, y);
    a2 = _mm512_dpbf16_ps(a2, x, y); a3 = _mm512_dpbf16_ps(a3, x, y);
    a4 = _mm512_dpbf16_ps(a4, x, y); a5 = _mm512_dpbf16_ps(a5, x, y);
    a6 = _mm512_dpbf16_ps(a6, x, y); a7 = _mm512_dpbf16_ps(a7, x, y);
    a8 = _mm512_dpbf16_ps(a8, x, y); a9 = _mm512_dpbf16_ps(a9, x, y);
    a10 = _mm512_dpbf16_ps(a10, x, y); a11 = _mm512_dpbf16_ps(a11, x, y);
    // Opaque to the compiler: the 12 identical chains must stay 12 chains.
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),
                     "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
  }
  const __m512 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  return _mm512_reduce_add_ps(s);
}

volatile float g_sink;  // keeps the chains' results alive

double fma_f32(double seconds) {
  return rate([](int64_t n) { g_sink = fma_rounds(n); }, 12.0 * 16 * 2, seconds);
}

double dpbf16(double seconds) {
  return rate([](int64_t n) { g_sink = dpbf16_rounds(n); }, 12.0 * 16 * 2 * 2, seconds);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

double amx_bf16(double seconds) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t a[16 * 32], b[16 * 32];
  for (int i = 0; i < 16 * 32; ++i) a[i] = b[i] = 0x3000;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, b, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, b, 64);
  const double r = rate(
      [](int64_t n) {
        for (int64_t i = 0; i < n; ++i) {
          _tile_dpbf16ps(0, 4, 5);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 6, 5);
          _tile_dpbf16ps(3, 6, 7);
        }
      },
      4.0 * 16 * 16 * 32 * 2, seconds);
  _tile_release();
  return r;
}

std::string num(bool ok, double v) {
  if (!ok) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 0.5;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_peaks [--seconds S]\n");
      return 2;
    }
  }
  const bool f = has_avx512f(), bf = has_avx512bf16(), amx = loom::attention::amx_bf16_usable();
  std::printf(
      "{\"bench\":\"peaks\",\"threads\":1,\"f32_fma_gflops\":%s,\"avx512_bf16_dp_gflops\":%s,"
      "\"amx_bf16_gflops\":%s}\n",
      num(f, f ? fma_f32(seconds) : 0).c_str(), num(bf, bf ? dpbf16(seconds) : 0).c_str(),
      num(amx, amx ? amx_bf16(seconds) : 0).c_str());
  return 0;
}
#if defined(__clang__)
#pragma clang attribute pop
#endif
