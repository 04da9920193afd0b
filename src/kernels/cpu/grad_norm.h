// kernels/cpu/grad_norm.h: squared norms for gradient clipping.
//
// sum_squares: sum of x[i]^2 in f64. Deterministic and independent of the thread count: the
//   buffer is cut into fixed chunks of kSumSquaresChunk elements, each chunk summed on its own,
//   and the chunk sums added in chunk order. Callers combine buffers (and ranks) by adding these
//   partial sums in a fixed order, then take sqrt.
// clip_factor: as torch.nn.utils.clip_grad_norm_: min(1, max_norm / (total_norm + 1e-6)).
#pragma once

#include <cstdint>

namespace loom::kernels {

inline constexpr int64_t kSumSquaresChunk = 1 << 16;

double sum_squares(const float* x, int64_t n);
float clip_factor(double total_norm, float max_norm);

}  // namespace loom::kernels
