#include "model/head.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/vec_math.h"

namespace loom::model {

namespace K = loom::kernels;

namespace {

// Vocabulary-parallel tied head + cross-entropy over all N rows h (N,C), with this rank's
// vocabulary rows wte [v0, v0+Vl) (Vl,C). Per block of R rows: local logits (R,Vl); the row max
// is all-reduced (max), then the sum of exp(l - max) and the target's logit (held by one rank)
// are all-reduced (sum) together; loss_r = max + log(sum) - l[target]. Backward: dlogits =
// grad_scale * (softmax - onehot) on this rank's columns; dh (N,C) is OVERWRITTEN with this
// rank's partial sum dlogits @ wte (the caller sums over tp), dwte (Vl,C) ACCUMULATES.
template <typename T>
double vocab_parallel_ce(float* dh, float* dwte, int64_t* n_counted, const T* h, const T* wte,
                         int64_t v0, const int32_t* targets, int64_t N, int64_t C, int64_t Vl,
                         float grad_scale, MemoryPool& pool, int64_t rows_per_block,
                         const comm::ProcessGroup& tp, bool round_grad_to_bf16) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const bool backward = dh != nullptr;
  const int64_t R_max = std::min(rows_per_block, std::max<int64_t>(N, 1));
  Tensor logits = Tensor::empty({R_max, Vl}, DType::f32, pool, MemCategory::workspace);
  Tensor dl_lo;
  if (kBf16 && backward) dl_lo = Tensor::empty({R_max, Vl}, DType::bf16, pool, MemCategory::workspace);
  std::vector<float> mx(static_cast<size_t>(R_max)), st(static_cast<size_t>(2 * R_max));  // max; (sum, target logit)
  float* lg = logits.data<float>();
  double loss_sum = 0;
  int64_t counted = 0;
  for (int64_t r0 = 0; r0 < N; r0 += R_max) {
    const int64_t R = std::min(R_max, N - r0);
    const T* h_blk = h + r0 * C;
    if constexpr (kBf16) K::matmul_bf16(h_blk, wte, lg, R, Vl, C, false, true, false);
    else K::matmul_f32(h_blk, wte, lg, R, Vl, C, false, true, false);
    for (int64_t i = 0; i < R; ++i) {
      const float* l = lg + i * Vl;
      float m = l[0];
      for (int64_t j = 1; j < Vl; ++j) m = std::max(m, l[j]);
      mx[size_t(i)] = m;
    }
    tp.all_reduce(comm::BufferRef(mx.data(), R, DType::f32), comm::ReduceOp::max).wait();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      float* l = lg + i * Vl;
      const int64_t t = int64_t(targets[r0 + i]) - v0;
      const float m = mx[size_t(i)];
      // The target's logit (held by exactly one rank; 0 elsewhere, summed below).
      st[size_t(2 * i + 1)] = (t >= 0 && t < Vl) ? l[t] : 0.f;
      float sum = 0;
      for (int64_t j = 0; j < Vl; ++j) {
        float e = K::vec::exp_f32(l[j] - m);
        if (backward) l[j] = e;
        sum += e;
      }
      st[size_t(2 * i)] = sum;
    }
    tp.all_reduce(comm::BufferRef(st.data(), 2 * R, DType::f32)).wait();
    for (int64_t i = 0; i < R; ++i) {
      if (targets[r0 + i] < 0) continue;
      loss_sum += double(mx[size_t(i)]) + std::log(double(st[size_t(2 * i)])) -
                  double(st[size_t(2 * i + 1)]);
      ++counted;
    }
    if (!backward) continue;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      float* l = lg + i * Vl;
      const int32_t tgt = targets[r0 + i];
      if (tgt < 0) {
        std::fill(l, l + Vl, 0.0f);
        continue;
      }
      const float scale = grad_scale / st[size_t(2 * i)];
      for (int64_t j = 0; j < Vl; ++j) l[j] *= scale;
      const int64_t t = int64_t(tgt) - v0;
      if (t >= 0 && t < Vl) l[t] -= grad_scale;
    }
    if constexpr (kBf16) {
      bf16* dl = dl_lo.data<bf16>();
      convert_f32_to_bf16(lg, dl, size_t(R * Vl));
      K::matmul_bf16(dl, wte, dh + r0 * C, R, C, Vl, false, false, false);
      K::matmul_bf16(dl, h_blk, dwte, Vl, C, R, true, false, true);
    } else {
      if (round_grad_to_bf16) round_f32_to_bf16(lg, lg, size_t(R * Vl));
      K::matmul_f32(lg, wte, dh + r0 * C, R, C, Vl, false, false, false);
      K::matmul_f32(lg, h_blk, dwte, Vl, C, R, true, false, true);
    }
  }
  if (n_counted) *n_counted = counted;
  return loss_sum;
}

}  // namespace

