// comm/reduce.h: the local element-wise reductions the ring collectives apply to received data.
//
// n elements; dst, a, b may alias exactly (dst == a) but must not partially overlap. Integer
// sums wrap modulo 2^bits (as MPI's do on the same types). f32 max follows std::max(a, b)
// semantics except that NaN propagates. bf16 is not accepted: loom reduces bf16 in f32 (see
// process_group.h). Deterministic: element-wise, so any thread count gives the same bits.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace loom::comm {

enum class ReduceOp : uint8_t { sum, max };

// dst[i] = a[i] (op) b[i] for i < n. Throws loom::Error for DType::bf16.
void reduce_into(void* dst, const void* a, const void* b, int64_t n, DType dtype, ReduceOp op);

}  // namespace loom::comm
