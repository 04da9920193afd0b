// kernels/cpu/matmul.cpp: oneDNN matmul with a primitive cache (and oneDNN's sgemm for f32
// products whose B is not transposed; see matmul_impl for the measurement behind that choice).
//
// Glossary: M, N, K as in matmul.h; "key" = (M, N, K, trans_a, trans_b, accumulate, dtype,
// threads).
//
// Why a cache: building a oneDNN primitive descriptor and primitive (kernel selection, JIT code
// generation) costs far more than a small product, and a train step issues the same few shapes
// thousands of times. The cache maps key -> primitive; it is process-wide because the signatures
// in matmul.h take no context, but it holds no state that affects results: a cached primitive
// computes exactly what a freshly created one would. The OpenMP thread count is part of the key:
// oneDNN fixes a primitive's thread decomposition when it is created, so one built while the
// process ran one thread (loom calibrate's one-thread windows, before `loom train --auto` trains
// in the same process) ran later calls on one thread: calibrate's step probe read 1.06-1.42x on
// two threads for its one-thread steps, the same products alone 1.9x (session 17).
//
// Transposes: oneDNN's matmul takes arbitrary strides in its memory descriptors, so A^T stored as
// (K,M) row-major is the (M,K) matrix with strides {1, M}. oneDNN picks kernels for both layouts
// without copying the caller's buffers (it may pack blocks internally into its scratchpad).
//
// Accumulate: oneDNN 2.6 matmul has no beta; C += A@B is the "sum" post-op (dst = 1.0*dst + A@B),
// which reads the destination in the same pass.
#include "kernels/cpu/matmul.h"

#include <algorithm>

#include <string>

#include <cstdlib>
#include <fstream>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>

#include "core/error.h"

