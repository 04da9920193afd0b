// tests/common/op_check.h: shared helpers for checking an op against its float64 reference.
//
// Header-only; include as "common/op_check.h". Nothing here depends on gtest, so benchmarks and
// distributed tests may use it too.
//
//   nmse(a, ref, n)            mean((a-ref)^2) / mean(ref^2): scale-free error of a kernel output
//                              against the float64 reference (0 when ref is all zero and a == ref).
//   max_abs_diff(a, ref, n)    largest |a - ref|.
//   all_finite(x, n)           no NaN and no Inf (float, double or bf16).
//   GuardedBuffer<T>           a buffer with sentinel elements before and after the region a
//                              kernel may write; guards_intact() says whether the kernel stayed in.
//   fd_gradient(f, x, h)       float64 central finite differences of a scalar function, per element.
//   fd_directional(f, x, d, h) float64 central difference of f along direction d (for big inputs).
//   fill_normal / fill_uniform / fill_tokens: deterministic random inputs from core/rng.h.
//   to_f64 / to_bf16 / bf16_round: conversions between test buffers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"

namespace loom::test {

// ---------------------------------------------------------------------------------------------
// Error measures

// Normalised mean squared error of `a` against the float64 reference `ref` (n elements):
// sum((a-ref)^2) / sum(ref^2). A NaN anywhere gives NaN (so `EXPECT_LT(nmse, tol)` fails).
// When ref is identically zero, returns sum(a^2) (0 when a is also zero).
template <typename A>
inline double nmse(const A* a, const double* ref, int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double ai;
    if constexpr (std::is_same_v<A, bf16>) ai = double(bf16_to_f32(a[i]));
    else ai = double(a[i]);
    double d = ai - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  if (den == 0.0) return num;
  return num / den;
}
inline double nmse(const std::vector<float>& a, const std::vector<double>& ref) {
  return nmse(a.data(), ref.data(), int64_t(ref.size()));
}
inline double nmse(const std::vector<double>& a, const std::vector<double>& ref) {
  return nmse(a.data(), ref.data(), int64_t(ref.size()));
}

template <typename A>
inline double max_abs_diff(const A* a, const double* ref, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double d = std::abs(double(a[i]) - ref[i]);
    if (std::isnan(d)) return d;
    if (d > m) m = d;
  }
  return m;
}

inline bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}
inline bool all_finite(const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}
inline bool all_finite(const bf16* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(bf16_to_f32(x[i]))) return false;
  return true;
}
template <typename T>
inline bool all_finite(const std::vector<T>& x) {
  return all_finite(x.data(), int64_t(x.size()));
}

// ---------------------------------------------------------------------------------------------
// Guard bytes

// `n` usable elements with `kGuard` sentinel elements on each side. The sentinel is a specific
// bit pattern (for float: a signalling-NaN payload no kernel produces), compared bitwise, so a
// stray write of any value — even the same float value — is detected unless it rewrites the
// exact pattern. Use data() as the kernel's output pointer.
template <typename T>
class GuardedBuffer {
 public:
  static constexpr int64_t kGuard = 64;  // elements per side: covers a full AVX-512 overrun

  explicit GuardedBuffer(int64_t n = 0, T init = T{}) : n_(n), buf_(size_t(n + 2 * kGuard)) {
    T s = sentinel();
    for (int64_t i = 0; i < kGuard; ++i) {
      buf_[size_t(i)] = s;
      buf_[size_t(kGuard + n + i)] = s;
    }
    for (int64_t i = 0; i < n; ++i) buf_[size_t(kGuard + i)] = init;
  }

  T* data() { return buf_.data() + kGuard; }
  const T* data() const { return buf_.data() + kGuard; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) { return data()[i]; }
  const T& operator[](int64_t i) const { return data()[i]; }
  std::vector<T> vec() const { return std::vector<T>(data(), data() + n_); }
  void assign(const T* src) { std::memcpy(data(), src, size_t(n_) * sizeof(T)); }
  void assign(const std::vector<T>& src) { assign(src.data()); }

  // True when every sentinel element still holds its exact bit pattern.
  bool guards_intact() const {
    T s = sentinel();
    for (int64_t i = 0; i < kGuard; ++i) {
      if (std::memcmp(&buf_[size_t(i)], &s, sizeof(T)) != 0) return false;
      if (std::memcmp(&buf_[size_t(kGuard + n_ + i)], &s, sizeof(T)) != 0) return false;
    }
    return true;
  }

