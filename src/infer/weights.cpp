// infer/weights.cpp: converting the flat f32 parameters into inference storage (see weights.h).
#include "infer/weights.h"

#include <map>

#include "core/error.h"
#include "interop/model_checkpoint.h"

namespace loom::infer {

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::f32:
      return "f32";
    case WeightFormat::bf16:
      return "bf16";
    case WeightFormat::int8_row:
      return "int8";
  }
  return "?";
}

WeightFormat weight_format_from_name(const std::string& name) {
  if (name == "f32") return WeightFormat::f32;
  if (name == "bf16") return WeightFormat::bf16;
  if (name == "int8") return WeightFormat::int8_row;
  LOOM_FAIL("unknown weight format '{}'; choose f32, bf16 or int8", name);
}

static size_t element_bytes(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 2 : 1;
}

WeightView weight_rows(const WeightView& w, int64_t r0, int64_t n) {
  LOOM_ASSERT(r0 >= 0 && n >= 0 && r0 + n <= w.N, "rows [{}, {}) of a weight with {} rows", r0,
              r0 + n, w.N);
  WeightView v = w;
  v.N = n;
  v.data = static_cast<const char*>(w.data) + size_t(r0 * w.K) * element_bytes(w.format);
  if (w.scales) v.scales = w.scales + r0;
  return v;
}

namespace {
bool is_linear_weight(const std::string& name) {
  // MoE experts: blocks.i.moe.experts.e.{up,down}.weight
  if (name.find(".moe.experts.") != name.npos)
    return name.ends_with(".up.weight") || name.ends_with(".down.weight");
  for (const char* s : {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.out.weight",
                        "ffn.up.weight", "ffn.down.weight"}) {
    const std::string suf(s);
    if (name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0)
      return true;
  }
  return false;
}
}  // namespace

