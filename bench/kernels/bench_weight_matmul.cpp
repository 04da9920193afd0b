// bench/kernels/bench_weight_matmul.cpp: kernels::weight_matmul (inference linear, W stored
// (N, K) as f32, bf16 or int8 rows) on the GPT-2 124M decode shapes, beside a read-bandwidth probe
// measured in the same run.
//
// At decode sizes (M = 1..8 rows of x) the kernel's cost is reading W, so the figure of merit is
// the weight bytes read per second against what the machine can read at all. To read W from
// memory rather than from cache (the development machines have a large shared L3), every call
// uses the next of several copies of W that together fill a 512 MiB arena, as decode does when it
// walks through the layers.
//
// Prints JSON lines:
//   {"bench":"read_bandwidth", ...}         the probe (kernels::measure_read_bandwidth_gbs)
//   {"bench":"weight_matmul", "format", "case", "M", "N", "K", "seconds" (median per call),
//    "weight_gbs" (weight + scale bytes / seconds), "probe_gbs" (probe just before the case),
//    "frac_probe", "gflops", "threads"}
//   {"bench":"weight_matmul_model", ...}   one decode step's linears of GPT-2 124M (12 layers of
//    qkv, proj, fc, fcproj, then the tied LM head (50304, 768)), each layer with its own weights:
//    seconds per step, weight GB/s, and tokens/s = M / seconds (the linears' bound on decode).
// Usage: bench_kernels_weight_matmul [--quick] [--formats f32,bf16,int8] [--M 1,8,128]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <omp.h>
#include <time.h>

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