  static T sentinel() {
    T s;
    if constexpr (sizeof(T) == 4) {
      uint32_t bits = 0x7fa5a5a5u;  // a NaN with a payload (float) / a large int (int32)
      std::memcpy(&s, &bits, 4);
    } else if constexpr (sizeof(T) == 8) {
      uint64_t bits = 0x7ff5a5a5a5a5a5a5ull;
      std::memcpy(&s, &bits, 8);
    } else if constexpr (sizeof(T) == 2) {
      uint16_t bits = 0x7fa5u;
      std::memcpy(&s, &bits, 2);
    } else {
      std::memset(&s, 0xa5, sizeof(T));
    }
    return s;
  }

 private:
  int64_t n_;
  std::vector<T> buf_;
};

// ---------------------------------------------------------------------------------------------
// Finite differences (float64)

// Central differences of scalar f at x: g[i] = (f(x + h e_i) - f(x - h e_i)) / (2h).
// Error O(h^2 f''') + O(eps f / h); h = 1e-6 balances them for O(1) inputs in float64, giving
// ~1e-9 relative accuracy. `x` is perturbed in place and restored.
inline std::vector<double> fd_gradient(const std::function<double(const std::vector<double>&)>& f,
                                       std::vector<double> x, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double xi = x[i];
    x[i] = xi + h;
    double fp = f(x);
    x[i] = xi - h;
    double fm = f(x);
    x[i] = xi;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

// Central difference of f along direction d: (f(x + h d) - f(x - h d)) / (2h), to compare with
// dot(grad, d) when x is too big for per-element differences.
inline double fd_directional(const std::function<double(const std::vector<double>&)>& f,
                             const std::vector<double>& x, const std::vector<double>& d,
                             double h = 1e-6) {
  std::vector<double> xp(x), xm(x);
  for (size_t i = 0; i < x.size(); ++i) {
    xp[i] += h * d[i];
    xm[i] -= h * d[i];
  }
  return (f(xp) - f(xm)) / (2.0 * h);
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Random inputs (deterministic: Philox keyed by seed and stream)

inline std::vector<float> random_normal(int64_t n, uint64_t seed, float std = 1.0f,
                                        float mean = 0.0f, uint64_t stream = 0) {
  std::vector<float> v(static_cast<size_t>(n));
  rng_fill_normal(v.data(), n, mean, std, seed, stream, 0);
  return v;
}
inline void fill_normal(float* x, int64_t n, uint64_t seed, float std = 1.0f, float mean = 0.0f,
                        uint64_t stream = 0) {
  rng_fill_normal(x, n, mean, std, seed, stream, 0);
}
inline void fill_uniform(float* x, int64_t n, uint64_t seed, float lo, float hi,
                         uint64_t stream = 0) {
  rng_fill_uniform(x, n, lo, hi, seed, stream, 0);
}
inline std::vector<float> random_uniform(int64_t n, uint64_t seed, float lo, float hi,
                                         uint64_t stream = 0) {
  std::vector<float> v(static_cast<size_t>(n));
  rng_fill_uniform(v.data(), n, lo, hi, seed, stream, 0);
  return v;
}
// Token ids uniform in [0, V).
inline std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed,
                                          uint64_t stream = 1) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng_u64(seed, stream, uint64_t(i)) % uint64_t(V));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Conversions

template <typename T>
inline std::vector<double> to_f64(const T* x, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, bf16>) out[size_t(i)] = double(bf16_to_f32(x[i]));
    else out[size_t(i)] = double(x[i]);
  }
  return out;
}
template <typename T>
inline std::vector<double> to_f64(const std::vector<T>& x) {
  return to_f64(x.data(), int64_t(x.size()));
}
inline std::vector<float> to_f32(const std::vector<double>& x) {
  return std::vector<float>(x.begin(), x.end());
}
inline std::vector<bf16> to_bf16(const std::vector<float>& x) {
  std::vector<bf16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = f32_to_bf16(x[i]);
  return out;
}
inline std::vector<float> bf16_to_f32_vec(const std::vector<bf16>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_f32(x[i]);
  return out;
}
// Rounds each value to the nearest bf16 (kept as float): the inputs a bf16 kernel really sees.
inline std::vector<float> bf16_round(const std::vector<float>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return out;
}

}  // namespace loom::test
