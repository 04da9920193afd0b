// bench/kernels/bench_weight_matmul.cpp: kernels::weight_matmul (inference linear, W stored
// (N, K) as f32, bf16 or int8 rows) on the GPT-2 124M decode shapes, beside a read-bandwidth probe
// measured in the same run.
//
// At decode sizes (M = 1..8 rows of x) the kernel's cost is reading W, so the figure of merit is
// the weight bytes read per second against what the machine can read at all. To read W from
// memory rather than from cache (the development machine has a 260 MiB shared L3, whose
// replacement policy keeps part of a cyclically read set twice its size), every call uses the
// next of several copies of W that together fill a 1 GiB arena, as decode does when it walks
// through the layers; the probe streams 1 GiB too.
//
// Prints JSON lines:
//   {"bench":"read_bandwidth", ...}         the probe (kernels::measure_read_bandwidth_gbs)
//   {"bench":"weight_matmul", "format", "case", "M", "N", "K", "seconds" (median per call),
//    "best_seconds" (fastest call), "weight_gbs" / "best_gbs" (weight + scale bytes / seconds),
//    "probe_gbs" (the probe just before the case), "frac_probe" = best_gbs / probe_gbs,
//    "median_frac_probe", "gflops" (best), "cpu_share", "threads"}
//   {"bench":"weight_matmul_model", ...}   one decode step's linears of GPT-2 124M (12 layers of
//    qkv, proj, fc, fcproj, then the tied LM head (50304, 768)), each layer with its own weights:
//    seconds per step, weight GB/s, and tokens/s = M / seconds (the linears' bound on decode).
// The probe reports the best of 5 passes, so "frac_probe" compares best with best: on the shared
// development machines other jobs take cores away at random moments, which the median shows and
// cpu_share (how much of its cores the process got) explains.
// Usage: bench_kernels_weight_matmul [--quick] [--formats f32,bf16,int8] [--M 1,8,128] [--bf16-panels]
//        [--arena-mib 1024]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <omp.h>
#include <time.h>

#include "core/aligned.h"
#include "core/memory_pool.h"
#include "kernels/cpu/bandwidth.h"
#include "kernels/cpu/weight_matmul.h"

using namespace loom;
using kernels::WeightFormat;

namespace {

struct Shape {
  const char* name;
  int64_t N, K;
};

// GPT-2 124M (C = 768, V = 50304 padded): fused q/k/v, attention projection, MLP up and down,
// LM head.
const Shape kShapes[] = {{"qkv", 2304, 768},
                         {"attproj", 768, 768},
                         {"fc", 3072, 768},
                         {"fcproj", 768, 3072},
                         {"lm_head", 50304, 768}};

constexpr size_t kProbeBytes = size_t(1) << 30;  // 1 GiB: 4x the L3

// Weights in the layout the inference weights store them in: bf16 in AMX tile order where the
// CPU has it (--bf16-panels: in panels on the AVX-512 path instead), everything else in 16-column
// panels. The arena's bytes are all equal and every N here is a multiple of 32, so the same
// bytes serve as any layout.
bool g_bf16_tiles = true;
kernels::WeightLayout layout_for(WeightFormat f, int64_t K) {
  return f == WeightFormat::bf16 && g_bf16_tiles && kernels::amx_tiles_available(K)
             ? kernels::WeightLayout::amx_tiles
             : kernels::WeightLayout::panels;
}
const char* layout_name(WeightFormat f, int64_t K) {
  return layout_for(f, K) == kernels::WeightLayout::amx_tiles ? "amx_tiles" : "panels";
}

const char* format_name(WeightFormat f) {
  return f == WeightFormat::f32 ? "f32" : f == WeightFormat::bf16 ? "bf16" : "int8";
}
size_t elem_bytes(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 2 : 1;
}

// The weight arena: one buffer on 2 MiB (transparent huge) pages, as the decoder's weights
// (infer/weights.cpp) and the probe's buffer, filled with the byte 0x3C, which reads as a small
// finite value in every format (f32 0x3C3C3C3C ~ 0.0115, bf16 0x3C3C ~ 0.0115, int8 60), so no
// NaN or denormal slows any path. Scales are a separate small array of 1/127.
struct Arena {
  size_t bytes;
  loom::AlignedVector<char> data;  // 2 MiB-aligned (core/aligned.h), advised before first touch
  std::vector<float> scales;
  explicit Arena(size_t b) : bytes(b), scales(64 << 10, 1.f / 127) {
    data.reserve(b);
    loom::advise_huge_pages(data.data(), b);
    data.resize(b, char(0x3C));
  }
};

double process_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Timing {
  double median_s;   // median seconds per call (or per step)
  double best_s;     // fastest call: the machine's rate when no other job got in the way
  double cpu_share;  // process CPU seconds / (wall seconds * threads) over the timed calls: how
                     // much of its cores the process got (OpenMP spin-waits count as CPU time)
};

Timing summarize(std::vector<double> times, double wall, double cpu) {
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.front(), cpu / (wall * omp_get_max_threads())};
}

