// kernels/cpu/cross_entropy.cpp
// Glossary: N rows, C width, V vocabulary, R = rows in the current block (<= rows_per_block).
//
// Per block of R rows:
//   logits (R,V) = h_blk (R,C) @ wte^T                     matmul, trans_b
//   per row: max, p = exp(l - max) / sum, loss = max + log(sum) - l[target]
//   dlogits (R,V) = grad_scale * (p - onehot(target))       in place over logits
//   dh_blk (R,C)  = dlogits @ wte                            matmul, overwrite
//   dwte (V,C)   += dlogits^T @ h_blk                        matmul, trans_a, accumulate
// so workspace is O(R*V) whatever N is.
#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/vec_math.h"

namespace loom::kernels {

namespace {

void check_args(const int32_t* targets, int64_t N, int64_t C, int64_t V, int64_t rows_per_block) {
  LOOM_CHECK(N >= 0 && C > 0 && V > 0,
             "cross_entropy_head needs N >= 0, C > 0, V > 0; got N={} C={} V={}", N, C, V);
  LOOM_CHECK(rows_per_block >= 1, "cross_entropy_head: rows_per_block={} must be >= 1",
             rows_per_block);
  for (int64_t r = 0; r < N; ++r) {
    LOOM_CHECK(int64_t(targets[r]) < V,
               "cross_entropy_head: target {} at row {} is >= V={}; targets must be in [0, V) "
               "or negative to be ignored",
               targets[r], r, V);
  }
}

// Softmax cross-entropy of one row of logits l (V). Returns the row's loss (f64). When `grad`,
// l is overwritten with grad_scale * (softmax - onehot(target)).
double softmax_row(float* l, int64_t V, int32_t target, bool grad, float grad_scale) {
  float mx = l[0];
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, l[j]);
  const float l_target = l[target];
  float sum = 0.0f;
  if (grad) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      float e = vec::exp_f32(l[j] - mx);
      l[j] = e;
      sum += e;
    }
    const float scale = grad_scale / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) l[j] *= scale;
    l[target] -= grad_scale;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += vec::exp_f32(l[j] - mx);
  }
  return double(mx) + std::log(double(sum)) - double(l_target);
}

template <typename T>
double cross_entropy_impl(float* dh, float* dwte, int64_t* n_counted, const T* h, const T* wte,
                          const int32_t* targets, int64_t N, int64_t C, int64_t V,
                          float grad_scale, MemoryPool& pool, int64_t rows_per_block,
                          bool round_grad_to_bf16) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  check_args(targets, N, C, V, rows_per_block);
  const bool backward = dh != nullptr || dwte != nullptr;
  const int64_t R_max = std::min(rows_per_block, std::max<int64_t>(N, 1));
  Tensor logits = Tensor::empty({R_max, V}, DType::f32, pool, MemCategory::workspace);  // (R,V)
  Tensor dlogits_lo;  // (R,V) bf16 copy of the logits gradient, for the bf16 products
  if (kBf16 && backward)
    dlogits_lo = Tensor::empty({R_max, V}, DType::bf16, pool, MemCategory::workspace);
  std::vector<double> row_loss(static_cast<size_t>(R_max));  // (R)
  float* lg = logits.data<float>();

  double loss_sum = 0.0;
  int64_t counted = 0;
  for (int64_t r0 = 0; r0 < N; r0 += R_max) {
    const int64_t R = std::min(R_max, N - r0);
    const T* h_blk = h + r0 * C;  // (R,C)
    if constexpr (kBf16) matmul_bf16(h_blk, wte, lg, R, V, C, false, true, false);
    else matmul_f32(h_blk, wte, lg, R, V, C, false, true, false);

#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      float* l = lg + i * V;  // (V)
      const int32_t tgt = targets[r0 + i];
      if (tgt < 0) {
        row_loss[size_t(i)] = 0.0;
        if (backward) std::fill(l, l + V, 0.0f);
      } else {
        row_loss[size_t(i)] = softmax_row(l, V, tgt, backward, grad_scale);
      }
    }
    for (int64_t i = 0; i < R; ++i) {  // row order: deterministic
      if (targets[r0 + i] >= 0) {
        loss_sum += row_loss[size_t(i)];
        ++counted;
      }
    }
    if (!backward) continue;
    if constexpr (kBf16) {
      bf16* dl = dlogits_lo.data<bf16>();
      convert_f32_to_bf16(lg, dl, size_t(R * V));
      if (dh) matmul_bf16(dl, wte, dh + r0 * C, R, C, V, false, false, false);
      if (dwte) matmul_bf16(dl, h_blk, dwte, V, C, R, true, false, true);
    } else {
      if (round_grad_to_bf16) round_f32_to_bf16(lg, lg, size_t(R * V));
      if (dh) matmul_f32(lg, wte, dh + r0 * C, R, C, V, false, false, false);
      if (dwte) matmul_f32(lg, h_blk, dwte, V, C, R, true, false, true);
    }
  }
  if (n_counted) *n_counted = counted;
  return loss_sum;
}

}  // namespace

double cross_entropy_head(float* dh, float* dwte, int64_t* n_counted, const float* h,
                          const float* wte, const int32_t* targets, int64_t N, int64_t C,
                          int64_t V, float grad_scale, MemoryPool& pool, int64_t rows_per_block,
                          bool round_grad_to_bf16) {
  return cross_entropy_impl(dh, dwte, n_counted, h, wte, targets, N, C, V, grad_scale, pool,
                            rows_per_block, round_grad_to_bf16);
}

double cross_entropy_head_bf16(float* dh, float* dwte, int64_t* n_counted, const bf16* h,
                               const bf16* wte, const int32_t* targets, int64_t N, int64_t C,
                               int64_t V, float grad_scale, MemoryPool& pool,
                               int64_t rows_per_block) {
  return cross_entropy_impl(dh, dwte, n_counted, h, wte, targets, N, C, V, grad_scale, pool,
                            rows_per_block, false);
}

void logits_forward(float* logits, const float* h, const float* wte, int64_t N, int64_t C, int64_t V) {
  matmul_f32(h, wte, logits, N, V, C, false, true, false);
}

void logits_forward_bf16(float* logits, const bf16* h, const bf16* wte, int64_t N, int64_t C,
                         int64_t V) {
  matmul_bf16(h, wte, logits, N, V, C, false, true, false);
}

}  // namespace loom::kernels
