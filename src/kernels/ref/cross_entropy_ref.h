// kernels/ref/cross_entropy_ref.h: float64 tied-head softmax cross-entropy, the reference for
// cpu/cross_entropy.h. Materialises the full (N,V) logits (it is a reference). Same contract:
// returns the loss sum over rows with targets >= 0, writes *n_counted (may be null),
// dh (N,C) OVERWRITTEN and dwte (V,C) ACCUMULATED with grad_scale * gradient (either may be
// null). A target >= V throws loom::Error.
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

double cross_entropy_head(double* dh, double* dwte, int64_t* n_counted, const double* h,
                          const double* wte, const int32_t* targets, int64_t N, int64_t C,
                          int64_t V, double grad_scale);
void logits_forward(double* logits, const double* h, const double* wte, int64_t N, int64_t C,
                    int64_t V);

}  // namespace loom::kernels::ref
