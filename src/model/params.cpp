#include "model/params.h"

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace loom::model {

int64_t ParamLayout::add(const std::string& name, Shape shape, InitKind init) {
  ParamSpec s;
  s.name = name;
  s.numel = shape_numel(shape);
  s.weight_decay = shape.size() >= 2;
  s.shape = std::move(shape);
  s.offset = total_;
  s.init = init;
  total_ += s.numel;
  specs_.push_back(std::move(s));
  return specs_.back().offset;
}

BlockOffsets ParamLayout::add_block(const std::string& p, const ModelConfig& cfg) {
  const int64_t C = cfg.d_model, F = cfg.d_ff, KV = cfg.kv_dim();
  BlockOffsets b;
  b.norm1_w = add(p + "norm1.weight", {C}, InitKind::ones);
  b.norm1_b = add(p + "norm1.bias", {C}, InitKind::zeros);
  b.w_qkv = add(p + "attn.q.weight", {C, C}, InitKind::normal);
  add(p + "attn.k.weight", {KV, C}, InitKind::normal);
  add(p + "attn.v.weight", {KV, C}, InitKind::normal);
  b.b_qkv = add(p + "attn.q.bias", {C}, InitKind::zeros);
  add(p + "attn.k.bias", {KV}, InitKind::zeros);
  add(p + "attn.v.bias", {KV}, InitKind::zeros);
  b.w_out = add(p + "attn.out.weight", {C, C}, InitKind::normal_residual);
  b.b_out = add(p + "attn.out.bias", {C}, InitKind::zeros);
  b.norm2_w = add(p + "norm2.weight", {C}, InitKind::ones);
  b.norm2_b = add(p + "norm2.bias", {C}, InitKind::zeros);
  b.w_up = add(p + "ffn.up.weight", {F, C}, InitKind::normal);
  b.b_up = add(p + "ffn.up.bias", {F}, InitKind::zeros);
  b.w_down = add(p + "ffn.down.weight", {C, F}, InitKind::normal_residual);
  b.b_down = add(p + "ffn.down.bias", {C}, InitKind::zeros);
  return b;
}

ParamLayout::ParamLayout(const ModelConfig& cfg) {
  cfg.validate();
  const int64_t C = cfg.d_model;
  tok_ = add("embed.token.weight", {cfg.vocab, C}, InitKind::normal);
  pos_ = add("embed.position.weight", {cfg.max_seq, C}, InitKind::normal);
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    blocks_.push_back(add_block("blocks." + std::to_string(i) + ".", cfg));
  fnw_ = add("final_norm.weight", {C}, InitKind::ones);
  fnb_ = add("final_norm.bias", {C}, InitKind::zeros);
  has_ql_ = cfg.query_layer;
  if (has_ql_) {
    qpos_ = add("query_layer.position.weight", {cfg.max_seq, C}, InitKind::normal);
    qblock_ = add_block("query_layer.", cfg);
  }
  LOOM_ASSERT(total_ == cfg.num_params(), "layout has {} parameters, config formula {}", total_,
              cfg.num_params());
}

const ParamSpec& ParamLayout::find(const std::string& name) const {
  for (auto& s : specs_)
    if (s.name == name) return s;
  LOOM_FAIL("no parameter named '{}' in this model", name);
}

void init_params(const ParamLayout& layout, const ModelConfig& cfg, float* weights,
                 uint64_t seed) {
  const double layers = double(cfg.n_layers + (cfg.query_layer ? 1 : 0));
  const float residual_std = float(0.02 / std::sqrt(2.0 * layers));
  for (const ParamSpec& s : layout.specs()) {
    float* p = weights + s.offset;
    switch (s.init) {
      case InitKind::normal:
        rng_fill_normal(p, s.numel, 0.f, 0.02f, seed, rng_stream_id(s.name.c_str()), 0);
        break;
      case InitKind::normal_residual:
        rng_fill_normal(p, s.numel, 0.f, residual_std, seed, rng_stream_id(s.name.c_str()), 0);
        break;
      case InitKind::zeros:
        for (int64_t i = 0; i < s.numel; ++i) p[i] = 0.f;
        break;
      case InitKind::ones:
        for (int64_t i = 0; i < s.numel; ++i) p[i] = 1.f;
        break;
    }
  }
}

}  // namespace loom::model
