// eval/pass_at_k.h: the unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language
// Models Trained on Code"), as the HumanEval and HumanEval-X harnesses compute it.
//
//   pass@k(n, c) = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i),   1 when n-c < k
// with n samples of a problem of which c passed. The product form never forms the huge binomials.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace loom::eval {

// Throws loom::Error unless 0 <= c <= n and 1 <= k <= n.
double pass_at_k(int64_t n, int64_t c, int64_t k);

// Mean of pass_at_k over problems given as (n, c). nullopt when `counts` is empty or any problem
// has n < k (the official harness reports a k only when every problem has at least k samples).
std::optional<double> mean_pass_at_k(const std::vector<std::pair<int64_t, int64_t>>& counts,
                                     int64_t k);

}  // namespace loom::eval
