#include "model/params.h"

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

#include <fmt/ranges.h>

namespace loom::model {

int64_t ParamLayout::add(const std::string& name, Shape shape, InitKind init, int shard_dim) {
  ParamSpec s;
  s.name = name;
  s.global_shape = shape;
  if (tp_.size > 1 && shard_dim >= 0) {
    const int64_t part = shape[size_t(shard_dim)] / tp_.size;
    s.shard_dim = shard_dim;
    s.shard_start = part * tp_.rank;
    shape[size_t(shard_dim)] = part;
  }
  s.numel = shape_numel(shape);
  s.weight_decay = shape.size() >= 2;
  s.shape = std::move(shape);
  s.offset = total_;
  s.init = init;
  total_ += s.numel;
  specs_.push_back(std::move(s));
  return specs_.back().offset;
}

BlockOffsets ParamLayout::add_block(const std::string& p, const ModelConfig& cfg, bool sparse) {
  const int64_t C = cfg.d_model, F = cfg.d_ff, KV = cfg.kv_dim();
  BlockOffsets b;
  b.norm1_w = add(p + "norm1.weight", {C}, InitKind::ones);
  b.norm1_b = add(p + "norm1.bias", {C}, InitKind::zeros);
  // Column-parallel q/k/v (this rank's heads) and ffn.up; row-parallel attn.out and ffn.down.
  b.w_qkv = add(p + "attn.q.weight", {C, C}, InitKind::normal, 0);
  add(p + "attn.k.weight", {KV, C}, InitKind::normal, 0);
  add(p + "attn.v.weight", {KV, C}, InitKind::normal, 0);
  b.b_qkv = add(p + "attn.q.bias", {C}, InitKind::zeros, 0);
  add(p + "attn.k.bias", {KV}, InitKind::zeros, 0);
  add(p + "attn.v.bias", {KV}, InitKind::zeros, 0);
  b.w_out = add(p + "attn.out.weight", {C, C}, InitKind::normal_residual, 1);
  b.b_out = add(p + "attn.out.bias", {C}, InitKind::zeros);
  b.norm2_w = add(p + "norm2.weight", {C}, InitKind::ones);
  b.norm2_b = add(p + "norm2.bias", {C}, InitKind::zeros);
  if (!sparse) {
    b.w_up = add(p + "ffn.up.weight", {F, C}, InitKind::normal, 0);
    b.b_up = add(p + "ffn.up.bias", {F}, InitKind::zeros, 0);
    b.w_down = add(p + "ffn.down.weight", {C, F}, InitKind::normal_residual, 1);
    b.b_down = add(p + "ffn.down.bias", {C}, InitKind::zeros);
    return b;
  }
  // MoE FFN (model/moe.h): [gate], the experts one after another, [rre table].
  b.w_up = b.b_up = b.w_down = b.b_down = -1;
  const MoeConfig& m = cfg.moe;
  const int64_t Fe = m.expert_d_ff;
  if (m.router == Router::topk) b.moe_gate = add(p + "moe.gate.weight", {m.experts, C}, InitKind::normal);
  for (int64_t e = 0; e < m.experts; ++e) {
    const std::string q = p + "moe.experts." + std::to_string(e) + ".";
    const int64_t up = add(q + "up.weight", {Fe, C}, InitKind::normal, 0);
    if (e == 0) b.moe_experts = up;
    b.moe_n_experts = m.experts;
    add(q + "up.bias", {Fe}, InitKind::zeros, 0);
    add(q + "down.weight", {C, Fe}, InitKind::normal_residual, 1);
    add(q + "down.bias", {C}, InitKind::zeros);
    if (e == 0) b.moe_stride = total_ - up;
  }
  if (m.router == Router::rre) {
    b.moe_table = add(p + "moe.rre_table", {m.num_domains(), cfg.vocab}, InitKind::rre_uniform);
    specs_.back().trainable = false;
    specs_.back().weight_decay = false;
  }
  return b;
}

std::vector<int> valid_tp_sizes(const ModelConfig& cfg) {
  std::vector<int> out;
  for (int t = 1; t <= cfg.n_heads; ++t)
    if (cfg.n_heads % t == 0 && cfg.n_kv_heads % t == 0 && cfg.d_ff % t == 0 &&
        cfg.vocab % t == 0 && (!cfg.moe.enabled() || cfg.moe.expert_d_ff % t == 0))
      out.push_back(t);
  return out;
}

ParamLayout::ParamLayout(const ModelConfig& cfg, TpShard tp) : tp_(tp) {
  cfg.validate();
  LOOM_CHECK(tp.size >= 1 && tp.rank >= 0 && tp.rank < tp.size, "tp rank {} of size {} is invalid",
             tp.rank, tp.size);
  if (tp.size > 1) {
    auto ok = valid_tp_sizes(cfg);
    LOOM_CHECK(std::find(ok.begin(), ok.end(), tp.size) != ok.end(),
               "tp = {} does not divide model '{}' (n_heads {}, n_kv_heads {}, d_ff {}, vocab "
               "{}{}); tensor parallel sizes that work: {}",
               tp.size, cfg.name, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab,
               cfg.moe.enabled() ? fmt::format(", expert_d_ff {}", cfg.moe.expert_d_ff) : "",
               fmt::join(ok, ", "));
  }
  const int64_t C = cfg.d_model;
  // Vocabulary-parallel embedding (and, tied, the LM head): rows split over tp.
  tok_ = add("embed.token.weight", {cfg.vocab, C}, InitKind::normal, 0);
  pos_ = add("embed.position.weight", {cfg.max_seq, C}, InitKind::normal);
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    blocks_.push_back(add_block("blocks." + std::to_string(i) + ".", cfg, cfg.moe.is_sparse(i)));
  fnw_ = add("final_norm.weight", {C}, InitKind::ones);
  fnb_ = add("final_norm.bias", {C}, InitKind::zeros);
  has_ql_ = cfg.query_layer;
  if (has_ql_) {
    qpos_ = add("query_layer.position.weight", {cfg.max_seq, C}, InitKind::normal);
    qblock_ = add_block("query_layer.", cfg, /*sparse=*/false);
  }
  LOOM_ASSERT(tp.size > 1 || total_ == cfg.num_buffer_elements(),
              "layout has {} elements, config formula {}", total_, cfg.num_buffer_elements());
}

const ParamSpec& ParamLayout::find(const std::string& name) const {
  for (auto& s : specs_)
    if (s.name == name) return s;
  LOOM_FAIL("no parameter named '{}' in this model", name);
}

void init_params(const ParamLayout& layout, const ModelConfig& cfg, float* weights,
                 uint64_t seed) {
  init_params_range(layout, cfg, weights, 0, layout.total(), seed);
}

void init_params_range(const ParamLayout& layout, const ModelConfig& cfg, float* dst,
                       int64_t begin, int64_t end, uint64_t seed) {
  const double layers = double(cfg.n_layers + (cfg.query_layer ? 1 : 0));
  const float residual_std = float(0.02 / std::sqrt(2.0 * layers));
  for (const ParamSpec& s : layout.specs()) {
    const int64_t lo = std::max(s.offset, begin), hi = std::min(s.offset + s.numel, end);
    if (lo >= hi) continue;
    float* p = dst + (lo - begin);  // element lo of the flat buffer
    const uint64_t stream = rng_stream_id(s.name.c_str());
    switch (s.init) {
      case InitKind::normal:
      case InitKind::normal_residual: {
        const float std = s.init == InitKind::normal ? 0.02f : residual_std;
        // Each element draws at its logical offset, so any shard holds exactly its slice.
        for_each_global_run(s, lo - s.offset, hi - s.offset,
                            [&](int64_t local, int64_t global, int64_t len) {
                              rng_fill_normal(p + (local - (lo - s.offset)), len, 0.f, std, seed,
                                              stream, uint64_t(global));
                            });
        break;
      }
      case InitKind::zeros:
        std::fill(p, p + (hi - lo), 0.f);
        break;
      case InitKind::ones:
        std::fill(p, p + (hi - lo), 1.f);
        break;
      case InitKind::rre_uniform: {
        // Expert index within the domain's group, uniform in [0, G), drawn at the element's
        // logical offset (exact in f32: G <= 2^20).
        const uint64_t G = uint64_t(cfg.moe.experts_per_domain);
        for (int64_t i = lo; i < hi; ++i)
          p[i - lo] = float(rng_u64(seed, stream, uint64_t(i - s.offset)) % G);
        break;
      }
    }
  }
}

}  // namespace loom::model