const char* format_name(WeightFormat f) {
  return f == WeightFormat::f32 ? "f32" : f == WeightFormat::bf16 ? "bf16" : "int8";
}
size_t elem_bytes(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 2 : 1;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// The weight arena: one 64-byte aligned buffer filled with the byte 0x3C, which reads as a small
// finite value in every format (f32 0x3C3C3C3C ~ 0.0115, bf16 0x3C3C ~ 0.0115, int8 60), so no
// NaN or denormal slows any path. Scales are a separate small array of 1/127.
struct Arena {
  size_t bytes;
  std::unique_ptr<char, FreeDeleter> data;
  std::vector<float> scales;
  explicit Arena(size_t b)
      : bytes(b), data(static_cast<char*>(std::aligned_alloc(64, b))), scales(64 << 10, 1.f / 127) {
    if (!data) {
      std::fprintf(stderr, "bench_weight_matmul: cannot allocate %zu bytes\n", b);
      std::exit(1);
    }
    std::memset(data.get(), 0x3C, b);
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

// Median seconds per call of weight_matmul over copies of an (N, K) weight laid end to end in the
// arena, cycling through them so each call reads its weight from memory.
// *cpu_share: process CPU seconds / (wall seconds * threads) over the timed calls: how much of its
// cores the process got (below 1 when other jobs share the machine; OpenMP spin-waits count).
double time_shape(Arena& arena, WeightFormat f, int64_t M, const Shape& s, double min_seconds,
                  double* cpu_share) {
  const size_t wbytes = size_t(s.N * s.K) * elem_bytes(f);
  const size_t stride = (wbytes + 63) / 64 * 64;
  const size_t copies = std::max<size_t>(1, arena.bytes / stride);
  std::vector<float> x(size_t(M * s.K), 0.5f);  // (M, K)
  std::vector<float> y(size_t(M * s.N));        // (M, N)
  std::vector<float> bias(size_t(s.N), 0.1f);   // (N)
  std::vector<float> scales(size_t(s.N), 1.f / 127);
  size_t next = 0;
  auto once = [&] {
    kernels::WeightView w{f, s.N, s.K, arena.data.get() + (next++ % copies) * stride,
                          f == WeightFormat::int8_row ? scales.data() : nullptr};
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
  *cpu_share = (process_cpu_s() - cpu0) / ((now_s() - start) * omp_get_max_threads());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// One decode step's linears: the 48 layer weights and the LM head, each its own slice of the
// arena (GPT-2 124M in f32 is 494 MB, inside the 512 MiB arena). Returns median seconds per step.
double time_model(Arena& arena, WeightFormat f, int64_t M, double min_seconds, size_t* bytes,
                  double* cpu_share) {
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
  if (total > arena.bytes) {
    std::fprintf(stderr, "bench_weight_matmul: model needs %zu bytes > arena %zu\n", total,
                 arena.bytes);
    std::exit(1);
  }
  *bytes = total;
  std::vector<float> x(size_t(M * 4 * C), 0.5f);  // (M, 4C): the widest input
  std::vector<float> y(size_t(M * V));            // (M, V): the widest output
  auto step = [&] {
    for (size_t i = 0; i < lins.size(); ++i) {
      kernels::WeightView w{f, lins[i].N, lins[i].K, arena.data.get() + offsets[i],
                            f == WeightFormat::int8_row ? arena.scales.data() : nullptr};
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
  *cpu_share = (process_cpu_s() - cpu0) / ((now_s() - start) * omp_get_max_threads());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
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
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
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
    } else if (std::strcmp(argv[i], "--M") == 0 && i + 1 < argc) {
      Ms.clear();
      for (const std::string& m : split(argv[++i])) Ms.push_back(std::atoll(m.c_str()));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--formats f32,bf16,int8] [--M 1,8,128]\n", argv[0]);
      return 2;
    }
  }
  const double min_s = quick ? 0.1 : 0.4;
  const int threads = omp_get_max_threads();
  Arena arena(size_t(512) << 20);
  auto probe = [&] {
    const double gbs = kernels::measure_read_bandwidth_gbs(threads);
    std::printf("{\"bench\":\"read_bandwidth\",\"gbs\":%.2f,\"threads\":%d}\n", gbs, threads);
    return gbs;
  };
  for (WeightFormat f : formats) {
    for (int64_t M : Ms) {
      for (const Shape& s : kShapes) {
        const double probe_gbs = kernels::measure_read_bandwidth_gbs(threads);
        double share = 0.0;
        const double sec = time_shape(arena, f, M, s, min_s, &share);
        const double bytes = double(s.N * s.K) * double(elem_bytes(f)) +
                             (f == WeightFormat::int8_row ? 4.0 * double(s.N) : 0.0);
        const double gbs = bytes / sec * 1e-9;
        std::printf("{\"bench\":\"weight_matmul\",\"format\":\"%s\",\"case\":\"%s\",\"M\":%ld,"
                    "\"N\":%ld,\"K\":%ld,\"seconds\":%.4e,\"weight_gbs\":%.2f,"
                    "\"probe_gbs\":%.2f,\"frac_probe\":%.3f,\"gflops\":%.1f,\"cpu_share\":%.2f,"
                    "\"threads\":%d}\n",
                    format_name(f), s.name, long(M), long(s.N), long(s.K), sec, gbs, probe_gbs,
                    gbs / probe_gbs, 2.0 * double(M * s.N * s.K) / sec * 1e-9, share, threads);
        std::fflush(stdout);
      }
    }
  }
  for (WeightFormat f : formats) {
    for (int64_t M : Ms) {
      if (M > 8) continue;  // decode batch sizes only
      const double probe_gbs = probe();
      size_t bytes = 0;
      double share = 0.0;
      const double sec = time_model(arena, f, M, min_s, &bytes, &share);
      const double gbs = double(bytes) / sec * 1e-9;
      std::printf("{\"bench\":\"weight_matmul_model\",\"model\":\"gpt2-124m\",\"format\":\"%s\","
                  "\"M\":%ld,\"seconds_per_step\":%.4e,\"weight_bytes\":%zu,\"weight_gbs\":%.2f,"
                  "\"probe_gbs\":%.2f,\"frac_probe\":%.3f,\"tokens_per_s\":%.1f,\"cpu_share\":%.2f,"
                  "\"threads\":%d}\n",
                  format_name(f), long(M), sec, bytes, gbs, probe_gbs, gbs / probe_gbs,
                  double(M) / sec, share, threads);
      std::fflush(stdout);
    }
  }
  return 0;
}
