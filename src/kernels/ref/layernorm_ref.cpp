// kernels/ref/layernorm_ref.cpp
// Backward written from the chain rule, term by term, rather than the fused formula the fast
// kernel uses, so the two are independent derivations:
//   out = xhat*w + b, xhat = (x - mu) * rstd, rstd = (var + eps)^-1/2
//   dxhat = dout*w; dvar = sum(dxhat*(x-mu)) * -0.5*rstd^3; dmu = -rstd*sum(dxhat) + dvar*(-2/C)sum(x-mu)
//   dx = dxhat*rstd + dvar*2(x-mu)/C + dmu/C
#include "kernels/ref/layernorm_ref.h"

#include <cmath>

namespace loom::kernels::ref {

void layernorm_forward(double* out, double* mean, double* rstd, const double* x, const double* w,
                       const double* b, int64_t N, int64_t C, double eps) {
  for (int64_t r = 0; r < N; ++r) {
    const double* xr = x + r * C;
    double mu = 0.0;
    for (int64_t i = 0; i < C; ++i) mu += xr[i];
    mu /= double(C);
    double var = 0.0;
    for (int64_t i = 0; i < C; ++i) var += (xr[i] - mu) * (xr[i] - mu);
    var /= double(C);
    double s = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < C; ++i) out[r * C + i] = (xr[i] - mu) * s * w[i] + b[i];
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = s;
  }
}

void layernorm_backward(double* dx, double* dw, double* db, const double* dout, const double* x,
                        const double* w, const double* mean, const double* rstd, int64_t N,
                        int64_t C) {
  for (int64_t r = 0; r < N; ++r) {
    const double* xr = x + r * C;
    const double* dor = dout + r * C;
    const double mu = mean[r], s = rstd[r];
    double dvar = 0.0, sum_dxhat = 0.0, sum_xmu = 0.0;
    for (int64_t i = 0; i < C; ++i) {
      double dxhat = dor[i] * w[i];
      dvar += dxhat * (xr[i] - mu);
      sum_dxhat += dxhat;
      sum_xmu += xr[i] - mu;
      dw[i] += dor[i] * (xr[i] - mu) * s;
      db[i] += dor[i];
    }
    dvar *= -0.5 * s * s * s;
    double dmu = -s * sum_dxhat + dvar * (-2.0 / double(C)) * sum_xmu;
    for (int64_t i = 0; i < C; ++i) {
      double dxhat = dor[i] * w[i];
      dx[r * C + i] += dxhat * s + dvar * 2.0 * (xr[i] - mu) / double(C) + dmu / double(C);
    }
  }
}

}  // namespace loom::kernels::ref