namespace loom::kernels {

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, bool, bool, int>;

struct MatmulCache {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mutex;
  std::map<Key, dnnl::matmul> primitives;
};

// Process-wide cache; see the file comment for why this is not "global mutable state" in the
// sense that matters (it never changes a result).
MatmulCache& cache() {
  static MatmulCache c;
  return c;
}

dnnl::memory::desc matrix_desc(int64_t rows, int64_t cols, bool stored_transposed,
                               dnnl::memory::data_type dt) {
  // The logical matrix is (rows, cols). Stored row-major as (rows, cols): strides {cols, 1}.
  // Stored as its transpose (cols, rows) row-major: strides {1, rows}.
  dnnl::memory::dims dims = {rows, cols};
  dnnl::memory::dims strides = stored_transposed ? dnnl::memory::dims{1, rows}
                                                 : dnnl::memory::dims{cols, 1};
  return dnnl::memory::desc(dims, dt, strides);
}

dnnl::matmul get_primitive(const Key& key) {
  MatmulCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.primitives.find(key);
  if (it != c.primitives.end()) return it->second;
  auto [M, N, K, trans_a, trans_b, accumulate, is_bf16, threads] = key;
  (void)threads;  // oneDNN reads the current count itself; the key keeps one primitive per count
  auto in_dt = is_bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  auto a_md = matrix_desc(M, K, trans_a, in_dt);  // op(A) (M,K)
  auto b_md = matrix_desc(K, N, trans_b, in_dt);  // op(B) (K,N)
  auto c_md = matrix_desc(M, N, false, dnnl::memory::data_type::f32);  // C (M,N)
  dnnl::primitive_attr attr;
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  try {
    dnnl::matmul::desc desc(a_md, b_md, c_md);
    dnnl::matmul::primitive_desc pd(desc, attr, c.engine);
    dnnl::matmul prim(pd);
    c.primitives.emplace(key, prim);
    return prim;
  } catch (const dnnl::error& e) {
    LOOM_FAIL("oneDNN could not create a {} matmul M={} N={} K={} trans_a={} trans_b={} "
              "accumulate={}: {} (status {})",
              is_bf16 ? "bf16" : "f32", M, N, K, trans_a, trans_b, accumulate, e.what(),
              int(e.status));
  }
}

template <typename T>
void matmul_impl(const T* A, const T* B, float* C, int64_t M, int64_t N, int64_t K, bool trans_a,
                 bool trans_b, bool accumulate, bool is_bf16) {
  LOOM_CHECK(M >= 0 && N >= 0 && K >= 0, "matmul sizes must be non-negative, got M={} N={} K={}",
             M, N, K);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // An empty sum: oneDNN rejects zero-sized reductions, and the answer is known.
    if (!accumulate) std::fill(C, C + M * N, 0.0f);
    return;
  }
  LOOM_CHECK(A != nullptr && B != nullptr && C != nullptr,
             "matmul given a null pointer (A={}, B={}, C={}) for M={} N={} K={}",
             static_cast<const void*>(A), static_cast<const void*>(B), static_cast<void*>(C), M,
             N, K);
  if constexpr (std::is_same_v<T, float>) {
    // f32 with a plain (K,N) B goes to oneDNN's sgemm: its brgemm matmul with such a B and
    // N = 3072 (gpt2's ffn.down input and weight gradients) runs at ~95-120 GFLOP/s on the
    // development machine instead of ~220 (likely 4 KiB aliasing of the 12 KiB row stride it
    // reads B with), while the jit sgemm packs B itself and measured as fast or faster for
    // every non-transposed-B shape of a GPT-2 step (+21% f32 tokens/s). With B transposed the
    // matmul primitive stays slightly ahead. Both are deterministic for a fixed thread count.
    // LOOM_SGEMM_NT=0 keeps the matmul primitive for every shape (A/B timing).
    static const bool use_sgemm = [] {
      const char* e = std::getenv("LOOM_SGEMM_NT");
      return !(e && e[0] == '0');
    }();
    if (use_sgemm && !trans_b) {
      dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', 'N', M, N, K, 1.0f, A, trans_a ? M : K,
                                    B, N, accumulate ? 1.0f : 0.0f, C, N);
      LOOM_CHECK(st == dnnl_success, "dnnl_sgemm M={} N={} K={} failed (status {})", M, N, K,
                 int(st));
      return;
    }
  }
  Key key{M, N, K, trans_a, trans_b, accumulate, is_bf16, omp_get_max_threads()};
  dnnl::matmul prim = get_primitive(key);
  MatmulCache& c = cache();
  auto in_dt = is_bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  try {
    // dnnl::memory wraps the caller's pointers; no copy is made.
    dnnl::memory a_mem(matrix_desc(M, K, trans_a, in_dt), c.engine, const_cast<T*>(A));
    dnnl::memory b_mem(matrix_desc(K, N, trans_b, in_dt), c.engine, const_cast<T*>(B));
    dnnl::memory c_mem(matrix_desc(M, N, false, dnnl::memory::data_type::f32), c.engine, C);
    dnnl::stream stream(c.engine);
    prim.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
    stream.wait();
  } catch (const dnnl::error& e) {
    LOOM_FAIL("oneDNN {} matmul M={} N={} K={} trans_a={} trans_b={} accumulate={} failed: {} "
              "(status {})",
              is_bf16 ? "bf16" : "f32", M, N, K, trans_a, trans_b, accumulate, e.what(),
              int(e.status));
  }
}

}  // namespace

void matmul_f32(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K,
                bool trans_a, bool trans_b, bool accumulate) {
  matmul_impl(A, B, C, M, N, K, trans_a, trans_b, accumulate, false);
}

namespace {

// Widens a bf16 operand into a per-thread f32 scratch buffer (exact: bf16 is a truncated f32).
// The scratch lives outside the MemoryPool, like oneDNN's own scratchpad.
const float* widen(const bf16* x, int64_t n, std::vector<float>& scratch) {
  if (scratch.size() < size_t(n)) scratch.resize(size_t(n));
  convert_bf16_to_f32(x, scratch.data(), size_t(n));
  return scratch.data();
}

void matmul_bf16_widened(const bf16* A, const bf16* B, float* C, int64_t M, int64_t N, int64_t K,
                         bool trans_a, bool trans_b, bool accumulate) {
  thread_local std::vector<float> a_scratch, b_scratch;
  const float* a = widen(A, M * K, a_scratch);
  const float* b = widen(B, K * N, b_scratch);
  matmul_impl(a, b, C, M, N, K, trans_a, trans_b, accumulate, false);
}

// True when the CPU advertises AMX-BF16 tiles (Linux /proc/cpuinfo flag "amx_bf16").
bool cpu_has_amx_bf16() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) return line.find(" amx_bf16") != std::string::npos;
  return false;
}

