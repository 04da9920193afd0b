// End-to-end parity with an independent PyTorch implementation (tests/reference/loom_torch.py,
// run by Debian's /usr/bin/python3 with python3-torch): the same weights and batch give the same
// logits, loss and every parameter gradient, then 10 AdamW steps give the same losses.
// Covers: with and without the query layer, gelu, gelu_erf and fast_gelu, GQA.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "checkpoint/safetensors.h"
#include "core/rng.h"
#include "kernels/cpu/grad_norm.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace fs = std::filesystem;
using namespace loom;
using namespace loom::model;

namespace {

bool torch_available() {
  return std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0;
}

// max |a - b| / max |b| over a tensor: the error relative to the tensor's scale. (Per-element
// relative error is meaningless for entries near zero, e.g. gradients of tied rows.)
double scaled_max_error(const float* a, const float* b, int64_t n) {
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return err / std::max(scale, 1e-30);
}

struct Case {
  const char* name;
  bool query_layer;
  Activation act;
  int64_t n_kv_heads;
};

class TorchParity : public ::testing::TestWithParam<Case> {};

TEST_P(TorchParity, LogitsLossGradientsAndTenAdamWSteps) {
  if (!torch_available()) GTEST_SKIP() << "SKIP: /usr/bin/python3 cannot import torch "
                                          "(install Debian's python3-torch)";
  const Case pc = GetParam();
  ModelConfig cfg;
  cfg.name = pc.name;
  cfg.vocab = 97;
  cfg.n_layers = 2;
  cfg.d_model = 32;
  cfg.n_heads = 4;
  cfg.n_kv_heads = pc.n_kv_heads;
  cfg.d_ff = 80;
  cfg.max_seq = 24;
  cfg.activation = pc.act;
  cfg.query_layer = pc.query_layer;
  cfg.validate();
  const int64_t B = 2, T = 16, steps = 10;
  const float lr = 1e-3f;

  MemoryPool pool;
  Gpt m(cfg, pool, Precision::f32);
  m.init_weights(5);
  // Move biases and norms off their initial 0/1 so their gradients are exercised.
  for (int64_t i = 0; i < m.layout().total(); ++i)
    m.weights()[i] += 0.02f * rng_normal(6, 1, uint64_t(i));
  std::vector<int32_t> tokens(size_t(B * (T + 1)));
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = int32_t(rng_u64(8, 2, i) % uint64_t(cfg.vocab));

  fs::path dir = fs::temp_directory_path() / ("loom_parity_" + std::string(pc.name) + "_" +
                                              std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "model.toml") << cfg.to_toml();
  std::vector<checkpoint::TensorToWrite> ws;
  for (auto& s : m.layout().specs())
    ws.push_back({s.name, DType::f32, s.shape, m.weights() + s.offset});
  checkpoint::write_safetensors((dir / "weights.safetensors").string(), ws);
  {
    std::ofstream f(dir / "batch.i32", std::ios::binary);
    f.write(reinterpret_cast<const char*>(tokens.data()), std::streamsize(tokens.size() * 4));
  }
  std::string cmd = "/usr/bin/python3 " + std::string(LOOM_SOURCE_DIR) +
                    "/tests/reference/loom_torch.py --config " + (dir / "model.toml").string() +
                    " --weights " + (dir / "weights.safetensors").string() + " --batch " +
                    (dir / "batch.i32").string() + " --B 2 --T 16 --steps 10 --lr 0.001 "
                    "--beta1 0.9 --beta2 0.95 --eps 1e-8 --weight-decay 0.1 --clip 1.0 "
                    "--dtype float64 --threads 1 --out " + (dir / "torch.safetensors").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  checkpoint::SafetensorsFile ref((dir / "torch.safetensors").string());

  // Logits and loss. The reference runs in float64, so these bound loom's own f32 error:
  // ~20 dependent f32 ops of relative rounding 6e-8 each leave ~1e-6; 1e-4 is the bound
  // and still catches any wrong term.
  std::vector<float> logits(size_t(B * T * cfg.vocab)), ref_logits(logits.size());
  std::vector<int32_t> inputs(size_t(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) inputs[size_t(b * T + t)] = tokens[size_t(b * (T + 1) + t)];
  m.all_logits(logits.data(), inputs.data(), B, T);
  ref.read("logits", DType::f32, {B, T, cfg.vocab}, ref_logits.data());
  EXPECT_LT(scaled_max_error(logits.data(), ref_logits.data(), int64_t(logits.size())), 1e-4);
  double ref_loss = 0;
  ref.read("loss", DType::f64, {1}, &ref_loss);

  m.zero_grads();
  LossSum l = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
  EXPECT_NEAR(l.sum / double(l.count), ref_loss, 1e-4 * ref_loss);
  for (auto& s : m.layout().specs()) {
    std::vector<float> g(size_t(s.numel));
    ref.read("grad." + s.name, DType::f32, s.shape, g.data());
    if (s.name.find("attn.k.bias") != std::string::npos) {
      // Softmax cancels the key bias: both gradients are rounding noise around 0.
      for (int64_t i = 0; i < s.numel; ++i) EXPECT_LT(std::abs(m.grads()[s.offset + i]), 1e-6);
      continue;
    }
    EXPECT_LT(scaled_max_error(m.grads() + s.offset, g.data(), s.numel), 1e-4) << s.name;
  }

  // 10 AdamW steps on the same batch (clip 1.0, decay on matrices only), losses before each.
  optim::AdamWConfig oc;
  oc.lr = lr;
  oc.min_lr = lr;
  oc.beta1 = 0.9f;
  oc.beta2 = 0.95f;
  oc.eps = 1e-8f;
  oc.weight_decay = 0.1f;
  oc.clip = 1.0f;
  optim::AdamW opt(m.layout().specs(), m.layout().total(), oc, pool);
  std::vector<float> before(m.weights(), m.weights() + m.layout().total());
  std::vector<double> ref_losses(steps);
  ref.read("losses", DType::f64, {steps}, ref_losses.data());
  for (int64_t s = 0; s < steps; ++s) {
    m.zero_grads();
    LossSum ls = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T));
    double loss = ls.sum / double(ls.count);
    // Same 1e-4 bound: the trajectories are f32 (loom) vs f64 (reference) through 10 updates.
    EXPECT_NEAR(loss, ref_losses[size_t(s)], 1e-4 * ref_losses[size_t(s)]) << "step " << s + 1;
    double norm = std::sqrt(kernels::sum_squares(m.grads(), m.layout().total()));
    opt.step(m.weights(), m.grads(), kernels::clip_factor(norm, oc.clip));
  }
  // Parameters after the steps: compare the total update (after - before) per tensor in relative
  // L2. Adam divides each gradient by its own RMS, so an element whose gradient is near zero
  // moves by about lr in the direction of its rounding noise, which differs between f32 and f64:
  // those few elements differ by up to ~lr per step. The L2 error over a tensor stays small
  // (measured here: below 2e-3); the key bias, whose gradient is pure noise (softmax cancels
  // it), is left out.
  for (auto& s : m.layout().specs()) {
    if (s.name.find("attn.k.bias") != std::string::npos) continue;
    std::vector<float> p(size_t(s.numel));
    ref.read("param." + s.name, DType::f32, s.shape, p.data());
    double num = 0, den = 0;
    for (int64_t i = 0; i < s.numel; ++i) {
      double ours = double(m.weights()[s.offset + i]) - before[size_t(s.offset + i)];
      double theirs = double(p[size_t(i)]) - before[size_t(s.offset + i)];
      num += (ours - theirs) * (ours - theirs);
      den += theirs * theirs;
    }
    EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-2) << s.name;
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Reference, TorchParity,
    ::testing::Values(Case{"ql_fastgelu_gqa", true, Activation::fast_gelu, 2},
                      Case{"gpt_gelu_mha", false, Activation::gelu, 4},
                      Case{"ql_gelu_mqa", true, Activation::gelu, 1},
                      Case{"gpt_fastgelu_gqa", false, Activation::fast_gelu, 2},
                      Case{"gpt_geluerf_mha", false, Activation::gelu_erf, 4}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// Sparse (MoE) models: the same checks with a sparse middle block. rre routes by (domain, token),
// so the parity is as exact as the dense one; topk's choices agree as long as no row's router
// scores (gate logits) around the k-th choice are within rounding of each other: the reference
// reports the smallest k-th vs (k+1)-th gap over rows and the 10 steps, which must be >= 1e-4
// (the condition; f32 logits carry ~1e-7 relative error).
class TorchParityMoe : public ::testing::TestWithParam<Router> {};

TEST_P(TorchParityMoe, LogitsLossGradientsAndTenAdamWSteps) {
  if (!torch_available()) GTEST_SKIP() << "SKIP: /usr/bin/python3 cannot import torch "
                                          "(install Debian's python3-torch)";
  const Router router = GetParam();
  ModelConfig cfg;
  cfg.name = std::string("moe_") + router_name(router);
  cfg.vocab = 97;
  cfg.n_layers = 3;
  cfg.d_model = 32;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.d_ff = 80;
  cfg.max_seq = 24;
  cfg.activation = Activation::fast_gelu;
  cfg.query_layer = true;
  cfg.moe.sparse_layers = {1};
  cfg.moe.router = router;
  cfg.moe.expert_d_ff = 24;
  if (router == Router::rre) {
    cfg.moe.domains = {"python", "java", "other"};
    cfg.moe.experts_per_domain = 2;
    cfg.moe.experts = 6;
  } else {
    cfg.moe.experts = 4;
    cfg.moe.top_k = 2;
    cfg.moe.capacity_factor = 2.0;  // = E/k: nothing dropped
    cfg.moe.aux_loss_coef = 0.01;
  }
  cfg.validate();
  const int64_t B = 2, T = 16, steps = 10;
  MemoryPool pool;
  Gpt m(cfg, pool, Precision::f32);
  m.init_weights(5);
  for (const ParamSpec& s : m.layout().specs())
    if (s.trainable)
      for (int64_t i = s.offset; i < s.offset + s.numel; ++i)
        m.weights()[i] += 0.02f * rng_normal(6, 1, uint64_t(i));
  if (router == Router::topk) {  // a sharper gate: clear top-2 margins
    const int64_t g = m.layout().block(1).moe_gate;
    for (int64_t i = 0; i < cfg.moe.experts * cfg.d_model; ++i)
      m.weights()[g + i] = 0.5f * rng_normal(7, 1, uint64_t(i));
  }
  std::vector<int32_t> tokens(size_t(B * (T + 1))), domains(size_t(B * T));
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = int32_t(rng_u64(8, 2, i) % uint64_t(cfg.vocab));
  for (size_t i = 0; i < domains.size(); ++i) domains[i] = int32_t(rng_u64(8, 3, i) % 3);
  const int32_t* dom = router == Router::rre ? domains.data() : nullptr;

  fs::path dir = fs::temp_directory_path() / ("loom_parity_" + cfg.name + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "model.toml") << cfg.to_toml();
  std::vector<checkpoint::TensorToWrite> ws;
  for (auto& s : m.layout().specs())
    ws.push_back({s.name, DType::f32, s.shape, m.weights() + s.offset});
  checkpoint::write_safetensors((dir / "weights.safetensors").string(), ws);
  {
    std::ofstream f(dir / "batch.i32", std::ios::binary);
    f.write(reinterpret_cast<const char*>(tokens.data()), std::streamsize(tokens.size() * 4));
    std::ofstream g(dir / "domains.i32", std::ios::binary);
    g.write(reinterpret_cast<const char*>(domains.data()), std::streamsize(domains.size() * 4));
  }
  std::string cmd = "/usr/bin/python3 " + std::string(LOOM_SOURCE_DIR) +
                    "/tests/reference/loom_torch.py --config " + (dir / "model.toml").string() +
                    " --weights " + (dir / "weights.safetensors").string() + " --batch " +
                    (dir / "batch.i32").string() + " --B 2 --T 16 --steps 10 --lr 0.001 "
                    "--beta1 0.9 --beta2 0.95 --eps 1e-8 --weight-decay 0.1 --clip 1.0 "
                    "--dtype float64 --threads 1 --out " + (dir / "torch.safetensors").string() +
                    (router == Router::rre ? " --domains " + (dir / "domains.i32").string() : "");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  checkpoint::SafetensorsFile ref((dir / "torch.safetensors").string());
  if (router == Router::topk) {
    double margin = 0;
    ref.read("min_margin", DType::f64, {1}, &margin);
    std::printf("topk: smallest 2nd-vs-3rd router score gap over 10 steps: %.3g\n", margin);
    ASSERT_GE(margin, 1e-4) << "test data too close to a routing tie: choose other weights";
  }

  // Same bounds and reasons as the dense test above.
  std::vector<float> logits(size_t(B * T * cfg.vocab)), ref_logits(logits.size());
  std::vector<int32_t> inputs(size_t(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) inputs[size_t(b * T + t)] = tokens[size_t(b * (T + 1) + t)];
  m.stage().logits(logits.data(), inputs.data(), B, T, false, dom);
  ref.read("logits", DType::f32, {B, T, cfg.vocab}, ref_logits.data());
  EXPECT_LT(scaled_max_error(logits.data(), ref_logits.data(), int64_t(logits.size())), 1e-4);
  double ref_loss = 0;
  ref.read("loss", DType::f64, {1}, &ref_loss);
  m.zero_grads();
  LossSum l = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T), dom);
  EXPECT_NEAR(l.sum / double(l.count), ref_loss, 1e-4 * ref_loss);
  int experts_checked = 0;
  for (auto& s : m.layout().specs()) {
    if (!s.trainable) {
      for (int64_t i = 0; i < s.numel; ++i) ASSERT_EQ(m.grads()[s.offset + i], 0.0f) << s.name;
      continue;
    }
    std::vector<float> g(size_t(s.numel));
    ref.read("grad." + s.name, DType::f32, s.shape, g.data());
    if (s.name.find("attn.k.bias") != std::string::npos) continue;
    double scale = 0;
    for (float x : g) scale = std::max(scale, double(std::abs(x)));
    if (scale == 0) {  // an expert no token reached: exactly zero here too
      for (int64_t i = 0; i < s.numel; ++i) ASSERT_EQ(m.grads()[s.offset + i], 0.0f) << s.name;
      continue;
    }
    if (s.name.find("moe.experts") != std::string::npos) ++experts_checked;
    EXPECT_LT(scaled_max_error(m.grads() + s.offset, g.data(), s.numel), 1e-4) << s.name;
  }
  EXPECT_GE(experts_checked, 12);

  optim::AdamWConfig oc;
  oc.lr = 1e-3f;
  oc.min_lr = 1e-3f;
  oc.beta1 = 0.9f;
  oc.beta2 = 0.95f;
  oc.eps = 1e-8f;
  oc.weight_decay = 0.1f;
  oc.clip = 1.0f;
  optim::AdamW opt(m.layout().specs(), m.layout().total(), oc, pool);
  std::vector<float> before(m.weights(), m.weights() + m.layout().total());
  std::vector<double> ref_losses(steps);
  ref.read("losses", DType::f64, {steps}, ref_losses.data());
  for (int64_t s = 0; s < steps; ++s) {
    m.zero_grads();
    LossSum ls = m.forward_backward(tokens.data(), B, T, 1.0f / float(B * T), dom);
    EXPECT_NEAR(ls.sum / double(ls.count), ref_losses[size_t(s)], 1e-4 * ref_losses[size_t(s)])
        << "step " << s + 1;
    double norm = std::sqrt(kernels::sum_squares(m.grads(), m.layout().total()));
    opt.step(m.weights(), m.grads(), kernels::clip_factor(norm, oc.clip));
  }
  for (auto& s : m.layout().specs()) {
    if (s.name.find("attn.k.bias") != std::string::npos) continue;
    std::vector<float> p(size_t(s.numel));
    ref.read("param." + s.name, DType::f32, s.shape, p.data());
    if (!s.trainable) {  // the frozen table: unchanged on both sides
      for (int64_t i = 0; i < s.numel; ++i) {
        ASSERT_EQ(m.weights()[s.offset + i], before[size_t(s.offset + i)]) << s.name;
        ASSERT_EQ(p[size_t(i)], before[size_t(s.offset + i)]) << s.name;
      }
      continue;
    }
    double num = 0, den = 0;
    for (int64_t i = 0; i < s.numel; ++i) {
      double ours = double(m.weights()[s.offset + i]) - before[size_t(s.offset + i)];
      double theirs = double(p[size_t(i)]) - before[size_t(s.offset + i)];
      num += (ours - theirs) * (ours - theirs);
      den += theirs * theirs;
    }
    if (den == 0) continue;  // never reached (weight decay is off for biases)
    EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-2) << s.name;
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Reference, TorchParityMoe, ::testing::Values(Router::rre, Router::topk),
                         [](const auto& i) { return std::string(router_name(i.param)); });

}  // namespace
