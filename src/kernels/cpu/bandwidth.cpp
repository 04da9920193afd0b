// kernels/cpu/bandwidth.cpp: the read-bandwidth probe. Each thread sums its slice of a 64-byte
// aligned float buffer with eight independent accumulators, so the loop is bound by loads, not by
// add latency; the sums are returned through a volatile sink so the loads cannot be removed. An
// AVX-512 version is used where the CPU has it (the widest loads the weight kernels use), a plain
// loop otherwise. The buffer is on transparent huge pages (advise_huge_pages, before the first
// touch), as the inference weights and KV pool it is the yardstick for: on 4 KiB pages the probe
// read ~6% less (29.2-29.6 against 30.8-31.2 GB/s, 2 threads, three alternating runs, the Xeon of
// session 23), which flattered every "fraction of the probe" by as much.
#include "kernels/cpu/bandwidth.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <new>
#include <cstdlib>
#include <vector>

#include "core/aligned.h"
#include "core/error.h"
#include "core/memory_pool.h"

namespace loom::kernels {
namespace {

__attribute__((target("avx512f"))) float sum_avx512(const float* p, size_t n) {
  // n is a multiple of 128 floats (eight 16-lane vectors).
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (size_t i = 0; i < n; i += 128) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    a4 = _mm512_add_ps(a4, _mm512_load_ps(p + i + 64));
    a5 = _mm512_add_ps(a5, _mm512_load_ps(p + i + 80));
    a6 = _mm512_add_ps(a6, _mm512_load_ps(p + i + 96));
    a7 = _mm512_add_ps(a7, _mm512_load_ps(p + i + 112));
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                           _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  return _mm512_reduce_add_ps(s);
}

float sum_plain(const float* p, size_t n) {
  float a[8] = {};
  for (size_t i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) a[j] += p[i + j];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

}  // namespace

ReadBandwidthProbe::ReadBandwidthProbe(int threads, size_t bytes) {
  LOOM_CHECK(bytes >= (size_t(1) << 20), "read-bandwidth probe: bytes={} must be >= 1 MiB", bytes);
  threads_ = threads <= 0 ? omp_get_max_threads() : threads;
  const size_t kChunk = 128;  // floats per inner step (eight 64-byte vectors)
  // Every thread gets a whole number of chunks; the few bytes left over are not read.
  per_thread_ = bytes / sizeof(float) / size_t(threads_) / kChunk * kChunk;
  LOOM_CHECK(per_thread_ > 0, "read-bandwidth probe: bytes={} too small for threads={}", bytes,
             threads_);
  const size_t n = per_thread_ * size_t(threads_);
  // AlignedAllocator (core/aligned.h): 2 MiB-aligned from 4 MiB up, so the advice covers it all.
  try {
    buf_ = AlignedAllocator<float>().allocate(n);
  } catch (const std::bad_alloc&) {
    buf_ = nullptr;
  }
  LOOM_CHECK(buf_ != nullptr, "read-bandwidth probe: cannot allocate {} bytes", n * sizeof(float));
  advise_huge_pages(buf_, n * sizeof(float));
  // Each thread writes the slice it later reads (first touch places the pages on that thread's
  // NUMA node) and takes the page faults here, outside the timed passes.
  // (Slices in turn over the threads OpenMP gives, which may be fewer than asked.)
#pragma omp parallel num_threads(threads_)
  for (int t = omp_get_thread_num(); t < threads_; t += omp_get_num_threads()) {
    float* p = buf_ + size_t(t) * per_thread_;
    std::fill(p, p + per_thread_, 1.0f);
  }
}

ReadBandwidthProbe::~ReadBandwidthProbe() {
  AlignedAllocator<float>().deallocate(buf_, per_thread_ * size_t(threads_));
}

double ReadBandwidthProbe::measure(int repeats) {
  LOOM_CHECK(repeats >= 1, "read-bandwidth probe: repeats={} must be >= 1", repeats);
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const size_t n = per_thread_ * size_t(threads_);  // floats read per pass
  std::vector<float> sums(size_t(threads_), 0.f);
  volatile float sink = 0.f;
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads_)
    for (int t = omp_get_thread_num(); t < threads_; t += omp_get_num_threads()) {
      const float* p = buf_ + size_t(t) * per_thread_;
      sums[size_t(t)] = avx512 ? sum_avx512(p, per_thread_) : sum_plain(p, per_thread_);
    }
    for (float s : sums) sink = sink + s;
    const double sec =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n * sizeof(float)) / sec * 1e-9);
  }
  return best;
}

double measure_read_bandwidth_gbs(int threads, size_t bytes, int repeats) {
  LOOM_CHECK(repeats >= 1, "measure_read_bandwidth_gbs: repeats={} must be >= 1", repeats);
  ReadBandwidthProbe probe(threads, bytes);
  return probe.measure(repeats);
}

}  // namespace loom::kernels
