// A naive float64 reference of the whole model (loops, no tiling, no fusion), written from the
// model definition and independent of model/gpt.cpp: the "reference path" that finite
// differences run through.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace loom::reftest {

// Mean cross-entropy over the B*T positions of tokens (B, T+1), with weights given as doubles in
// the flat layout of model::ParamLayout. Sparse blocks (model/config.h MoeConfig): rre routes
// token t of domain d to expert d*G + table[d][t] (domains (B,T); empty: all "other"); topk
// mixes its top_k experts by their softmax probabilities (no capacity limit and no aux loss:
// tests call it with a capacity that drops nothing and aux_loss_coef = 0).
inline double reference_loss(const model::ModelConfig& cfg, const model::ParamLayout& layout,
                             const std::vector<double>& w, const std::vector<int32_t>& tokens,
                             int64_t B, int64_t T, const std::vector<int32_t>& domains = {}) {
  const int64_t C = cfg.d_model, NH = cfg.n_heads, NKV = cfg.n_kv_heads, HD = cfg.head_dim(),
                KV = cfg.kv_dim(), F = cfg.d_ff, V = cfg.vocab;
  const double eps = cfg.norm_eps;
  using Mat = std::vector<double>;  // row-major (T, width) for one batch row
  auto ln = [&](const Mat& x, int64_t wo, int64_t bo) {
    Mat y(x.size());
    for (int64_t t = 0; t < T; ++t) {
      double mean = 0, var = 0;
      for (int64_t c = 0; c < C; ++c) mean += x[t * C + c];
      mean /= double(C);
      for (int64_t c = 0; c < C; ++c) var += (x[t * C + c] - mean) * (x[t * C + c] - mean);
      var /= double(C);
      double r = 1.0 / std::sqrt(var + eps);
      for (int64_t c = 0; c < C; ++c)
        y[t * C + c] = (x[t * C + c] - mean) * r * w[size_t(wo + c)] + w[size_t(bo + c)];
    }
    return y;
  };
  // y (T, out) = x (T, in) W^T + b, W at offset wo stored (out, in)
  auto linear = [&](const Mat& x, int64_t in, int64_t out, int64_t wo, int64_t bo) {
    Mat y(size_t(T * out));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double s = w[size_t(bo + o)];
        for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * w[size_t(wo + o * in + i)];
        y[t * out + o] = s;
      }
    return y;
  };
  auto act = [&](double x) {
    if (cfg.activation == model::Activation::gelu)
      return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    if (cfg.activation == model::Activation::gelu_erf)
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    return x / (1.0 + std::exp(-1.702 * x));
  };
  // Attention of q (T,C) over k, v (T,KV), causal, GQA.
  auto attend = [&](const Mat& q, const Mat& k, const Mat& v) {
    Mat o(size_t(T * C), 0.0);
    const double scale = 1.0 / std::sqrt(double(HD));
    for (int64_t h = 0; h < NH; ++h) {
      int64_t g = h / (NH / NKV);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(size_t(i + 1));
        double mx = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double d = 0;
          for (int64_t e = 0; e < HD; ++e) d += q[i * C + h * HD + e] * k[j * KV + g * HD + e];
          s[size_t(j)] = d * scale;
          mx = std::max(mx, s[size_t(j)]);
        }
        double z = 0;
        for (auto& x : s) z += (x = std::exp(x - mx));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t e = 0; e < HD; ++e)
            o[i * C + h * HD + e] += s[size_t(j)] / z * v[j * KV + g * HD + e];
      }
    }
    return o;
  };
  std::vector<int32_t> cur_tokens, cur_domains;  // (T) of the batch row being run
  // One block; qin = null for an ordinary block.
  auto block = [&](const Mat& x, const model::BlockOffsets& b, const Mat* qin) {
    Mat a = ln(x, b.norm1_w, b.norm1_b);
    Mat q, k, v;
    if (!qin) {
      q = linear(a, C, C, b.w_qkv, b.b_qkv);
    } else {
      q = linear(*qin, C, C, b.w_qkv, b.b_qkv);
    }
    k = linear(a, C, KV, b.w_qkv + C * C, b.b_qkv + C);
    v = linear(a, C, KV, b.w_qkv + C * C + KV * C, b.b_qkv + C + KV);
    Mat o = attend(q, k, v);
    Mat p = linear(o, C, C, b.w_out, b.b_out);
    Mat mid(x.size());
    for (size_t i = 0; i < x.size(); ++i) mid[i] = x[i] + p[i];
    if (b.sparse()) {
      const model::MoeConfig& m = cfg.moe;
      const int64_t Fe = m.expert_d_ff, E = m.experts;
      const int64_t stride = 2 * Fe * C + Fe + C;
      Mat a2 = ln(mid, b.norm2_w, b.norm2_b);
      for (int64_t t = 0; t < T; ++t) {
        Mat xt(a2.begin() + t * C, a2.begin() + (t + 1) * C);
        // expert e on this row: down(act(up x))
        auto ffn = [&](int64_t e) {
          const int64_t base = b.moe_experts + e * stride;
          Mat h(static_cast<size_t>(Fe)), y(static_cast<size_t>(C));
          for (int64_t f = 0; f < Fe; ++f) {
            double s = w[size_t(base + Fe * C + f)];
            for (int64_t c = 0; c < C; ++c) s += xt[size_t(c)] * w[size_t(base + f * C + c)];
            h[size_t(f)] = act(s);
          }
          for (int64_t c = 0; c < C; ++c) {
            double s = w[size_t(base + 2 * Fe * C + Fe + c)];
            for (int64_t f = 0; f < Fe; ++f)
              s += h[size_t(f)] * w[size_t(base + Fe * C + Fe + c * Fe + f)];
            y[size_t(c)] = s;
          }
          return y;
        };
        Mat out(static_cast<size_t>(C), 0.0);
        if (m.router == model::Router::rre) {
          const int64_t d = cur_domains.empty() ? m.other_domain() : cur_domains[size_t(t)];
          const int64_t tok = cur_tokens[size_t(t)];
          const int64_t e = d * m.experts_per_domain + int64_t(w[size_t(b.moe_table + d * V + tok)]);
          out = ffn(e);
        } else {
          std::vector<double> p(static_cast<size_t>(E));
          double mx = -1e300, z = 0;
          for (int64_t e = 0; e < E; ++e) {
            double s = 0;
            for (int64_t c = 0; c < C; ++c) s += xt[size_t(c)] * w[size_t(b.moe_gate + e * C + c)];
            p[size_t(e)] = s;
            mx = std::max(mx, s);
          }
          for (auto& v : p) z += (v = std::exp(v - mx));
          for (auto& v : p) v /= z;
          std::vector<int64_t> idx(static_cast<size_t>(E));
          for (int64_t e = 0; e < E; ++e) idx[size_t(e)] = e;
          std::stable_sort(idx.begin(), idx.end(),
                           [&](int64_t a, int64_t c) { return p[size_t(a)] > p[size_t(c)]; });
          for (int64_t j = 0; j < m.top_k; ++j) {
            Mat y = ffn(idx[size_t(j)]);
            for (int64_t c = 0; c < C; ++c) out[size_t(c)] += p[size_t(idx[size_t(j)])] * y[size_t(c)];
          }
        }
        for (int64_t c = 0; c < C; ++c) mid[size_t(t * C + c)] += out[size_t(c)];
      }
      return mid;
    }
    Mat f = linear(ln(mid, b.norm2_w, b.norm2_b), C, F, b.w_up, b.b_up);
    for (auto& e : f) e = act(e);
    Mat d = linear(f, F, C, b.w_down, b.b_down);
    for (size_t i = 0; i < x.size(); ++i) mid[i] += d[i];
    return mid;
  };

  double total = 0;
  for (int64_t bi = 0; bi < B; ++bi) {
    const int32_t* row = tokens.data() + bi * (T + 1);
    cur_tokens.assign(row, row + T);
    if (!domains.empty()) cur_domains.assign(domains.begin() + bi * T, domains.begin() + (bi + 1) * T);
    Mat h(size_t(T * C));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        h[t * C + c] = w[size_t(layout.token_embedding() + row[t] * C + c)] +
                       w[size_t(layout.position_embedding() + t * C + c)];
    for (int64_t l = 0; l < cfg.n_layers; ++l) h = block(h, layout.block(l), nullptr);
    h = ln(h, layout.final_norm_w(), layout.final_norm_b());
    if (cfg.query_layer) {
      Mat qin(size_t(T * C));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c)
          qin[t * C + c] = w[size_t(layout.query_position() + t * C + c)];
      h = block(h, layout.query_block(), &qin);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> logits(static_cast<size_t>(V));
      double mx = -1e300;
      for (int64_t vv = 0; vv < V; ++vv) {
        double s = 0;
        for (int64_t c = 0; c < C; ++c)
          s += h[t * C + c] * w[size_t(layout.token_embedding() + vv * C + c)];
        logits[size_t(vv)] = s;
        mx = std::max(mx, s);
      }
      double z = 0;
      for (double l : logits) z += std::exp(l - mx);
      total += mx + std::log(z) - logits[size_t(row[t + 1])];
    }
  }
  return total / double(B * T);
}

}  // namespace loom::reftest