// Seconds per call of weight_matmul over copies of an (N, K) weight laid end to end in the
// arena, cycling through them so each call reads its weight from memory.
Timing time_shape(Arena& arena, WeightFormat f, int64_t M, const Shape& s, double min_seconds) {
  const size_t wbytes = size_t(s.N * s.K) * elem_bytes(f);
  const size_t stride = (wbytes + 63) / 64 * 64;
  const size_t copies = std::max<size_t>(1, arena.bytes / stride);
  std::vector<float> x(size_t(M * s.K), 0.5f);  // (M, K)
  std::vector<float> y(size_t(M * s.N));        // (M, N)
  std::vector<float> bias(size_t(s.N), 0.1f);   // (N)
  std::vector<float> scales(size_t(s.N), 1.f / 127);
  size_t next = 0;
  auto once = [&] {
    kernels::WeightView w{f, s.N, s.K, arena.data.data() + (next++ % copies) * stride,
                          f == WeightFormat::int8_row ? scales.data() : nullptr,
                          layout_for(f, s.K)};
    kernels::weight_matmul(y.data(), 0, x.data(), M, w, bias.data());
  };
  once();
  std::vector<double> times;
  const double start = now_s(), cpu0 = process_cpu_s();
  while (times.size() < 5 || now_s() - start < min_seconds) {
    const double t0 = now_s();
    once();
    times.push_back(now_s() - t0);
  }
  return summarize(times, now_s() - start, process_cpu_s() - cpu0);
}

// One decode step's linears: the 48 layer weights and the LM head, each its own slice of the
// arena. Successive steps use successive copies of the whole model, as many as the arena holds
// (GPT-2 124M is 494 MB in f32, 124 MB in int8: 2 and 8 copies in 1 GiB), so a step reads its
// weights from memory even where one model copy would fit the L3. Times per step.
Timing time_model(Arena& arena, WeightFormat f, int64_t M, double min_seconds, size_t* bytes) {
  const int64_t kLayers = 12, C = 768, V = 50304;
  struct Lin {
    int64_t N, K;
  };
  std::vector<Lin> lins;
  for (int64_t l = 0; l < kLayers; ++l)
    for (Lin lin : {Lin{3 * C, C}, Lin{C, C}, Lin{4 * C, C}, Lin{C, 4 * C}}) lins.push_back(lin);
  lins.push_back({V, C});
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const Lin& l : lins) {
    offsets.push_back(total);
    total += (size_t(l.N * l.K) * elem_bytes(f) + 63) / 64 * 64;
  }
  if (total > arena.bytes) {  // not reached: main skips the model below 500 MiB
    std::fprintf(stderr, "bench_weight_matmul: model needs %zu bytes > arena %zu\n", total,
                 arena.bytes);
    std::exit(1);
  }
  *bytes = total;
  const size_t copies = arena.bytes / total;
  size_t next = 0;
  std::vector<float> x(size_t(M * 4 * C), 0.5f);  // (M, 4C): the widest input
  std::vector<float> y(size_t(M * V));            // (M, V): the widest output
  auto step = [&] {
    const char* model = arena.data.data() + (next++ % copies) * total;
    for (size_t i = 0; i < lins.size(); ++i) {
      kernels::WeightView w{f, lins[i].N, lins[i].K, model + offsets[i],
                            f == WeightFormat::int8_row ? arena.scales.data() : nullptr,
                            layout_for(f, lins[i].K)};
      kernels::weight_matmul(y.data(), 0, x.data(), M, w, nullptr);
    }
  };
  step();
  std::vector<double> times;
  const double start = now_s(), cpu0 = process_cpu_s();
  while (times.size() < 5 || now_s() - start < min_seconds) {
    const double t0 = now_s();
    step();
    times.push_back(now_s() - t0);
  }
  return summarize(times, now_s() - start, process_cpu_s() - cpu0);
}

