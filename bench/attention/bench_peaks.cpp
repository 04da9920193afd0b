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

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")
#include <immintrin.h>

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

// Runs `body` (which does `flops_per_call` FLOPs) until `seconds` have passed; best rate of 5
// windows.
template <typename F>
double rate(F body, double flops_per_call, double seconds) {
  double best = 0;
  for (int w = 0; w < 5; ++w) {
    int64_t calls = 0;
    auto t0 = Clock::now();
    double dt = 0;
    do {
      for (int i = 0; i < 64; ++i) body();
      calls += 64;
      dt = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (dt < seconds / 5);
    best = std::max(best, flops_per_call * double(calls) / dt / 1e9);
  }
  return best;
}

double fma_f32(double seconds) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-9f);
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-9f);
  double r = rate(
      [&] {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
        __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]),
                         "+v"(acc[4]), "+v"(acc[5]), "+v"(acc[6]), "+v"(acc[7]), "+v"(acc[8]),
                         "+v"(acc[9]), "+v"(acc[10]), "+v"(acc[11]));
      },
      12.0 * 16 * 2, seconds);
  return r;
}

double dpbf16(double seconds) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-9f);
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3000);
  return rate(
      [&] {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
        __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]),
                         "+v"(acc[4]), "+v"(acc[5]), "+v"(acc[6]), "+v"(acc[7]), "+v"(acc[8]),
                         "+v"(acc[9]), "+v"(acc[10]), "+v"(acc[11]));
      },
      12.0 * 16 * 2 * 2, seconds);
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
      [] {
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 6, 5);
        _tile_dpbf16ps(3, 6, 7);
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
