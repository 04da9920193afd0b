// kernels/ref/attention_ref.h: naive float64 attention, the reference the flash kernels are
// tested against. It materialises the (Tq, Tk) score matrix per (batch, head): use it on test
// sizes only.
//
// Glossary: B batch, Tq query length, Tk key length, NH query heads, NKV key/value heads (NKV
// divides NH; query head h uses kv head h / (NH/NKV)), HD head dim.
// Layout (contiguous, no row strides): q, out, dout (B, Tq, NH, HD); k, v (B, Tk, NKV, HD);
// lse (B, NH, Tq).
#pragma once

#include <cstdint>

namespace loom::kernels::ref {

struct AttentionRefShape {
  int64_t B, Tq, Tk, NH, NKV, HD;
  bool causal;
  // Key j is visible to query i iff !causal || k_offset + j <= q_offset + i.
  int64_t q_offset = 0, k_offset = 0;
  double scale;
};

// out = softmax(scale * q k^T + mask) v; lse = log sum_j exp(scale * q_i.k_j) over visible j.
// A row with no visible key gets out = 0 and lse = -inf. Overwrites out and lse (lse may be
// null). Throws loom::Error on inconsistent shapes.
void attention_forward_ref(double* out, double* lse, const double* q, const double* k,
                           const double* v, const AttentionRefShape& s);

// Analytic gradients of L = sum(dout * out) with respect to q, k, v, recomputing P from
// scratch: dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)), dq = scale dS k,
// dk = scale dS^T q (summed over the query heads sharing a kv head). OVERWRITES dq, dk, dv.
void attention_backward_ref(double* dq, double* dk, double* dv, const double* dout,
                            const double* q, const double* k, const double* v,
                            const AttentionRefShape& s);

}  // namespace loom::kernels::ref
