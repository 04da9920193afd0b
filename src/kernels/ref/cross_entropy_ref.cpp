// kernels/ref/cross_entropy_ref.cpp
#include "kernels/ref/cross_entropy_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace loom::kernels::ref {

void logits_forward(double* logits, const double* h, const double* wte, int64_t N, int64_t C,
                    int64_t V) {
  for (int64_t r = 0; r < N; ++r)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += h[r * C + c] * wte[v * C + c];
      logits[r * V + v] = s;
    }
}

double cross_entropy_head(double* dh, double* dwte, int64_t* n_counted, const double* h,
                          const double* wte, const int32_t* targets, int64_t N, int64_t C,
                          int64_t V, double grad_scale) {
  for (int64_t r = 0; r < N; ++r)
    LOOM_CHECK(int64_t(targets[r]) < V, "target {} at row {} is >= V={}", targets[r], r, V);
  std::vector<double> logits(static_cast<size_t>(N * V));  // (N,V)
  logits_forward(logits.data(), h, wte, N, C, V);
  double loss = 0.0;
  int64_t counted = 0;
  if (dh) std::fill(dh, dh + N * C, 0.0);
  for (int64_t r = 0; r < N; ++r) {
    if (targets[r] < 0) continue;
    const double* l = logits.data() + r * V;
    double mx = *std::max_element(l, l + V);
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(l[v] - mx);
    loss += mx + std::log(sum) - l[targets[r]];
    ++counted;
    for (int64_t v = 0; v < V; ++v) {
      double g = grad_scale * (std::exp(l[v] - mx) / sum - (v == targets[r] ? 1.0 : 0.0));
      for (int64_t c = 0; c < C; ++c) {
        if (dh) dh[r * C + c] += g * wte[v * C + c];
        if (dwte) dwte[v * C + c] += g * h[r * C + c];
      }
    }
  }
  if (n_counted) *n_counted = counted;
  return loss;
}

}  // namespace loom::kernels::ref
