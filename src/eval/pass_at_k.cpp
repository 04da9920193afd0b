// eval/pass_at_k.cpp: see pass_at_k.h for the formula.
#include "eval/pass_at_k.h"

#include "core/error.h"

namespace loom::eval {

double pass_at_k(int64_t n, int64_t c, int64_t k) {
  LOOM_CHECK(n >= 1 && c >= 0 && c <= n, "pass@k needs 0 <= c <= n and n >= 1, got n={} c={}", n,
             c);
  LOOM_CHECK(k >= 1 && k <= n, "pass@{} needs at least k samples per problem, got n={}", k, n);
  if (n - c < k) return 1.0;
  // Ordered product over i = n-c+1 .. n: fixed order, so the value is reproducible bit for bit.
  double fail = 1.0;
  for (int64_t i = n - c + 1; i <= n; ++i) fail *= 1.0 - double(k) / double(i);
  return 1.0 - fail;
}

std::optional<double> mean_pass_at_k(const std::vector<std::pair<int64_t, int64_t>>& counts,
                                     int64_t k) {
  if (counts.empty()) return std::nullopt;
  double sum = 0.0;
  for (const auto& [n, c] : counts) {
    if (n < k) return std::nullopt;
    sum += pass_at_k(n, c, k);
  }
  return sum / double(counts.size());
}

}  // namespace loom::eval