LossSum tied_head_loss(const BlockCtx& c, const HeadWeights& hw, const Tensor& out,
                       const int32_t* targets, float grad_scale, Tensor* dout,
                       int64_t rows_per_block) {
  const int64_t C = c.cfg.d_model, rows = out.shape()[0];
  LossSum r;
  const bool emulated = c.bf && hw.wte_r != nullptr;
  if (!c.tp) {
    float* dh = dout ? dout->data<float>() : nullptr;
    if (emulated) {
      Tensor out_r = Tensor::empty({rows, C}, DType::f32, c.pool, MemCategory::workspace);
      round_f32_to_bf16(out.data<float>(), out_r.data<float>(), size_t(rows * C));
      r.sum = K::cross_entropy_head(dh, hw.dwte, &r.count, out_r.data<float>(), hw.wte_r, targets,
                                    rows, C, c.cfg.vocab, grad_scale, c.pool, rows_per_block,
                                    /*round_grad_to_bf16=*/true);
    } else if (c.bf) {
      Tensor out_lp = Tensor::empty({rows, C}, DType::bf16, c.pool, MemCategory::workspace);
      convert_f32_to_bf16(out.data<float>(), out_lp.data<bf16>(), size_t(rows * C));
      r.sum = K::cross_entropy_head_bf16(dh, hw.dwte, &r.count, out_lp.data<bf16>(), hw.wte_lp,
                                         targets, rows, C, c.cfg.vocab, grad_scale, c.pool,
                                         rows_per_block);
    } else {
      r.sum = K::cross_entropy_head(dh, hw.dwte, &r.count, out.data<float>(), hw.wte, targets,
                                    rows, C, c.cfg.vocab, grad_scale, c.pool, rows_per_block);
    }
    return r;
  }
  // tp: gather all rows, score this rank's vocabulary rows, reduce-scatter the partial dh.
  const int64_t N = c.rows(), v0 = hw.tok->shard_start, Vl = hw.tok->shape[0];
  Tensor all = gather_rows(c, out, /*as_mm=*/true, MemCategory::workspace);  // (N,C)
  Tensor dh_part;
  if (dout) dh_part = Tensor::empty({N, C}, DType::f32, c.pool, MemCategory::workspace);
  float* dh = dout ? dh_part.data<float>() : nullptr;
  if (c.bf && !emulated)
    r.sum = vocab_parallel_ce(dh, hw.dwte, &r.count, all.data<bf16>(), hw.wte_lp, v0, targets, N,
                              C, Vl, grad_scale, c.pool, rows_per_block, *c.tp, false);
  else  // f32, or emulated bf16 (`all` then holds rounded values, see gather_rows)
    r.sum = vocab_parallel_ce(dh, hw.dwte, &r.count, all.data<float>(),
                              emulated ? hw.wte_r : hw.wte, v0, targets, N, C, Vl, grad_scale,
                              c.pool, rows_per_block, *c.tp, emulated);
  all = Tensor();
  if (dout) {
    Tensor mine = scatter_rows_sum(c, dh_part, MemCategory::workspace);
    std::memcpy(dout->data<float>(), mine.data<float>(), size_t(mine.numel()) * 4);
  }
  return r;
}

Tensor vocab_parallel_embedding(const BlockCtx& c, const ParamSpec& tok, const float* wte,
                                const float* wpe, const int32_t* inputs) {
  const int64_t N = c.rows(), C = c.cfg.d_model, Nl = c.local_rows(), T = c.T;
  const int64_t r0 = c.tp->rank() * Nl, v0 = tok.shard_start, Vl = tok.shape[0];
  // Partial (N,C): rows whose token this rank holds; the others are zero. Summed over tp.
  Tensor part = Tensor::zeros({N, C}, DType::f32, c.pool, MemCategory::workspace);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = int64_t(inputs[n]) - v0;
    if (t >= 0 && t < Vl) std::memcpy(part.data<float>() + n * C, wte + t * C, size_t(C) * 4);
  }
  Tensor h = scatter_rows_sum(c, part, MemCategory::activations);  // (Nl,C)
  for (int64_t i = 0; i < Nl; ++i) {
    float* row = h.data<float>() + i * C;
    const float* p = wpe + c.position((r0 + i) % T) * C;
    for (int64_t j = 0; j < C; ++j) row[j] += p[j];
  }
  return h;
}

void vocab_parallel_embedding_backward(const BlockCtx& c, const ParamSpec& tok, float* dwte,
                                       float* dwpe, const Tensor& dh, const int32_t* inputs) {
  const int64_t N = c.rows(), C = c.cfg.d_model, Nl = c.local_rows(), T = c.T;
  const int64_t r0 = c.tp->rank() * Nl, v0 = tok.shard_start, Vl = tok.shape[0];
  for (int64_t i = 0; i < Nl; ++i) {
    const float* g = dh.data<float>() + i * C;
    float* p = dwpe + c.position((r0 + i) % T) * C;
    for (int64_t j = 0; j < C; ++j) p[j] += g[j];
  }
  Tensor all = gather_rows(c, dh, /*as_mm=*/false, MemCategory::workspace);  // (N,C)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = int64_t(inputs[n]) - v0;
    if (t < 0 || t >= Vl) continue;
    const float* g = all.data<float>() + n * C;
    float* w = dwte + t * C;
    for (int64_t j = 0; j < C; ++j) w[j] += g[j];
  }
}

}  // namespace loom::model
