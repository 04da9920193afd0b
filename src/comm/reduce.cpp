#include "comm/reduce.h"

#include <cmath>
#include <type_traits>

#include "core/error.h"

namespace loom::comm {

namespace {

// Below this many elements one thread is faster than waking a team (and ranks usually get a
// single OpenMP thread each anyway).
constexpr int64_t kParallelMin = int64_t(1) << 18;

template <typename T>
void sum_kernel(T* dst, const T* a, const T* b, int64_t n) {
  if constexpr (std::is_integral_v<T>) {
    // Wrap-around integer sums without signed-overflow UB.
    using U = std::make_unsigned_t<T>;
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) dst[i] = T(U(a[i]) + U(b[i]));
  } else {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) dst[i] = a[i] + b[i];
  }
}

template <typename T>
void max_kernel(T* dst, const T* a, const T* b, int64_t n) {
  if constexpr (std::is_integral_v<T>) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) dst[i] = a[i] < b[i] ? b[i] : a[i];
  } else {
    // (a < b || b != b) picks b when b is larger or NaN; a NaN in a is kept since a < b is false.
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) dst[i] = (a[i] < b[i] || b[i] != b[i]) ? b[i] : a[i];
  }
}

template <typename T>
void reduce_typed(void* dst, const void* a, const void* b, int64_t n, ReduceOp op) {
  // No __restrict__: dst may equal a or b exactly. GCC still vectorises behind a runtime
  // overlap check, and exact aliasing is safe because element i is read before it is written.
  T* d = static_cast<T*>(dst);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  if (op == ReduceOp::sum)
    sum_kernel(d, x, y, n);
  else
    max_kernel(d, x, y, n);
}

}  // namespace

void reduce_into(void* dst, const void* a, const void* b, int64_t n, DType dtype, ReduceOp op) {
  switch (dtype) {
    case DType::f32: return reduce_typed<float>(dst, a, b, n, op);
    case DType::i32: return reduce_typed<int32_t>(dst, a, b, n, op);
    case DType::i64: return reduce_typed<int64_t>(dst, a, b, n, op);
    case DType::u8: return reduce_typed<uint8_t>(dst, a, b, n, op);
    case DType::i8: return reduce_typed<int8_t>(dst, a, b, n, op);
    case DType::f64: return reduce_typed<double>(dst, a, b, n, op);
    case DType::bf16: break;
    case DType::f16: break;
  }
  LOOM_FAIL("reduce_into does not take {}: reduce bf16 in f32 and round once", dtype_name(dtype));
}

}  // namespace loom::comm
