// kernels/ref/attention_ref.cpp: plain float64 attention (see attention_ref.h). Written for
// obviousness, not speed: one (b, h) at a time, full score matrix, two-pass softmax.
#include "kernels/ref/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"

namespace loom::kernels::ref {

namespace {

void check_shape(const AttentionRefShape& s) {
  LOOM_CHECK(s.B >= 0 && s.Tq >= 0 && s.Tk >= 0, "attention_ref: B={} Tq={} Tk={} must be >= 0",
             s.B, s.Tq, s.Tk);
  LOOM_CHECK(s.NH > 0 && s.NKV > 0 && s.HD > 0, "attention_ref: NH={} NKV={} HD={} must be > 0",
             s.NH, s.NKV, s.HD);
  LOOM_CHECK(s.NH % s.NKV == 0, "attention_ref: NKV={} must divide NH={}", s.NKV, s.NH);
}

bool visible(const AttentionRefShape& s, int64_t i, int64_t j) {
  return !s.causal || s.k_offset + j <= s.q_offset + i;
}

// Softmax probabilities P (Tq, Tk) and lse (Tq) of one (b, h).
void probabilities(std::vector<double>& P, std::vector<double>& lse, const double* q,
                   const double* k, const AttentionRefShape& s, int64_t b, int64_t h) {
  const int64_t group = s.NH / s.NKV, kvh = h / group;
  const double kNegInf = -std::numeric_limits<double>::infinity();
  P.assign(size_t(s.Tq * s.Tk), 0.0);  // (Tq, Tk)
  lse.assign(size_t(s.Tq), kNegInf);   // (Tq)
  for (int64_t i = 0; i < s.Tq; ++i) {
    const double* qi = q + ((b * s.Tq + i) * s.NH + h) * s.HD;
    double* row = P.data() + i * s.Tk;
    double mx = kNegInf;
    for (int64_t j = 0; j < s.Tk; ++j) {
      if (!visible(s, i, j)) continue;
      const double* kj = k + ((b * s.Tk + j) * s.NKV + kvh) * s.HD;
      double dot = 0.0;
      for (int64_t d = 0; d < s.HD; ++d) dot += qi[d] * kj[d];
      row[j] = s.scale * dot;
      mx = std::max(mx, row[j]);
    }
    if (mx == kNegInf) continue;  // no visible key: P row stays 0, lse -inf
    double sum = 0.0;
    for (int64_t j = 0; j < s.Tk; ++j)
      if (visible(s, i, j)) sum += std::exp(row[j] - mx);
    for (int64_t j = 0; j < s.Tk; ++j)
      row[j] = visible(s, i, j) ? std::exp(row[j] - mx) / sum : 0.0;
    lse[size_t(i)] = mx + std::log(sum);
  }
}

}  // namespace

void attention_forward_ref(double* out, double* lse, const double* q, const double* k,
                           const double* v, const AttentionRefShape& s) {
  check_shape(s);
  const int64_t group = s.NH / s.NKV;
  std::vector<double> P, row_lse;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.NH; ++h) {
      probabilities(P, row_lse, q, k, s, b, h);
      for (int64_t i = 0; i < s.Tq; ++i) {
        double* oi = out + ((b * s.Tq + i) * s.NH + h) * s.HD;
        for (int64_t d = 0; d < s.HD; ++d) oi[d] = 0.0;
        for (int64_t j = 0; j < s.Tk; ++j) {
          const double p = P[size_t(i * s.Tk + j)];
          const double* vj = v + ((b * s.Tk + j) * s.NKV + h / group) * s.HD;
          for (int64_t d = 0; d < s.HD; ++d) oi[d] += p * vj[d];
        }
        if (lse) lse[(b * s.NH + h) * s.Tq + i] = row_lse[size_t(i)];
      }
    }
}

void attention_backward_ref(double* dq, double* dk, double* dv, const double* dout,
                            const double* q, const double* k, const double* v,
                            const AttentionRefShape& s) {
  check_shape(s);
  const int64_t group = s.NH / s.NKV;
  std::fill(dq, dq + s.B * s.Tq * s.NH * s.HD, 0.0);
  std::fill(dk, dk + s.B * s.Tk * s.NKV * s.HD, 0.0);
  std::fill(dv, dv + s.B * s.Tk * s.NKV * s.HD, 0.0);
  std::vector<double> P, row_lse, dP(size_t(s.Tk));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.NH; ++h) {
      const int64_t kvh = h / group;
      probabilities(P, row_lse, q, k, s, b, h);
      for (int64_t i = 0; i < s.Tq; ++i) {
        const double* doi = dout + ((b * s.Tq + i) * s.NH + h) * s.HD;
        const double* qi = q + ((b * s.Tq + i) * s.NH + h) * s.HD;
        double* dqi = dq + ((b * s.Tq + i) * s.NH + h) * s.HD;
        const double* Pi = P.data() + i * s.Tk;
        // dP_ij = dout_i . v_j; rowsum(dP * P) equals dout_i . out_i.
        double rowsum = 0.0;
        for (int64_t j = 0; j < s.Tk; ++j) {
          const double* vj = v + ((b * s.Tk + j) * s.NKV + kvh) * s.HD;
          double dot = 0.0;
          for (int64_t d = 0; d < s.HD; ++d) dot += doi[d] * vj[d];
          dP[size_t(j)] = dot;
          rowsum += dot * Pi[j];
        }
        for (int64_t j = 0; j < s.Tk; ++j) {
          if (Pi[j] == 0.0) continue;  // masked (or underflowed): no gradient flows
          const double ds = Pi[j] * (dP[size_t(j)] - rowsum);
          const double* kj = k + ((b * s.Tk + j) * s.NKV + kvh) * s.HD;
          double* dkj = dk + ((b * s.Tk + j) * s.NKV + kvh) * s.HD;
          double* dvj = dv + ((b * s.Tk + j) * s.NKV + kvh) * s.HD;
          for (int64_t d = 0; d < s.HD; ++d) {
            dqi[d] += s.scale * ds * kj[d];
            dkj[d] += s.scale * ds * qi[d];
            dvj[d] += Pi[j] * doi[d];
          }
        }
      }
    }
}

}  // namespace loom::kernels::ref