// A fixed rule, never a timing: the path decides the bits of every bf16 product (the two differ
// in summation order), so two processes must always agree whatever the load on the machine.
Bf16MatmulPath choose_bf16_path() {
  const char* env = std::getenv("LOOM_BF16_MATMUL");
  std::string v = env ? env : "auto";
  if (v == "native") return Bf16MatmulPath::native;
  if (v == "widen") return Bf16MatmulPath::widen;
  LOOM_CHECK(v == "auto", "LOOM_BF16_MATMUL='{}': choose native, widen or auto", v);
  // With AMX, oneDNN's bf16 kernels run on tiles, several times the f32 rate. Without it (AVX-512
  // BF16 only, as on this project's Xeons) oneDNN 2.6's bf16 brgemm measured slower than its f32
  // sgemm on the widened operands (session 3: 512x768x768, widen won every alternating pair).
  return cpu_has_amx_bf16() ? Bf16MatmulPath::native : Bf16MatmulPath::widen;
}

}  // namespace

Bf16MatmulPath bf16_matmul_path() {
  static const Bf16MatmulPath path = choose_bf16_path();
  return path;
}

void matmul_bf16(const bf16* A, const bf16* B, float* C, int64_t M, int64_t N, int64_t K,
                 bool trans_a, bool trans_b, bool accumulate) {
  static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes to be passed to oneDNN");
  if (bf16_matmul_path() == Bf16MatmulPath::widen)
    matmul_bf16_widened(A, B, C, M, N, K, trans_a, trans_b, accumulate);
  else
    matmul_impl(A, B, C, M, N, K, trans_a, trans_b, accumulate, true);
}

int64_t matmul_primitive_cache_size() {
  MatmulCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return int64_t(c.primitives.size());
}

double measure_matmul_peak_gflops(bool bf16_mode) {
  // On the widened path bf16 mode runs the f32 kernel (on bf16-rounded values, model/gpt.h).
  const bool bf16 = bf16_mode && bf16_matmul_path() == Bf16MatmulPath::native;
  constexpr int64_t kN = 2048;
  constexpr double kSeconds = 0.15;  // per window
  const size_t n2 = size_t(kN * kN);
  // Inputs are small deterministic values; their content does not change the timing.
  std::vector<float> c(n2);
  std::vector<float> af(bf16 ? 0 : n2), bf(bf16 ? 0 : n2);
  std::vector<loom::bf16> ah(bf16 ? n2 : 0), bh(bf16 ? n2 : 0);
  for (size_t i = 0; i < n2; ++i) {
    float va = float(int64_t(i % 7) - 3) * 0.01f, vb = float(int64_t(i % 5) - 2) * 0.01f;
    if (bf16) {
      ah[i] = f32_to_bf16(va);
      bh[i] = f32_to_bf16(vb);
    } else {
      af[i] = va;
      bf[i] = vb;
    }
  }
  auto once = [&] {
    if (bf16) matmul_bf16(ah.data(), bh.data(), c.data(), kN, kN, kN, false, false, false);
    else matmul_f32(af.data(), bf.data(), c.data(), kN, kN, kN, false, false, false);
  };
  once();  // creates the primitive and warms caches / page tables
  once();
  // The best of three windows: the peak, not an average disturbed by other processes.
  using clock = std::chrono::steady_clock;
  double best = 0;
  for (int window = 0; window < 3; ++window) {
    auto start = clock::now();
    int64_t reps = 0;
    double elapsed = 0.0;
    do {
      once();
      ++reps;
      elapsed = std::chrono::duration<double>(clock::now() - start).count();
    } while (elapsed < kSeconds);
    best = std::max(best, 2.0 * double(kN) * double(kN) * double(kN) * double(reps) / elapsed * 1e-9);
  }
  return best;
}

}  // namespace loom::kernels