std::vector<std::string> split(const char* s) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == 0) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
      if (*p == 0) break;
    } else {
      cur += *p;
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::vector<WeightFormat> formats = {WeightFormat::f32, WeightFormat::bf16,
                                       WeightFormat::int8_row};
  std::vector<int64_t> Ms = {1, 8, 128};
  size_t arena_mib = 1024;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--bf16-panels") == 0) {
      g_bf16_tiles = false;
    } else if (std::strcmp(argv[i], "--formats") == 0 && i + 1 < argc) {
      formats.clear();
      for (const std::string& f : split(argv[++i])) {
        if (f == "f32") formats.push_back(WeightFormat::f32);
        else if (f == "bf16") formats.push_back(WeightFormat::bf16);
        else if (f == "int8") formats.push_back(WeightFormat::int8_row);
        else {
          std::fprintf(stderr, "unknown format '%s'; choose from f32,bf16,int8\n", f.c_str());
          return 2;
        }
      }
    } else if (std::strcmp(argv[i], "--arena-mib") == 0 && i + 1 < argc) {
      // A small arena (e.g. 4) keeps W in cache: the kernels' compute rate without DRAM.
      arena_mib = size_t(std::max(1LL, std::atoll(argv[++i])));
    } else if (std::strcmp(argv[i], "--M") == 0 && i + 1 < argc) {
      Ms.clear();
      for (const std::string& m : split(argv[++i])) Ms.push_back(std::atoll(m.c_str()));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--formats f32,bf16,int8] [--M 1,8,128] [--arena-mib 1024] [--bf16-panels]\n", argv[0]);
      return 2;
    }
  }
  const double min_s = quick ? 0.1 : 0.4;
  const int threads = omp_get_max_threads();
  size_t largest = 0;  // the arena holds at least one copy of every weight benchmarked
  for (WeightFormat f : formats)
    for (const Shape& s : kShapes)
      largest = std::max(largest, (size_t(s.N * s.K) * elem_bytes(f) + 63) / 64 * 64);
  Arena arena(std::max(arena_mib << 20, largest));
  std::printf("{\"bench\":\"read_bandwidth\",\"gbs\":%.2f,\"threads\":%d,\"avx512\":%s}\n",
              kernels::measure_read_bandwidth_gbs(threads, kProbeBytes), threads,
              kernels::weight_matmul_uses_avx512() ? "true" : "false");
  for (WeightFormat f : formats) {
    for (int64_t M : Ms) {
      for (const Shape& s : kShapes) {
        const double probe_gbs = kernels::measure_read_bandwidth_gbs(threads, kProbeBytes);
        const Timing t = time_shape(arena, f, M, s, min_s);
        const double bytes = double(s.N * s.K) * double(elem_bytes(f)) +
                             (f == WeightFormat::int8_row ? 4.0 * double(s.N) : 0.0);
        const double gbs = bytes / t.median_s * 1e-9, best_gbs = bytes / t.best_s * 1e-9;
        std::printf("{\"bench\":\"weight_matmul\",\"format\":\"%s\",\"layout\":\"%s\",\"case\":\"%s\",\"M\":%ld,"
                    "\"N\":%ld,\"K\":%ld,\"seconds\":%.4e,\"best_seconds\":%.4e,"
                    "\"weight_gbs\":%.2f,\"best_gbs\":%.2f,\"probe_gbs\":%.2f,"
                    "\"frac_probe\":%.3f,\"median_frac_probe\":%.3f,\"gflops\":%.1f,"
                    "\"cpu_share\":%.2f,\"threads\":%d}\n",
                    format_name(f), layout_name(f, s.K), s.name, long(M), long(s.N), long(s.K), t.median_s, t.best_s,
                    gbs, best_gbs, probe_gbs, best_gbs / probe_gbs, gbs / probe_gbs,
                    2.0 * double(M * s.N * s.K) / t.best_s * 1e-9, t.cpu_share, threads);
        std::fflush(stdout);
      }
    }
  }
  for (WeightFormat f : formats) {
    for (int64_t M : Ms) {
      // Decode batch sizes only, and only when the arena holds the whole model.
      if (M > 8 || arena.bytes < (size_t(500) << 20)) continue;
      // Best of 10 passes here: a step (49 calls) lasts about as long as a few probe passes, so
      // both get similar chances to run while the other jobs on the machine leave the cores free.
      const double probe_gbs =
          kernels::measure_read_bandwidth_gbs(threads, kProbeBytes, /*repeats=*/10);
      size_t bytes = 0;
      const Timing t = time_model(arena, f, M, min_s, &bytes);
      const double gbs = double(bytes) / t.median_s * 1e-9, best_gbs = double(bytes) / t.best_s * 1e-9;
      std::printf("{\"bench\":\"weight_matmul_model\",\"model\":\"gpt2-124m\",\"format\":\"%s\",\"layout\":\"%s\","
                  "\"M\":%ld,\"seconds_per_step\":%.4e,\"best_seconds_per_step\":%.4e,"
                  "\"weight_bytes\":%zu,\"weight_gbs\":%.2f,\"best_gbs\":%.2f,"
                  "\"probe_gbs\":%.2f,\"frac_probe\":%.3f,\"median_frac_probe\":%.3f,"
                  "\"tokens_per_s\":%.1f,\"best_tokens_per_s\":%.1f,\"cpu_share\":%.2f,"
                  "\"threads\":%d}\n",
                  format_name(f), layout_name(f, 768), long(M), t.median_s, t.best_s, bytes, gbs, best_gbs, probe_gbs,
                  best_gbs / probe_gbs, gbs / probe_gbs, double(M) / t.median_s,
                  double(M) / t.best_s, t.cpu_share, threads);
      std::fflush(stdout);
    }
  }
  return 0;
}