ModelWeights::ModelWeights(const model::ModelConfig& cfg, const float* flat, WeightFormat linears,
                           WeightFormat head, model::TpShard tp)
    : cfg_(cfg), tp_(tp), linear_format_(linears) {
  LOOM_CHECK(!cfg.moe.enabled() || cfg.moe.router == model::Router::rre,
             "model '{}' has sparse blocks with the topk router ({} experts, top_k {}), which the "
             "inference engine does not run: topk's capacity limit makes a token's expert output "
             "depend on the other tokens of its micro-batch, so a KV-cached decode cannot "
             "reproduce the trained model; decode rre models (moe.router = \"rre\"), or score "
             "this one with `loom eval loss`",
             cfg.name, cfg.moe.experts, cfg.moe.top_k);
  const model::ParamLayout layout(cfg, tp);  // throws naming the valid tp sizes
  // 1. Everything but the linear weights goes to small_, offsets remapped tensor by tensor.
  std::map<int64_t, int64_t> remap;  // flat offset of a tensor -> offset in small_
  int64_t small_total = 0;
  for (const auto& s : layout.specs())
    if (!is_linear_weight(s.name)) small_total += s.numel;
  small_.resize(size_t(small_total));
  int64_t at = 0;
  for (const auto& s : layout.specs()) {
    if (is_linear_weight(s.name)) continue;
    std::copy(flat + s.offset, flat + s.offset + s.numel, small_.begin() + at);
    remap[s.offset] = at;
    at += s.numel;
  }
  auto small_off = [&](int64_t off) {
    auto it = remap.find(off);
    return it == remap.end() ? int64_t(-1) : it->second;
  };
  tok_ = small_off(layout.token_embedding());
  pos_ = small_off(layout.position_embedding());
  fnw_ = small_off(layout.final_norm_w());
  fnb_ = small_off(layout.final_norm_b());
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    blocks_.push_back(model::map_offsets(layout.block(i), small_off));
  if (layout.has_query_layer()) {
    qpos_ = small_off(layout.query_position());
    qblock_ = model::map_offsets(layout.query_block(), small_off);
  }

  // 2. The linears (and the head) in their formats: one buffer per format, views resolved after
  // every buffer has its final size.
  // This rank's sizes: q width Cq, kv width KV, ffn width F, vocab rows V (all / P).
  const int64_t P = tp.size, C = cfg.d_model, Cq = C / P, KV = cfg.kv_dim() / P, F = cfg.d_ff / P,
                V = cfg.vocab / P;
  struct Pending {
    WeightView* view;
    WeightFormat fmt;
    int64_t flat_off, N, K;
    int64_t at = 0, scale_at = 0;
  };
  std::vector<Pending> todo;
  auto add_block = [&](const model::BlockOffsets& o, BlockLinears& bl) {
    todo.push_back({&bl.qkv, linears, o.w_qkv, Cq + 2 * KV, C});
    todo.push_back({&bl.out, linears, o.w_out, C, Cq});
    if (o.sparse()) return;  // no dense FFN: the experts (below)
    todo.push_back({&bl.up, linears, o.w_up, F, C});
    todo.push_back({&bl.down, linears, o.w_down, C, F});
  };
  linears_.resize(size_t(cfg.n_layers));
  experts_.resize(size_t(cfg.n_layers));
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    const model::BlockOffsets& o = layout.block(i);
    add_block(o, linears_[size_t(i)]);
    if (!o.sparse()) continue;
    // Sparse: expert e at o.moe_experts + e * stride (model/params.h).
    BlockExperts& be = experts_[size_t(i)];
    const int64_t E = cfg.moe.experts, Fe = cfg.moe.expert_d_ff;
    be.up.resize(size_t(E));
    be.down.resize(size_t(E));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t base = o.moe_experts + e * model::moe_expert_stride(cfg);
      be.up_b.push_back(small_off(base + Fe * C));
      be.down_b.push_back(small_off(base + 2 * Fe * C + Fe));
      LOOM_ASSERT(be.up_b.back() >= 0 && be.down_b.back() >= 0, "expert {} biases of block {}",
                  e, i);
    }
    // Views pushed after the vectors have their final size (todo keeps pointers into them).
    for (int64_t e = 0; e < E; ++e) {
      const int64_t base = o.moe_experts + e * model::moe_expert_stride(cfg);
      todo.push_back({&be.up[size_t(e)], linears, base, Fe, C});
      todo.push_back({&be.down[size_t(e)], linears, base + Fe * C + Fe, C, Fe});
    }
    be.table = small_off(o.moe_table);
    LOOM_ASSERT(be.table >= 0, "rre table of block {}", i);
    // Every entry must be an in-group expert index: a table from another model is named here,
    // at load, rather than at the first token routed through the bad entry.
    const float* t = small_.data() + be.table;
    const int64_t G = cfg.moe.experts_per_domain, DV = cfg.moe.num_domains() * cfg.vocab;
    for (int64_t j = 0; j < DV; ++j)
      LOOM_CHECK(t[j] >= 0 && t[j] < float(G) && t[j] == float(int64_t(t[j])),
                 "model '{}': blocks.{}.moe.rre_table[{}, {}] = {} is not an expert index in "
                 "[0, experts_per_domain = {}): the routing table does not match this model's "
                 "config (domains x vocab = {} x {})",
                 cfg.name, i, j / cfg.vocab, j % cfg.vocab, t[j], G, cfg.moe.num_domains(),
                 cfg.vocab);
  }
  if (layout.has_query_layer()) add_block(layout.query_block(), qlinears_);
  todo.push_back({&head_, head, layout.token_embedding(), V, C});
  int64_t n32 = 0, n16 = 0, n8 = 0, nsc = 0;
  for (Pending& p : todo) {
    const int64_t n = p.N * p.K;
    switch (p.fmt) {
      case WeightFormat::f32:
        p.at = n32;
        n32 += n;
        break;
      case WeightFormat::bf16:
        p.at = n16;
        n16 += n;
        break;
      case WeightFormat::int8_row:
        p.at = n8;
        n8 += n;
        p.scale_at = nsc;
        nsc += p.N;
        break;
    }
    matmul_bytes_ +=
        n * int64_t(element_bytes(p.fmt)) + (p.fmt == WeightFormat::int8_row ? 4 * p.N : 0);
  }
  lin_f32_.resize(size_t(n32));
  lin_bf16_.resize(size_t(n16));
  lin_i8_.resize(size_t(n8));
  lin_scales_.resize(size_t(nsc));
  for (Pending& p : todo) {
    const float* src = flat + p.flat_off;  // (N, K) f32
    const int64_t n = p.N * p.K;
    WeightView& v = *p.view;
    v.format = p.fmt;
    v.N = p.N;
    v.K = p.K;
    v.scales = nullptr;
    switch (p.fmt) {
      case WeightFormat::f32:
        std::copy(src, src + n, lin_f32_.begin() + p.at);
        v.data = lin_f32_.data() + p.at;
        break;
      case WeightFormat::bf16:
        convert_f32_to_bf16(src, lin_bf16_.data() + p.at, size_t(n));
        v.data = lin_bf16_.data() + p.at;
        break;
      case WeightFormat::int8_row:
        kernels::quantize_rows_int8(lin_i8_.data() + p.at, lin_scales_.data() + p.scale_at, src,
                                    p.N, p.K);
        v.data = lin_i8_.data() + p.at;
        v.scales = lin_scales_.data() + p.scale_at;
        break;
    }
  }
}

ModelWeights ModelWeights::load(const std::string& checkpoint_dir, WeightFormat linears,
                                WeightFormat head, model::TpShard tp) {
  interop::CheckpointReader r(checkpoint_dir);
  const model::ParamLayout layout(r.config(), tp);
  std::vector<float> flat(size_t(layout.total()));  // this rank's model, f32, loaded once
  r.load_weights(layout, flat.data());
  return ModelWeights(r.config(), flat.data(), linears, head, tp);
}

}  // namespace loom::infer
