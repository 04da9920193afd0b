// bench/attention/bench_paged_attention.cpp: attention::paged_attention_forward as the KV-cached
// decoder calls it, one layer at a time: B single-query rows, each over T cached tokens, 12 heads
// of 64 (GPT-2 124M), blocks of 16 tokens scattered over the pool as a running batch leaves them.
// Each of the 12 layers reads its own region of the pool (on huge pages, as the decoder's), and a
// 64 MiB buffer is read between calls so that every call finds its keys and values in memory, not
// in cache (decode reads the weights between two layers' attention). Prints one JSON line: the
// best and the median time of the 12 layers (of --reps passes) and the K/V bytes read per second
// at the best.
// Usage: bench_paged_attention [--batch 8] [--context 192] [--dtype bf16|f32] [--reps 20]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/paged_attention.h"
#include "core/aligned.h"
#include "core/dtype.h"
#include "core/memory_pool.h"

using namespace loom;

int main(int argc, char** argv) {
  int64_t B = 8, T = 192, reps = 20;
  DType dt = DType::bf16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--batch")
      B = std::atoll(v.c_str());
    else if (a == "--context")
      T = std::atoll(v.c_str());
    else if (a == "--reps")
      reps = std::atoll(v.c_str());
    else if (a == "--dtype" && (v == "bf16" || v == "f32"))
      dt = v == "bf16" ? DType::bf16 : DType::f32;
    else {
      std::fprintf(stderr, "usage: %s [--batch B] [--context T] [--dtype bf16|f32] [--reps R]\n",
                   argv[0]);
      return 2;
    }
  }
  if (B < 1 || T < 1 || reps < 1) {
    std::fprintf(stderr, "batch, context and reps must be >= 1\n");
    return 2;
  }
  constexpr int64_t L = 12, NH = 12, HD = 64, BT = 16, KV = NH * HD;
  const int64_t nb = (T + BT - 1) / BT, es = int64_t(dtype_size(dt));
  const int64_t block_elems = BT * KV, per_layer = 2 * B * nb;  // K blocks, then V blocks
  // On transparent huge pages, as infer::KvCache's pool: advised before anything is written.
  AlignedVector<std::byte> pool;
  pool.reserve(size_t(L * per_layer * block_elems * es));
  advise_huge_pages(pool.data(), pool.capacity());
  pool.resize(pool.capacity());
  std::mt19937 rng(1);
  for (size_t i = 0; i < pool.size(); i += 2) {  // finite values in either dtype
    const float f = float(rng() % 2001) / 1000.f - 1.f;
    if (dt == DType::bf16) {
      const bf16 h = f32_to_bf16(f);
      std::memcpy(&pool[i], &h, 2);
    } else if (i % 4 == 0) {
      std::memcpy(&pool[i], &f, 4);
    }
  }
  // Each layer's B * nb K blocks in a shuffled order (one table per query).
  std::vector<int32_t> tables(size_t(L * B * nb));
  for (int64_t l = 0; l < L; ++l) {
    auto first = tables.begin() + l * B * nb;
    std::iota(first, first + B * nb, 0);
    std::shuffle(first, first + B * nb, rng);
  }
  std::vector<float> q(size_t(B * KV)), out(size_t(B * KV));
  for (float& v : q) v = float(rng() % 1000) / 1000.f;
  AlignedVector<char> flush(size_t(64) << 20, 1);
  attention::PagedShape s;
  s.NH = NH;
  s.NKV = NH;
  s.HD = HD;
  s.block_tokens = BT;
  s.block_stride = block_elems;
  s.scale = 0.125f;
  s.kv_dtype = dt;
  std::vector<attention::PagedQuery> qs(static_cast<size_t>(B));
  std::vector<double> passes;
  volatile long sink = 0;
  for (int64_t r = 0; r < reps; ++r) {
    double t = 0;
    for (int64_t l = 0; l < L; ++l) {
      long acc = 0;
      for (size_t i = 0; i < flush.size(); i += 64) acc += flush[i];
      sink = sink + acc;
      const std::byte* kb = pool.data() + l * per_layer * block_elems * es;
      const std::byte* vb = kb + B * nb * block_elems * es;
      for (int64_t b = 0; b < B; ++b) qs[size_t(b)] = {tables.data() + (l * B + b) * nb, nb, T};
      const auto t0 = std::chrono::steady_clock::now();
      attention::paged_attention_forward(out.data(), q.data(), qs.data(), B, kb, vb, s);
      t += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    passes.push_back(t);
  }
  std::sort(passes.begin(), passes.end());
  const double bytes = double(L * B * T * KV * 2 * es);
  std::printf(
      "{\"bench\":\"paged_attention\",\"batch\":%ld,\"context\":%ld,\"dtype\":\"%s\",\"layers\":%"
      "ld,"
      "\"best_s\":%.6f,\"median_s\":%.6f,\"kv_gbs_best\":%.2f,\"threads\":%d}\n",
      long(B), long(T), std::string(dtype_name(dt)).c_str(), long(L), passes.front(),
      passes[passes.size() / 2], bytes / passes.front() / 1e9, omp_get_max_threads());
  return 0;
}
