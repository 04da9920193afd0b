// infer/weights.cpp: converting the flat f32 parameters into inference storage (see weights.h).
#include "infer/weights.h"

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/memory_pool.h"
#include "core/log.h"
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

WeightFormats weight_formats_from_flags(const std::string& dtype, bool int8, bool int8_head,
                                        const std::string& head_dtype) {
  WeightFormats f;
  f.base = weight_format_from_name(dtype);
  LOOM_CHECK(f.base != WeightFormat::int8_row,
             "--dtype {}: the head and the linears are stored as f32 or bf16; use --int8 for int8 "
             "linears",
             dtype);
  LOOM_CHECK(!int8_head || int8,
             "--int8-head quantizes the tied head as well as the block linears: give it with "
             "--int8 (alone it would leave the linears in {})",
             dtype);
  const bool head_auto = head_dtype.empty() || head_dtype == "auto";
  LOOM_CHECK(!int8_head || head_auto || head_dtype == "int8",
             "--int8-head and --head-dtype {} disagree: give one of them", head_dtype);
  f.linears = int8 ? WeightFormat::int8_row : f.base;
  f.head = !head_auto ? weight_format_from_name(head_dtype)
           : int8     ? WeightFormat::int8_row
                      : f.base;
  f.head_auto = head_auto && !int8_head;
  return f;
}

static size_t element_bytes(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 2 : 1;
}

WeightView weight_rows(const WeightView& w, int64_t r0, int64_t n) {
  LOOM_ASSERT(r0 >= 0 && n >= 0 && r0 + n <= w.N, "rows [{}, {}) of a weight with {} rows", r0,
              r0 + n, w.N);
  WeightView v = w;
  v.N = n;
  if (w.layout == kernels::WeightLayout::amx_tiles) {
    // Tile order keeps 32-row blocks whole: a slice must start on one (ModelWeights stores a view
    // it slices elsewhere in panels or rows).
    LOOM_ASSERT(r0 % 32 == 0, "rows [{}, {}) of a tile-order weight: start not a multiple of 32",
                r0, r0 + n);
    v.data = static_cast<const bf16*>(w.data) + kernels::amx_tiles_index(r0, 0, w.K);
    return v;
  }
  if (w.layout == kernels::WeightLayout::panels) {
    // Panels keep 16 columns whole: a slice must start on one (its last panel may hold the next
    // rows' weights, which the kernel reads but never writes out: it stops at the view's N).
    return kernels::panels_view_rows(w, r0, n);
  } else {
    v.data = static_cast<const char*>(w.data) + size_t(r0 * w.K) * element_bytes(w.format);
  }
  if (w.scales) v.scales = w.scales + r0;
  return v;
}

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

ModelWeights::ModelWeights(const model::ModelConfig& cfg, const float* flat, WeightFormat linears,
                           WeightFormat head, model::TpShard tp)
    : ModelWeights(cfg,
                   Source{[flat](int64_t lo, int64_t hi, float* dst) {
                            std::copy(flat + lo, flat + hi, dst);
                          },
                          {}},
                   linears, head, tp) {}

ModelWeights::ModelWeights(const model::ModelConfig& cfg, const Source& src, WeightFormat linears,
                           WeightFormat head, model::TpShard tp)
    : cfg_(cfg), tp_(tp), linear_format_(src.int8 ? WeightFormat::int8_row : linears) {
  if (src.int8 && linears != WeightFormat::int8_row)
    LOOM_LOG_WARN("the checkpoint's linear weights are int8 (`loom quantize`): they run as int8, "
                  "not {} as asked (the head keeps its format, {})", weight_format_name(linears),
                  weight_format_name(head));
  linears = linear_format_;
  LOOM_CHECK(!cfg.moe.enabled() || cfg.moe.router == model::Router::rre,
             "model '{}' has sparse blocks with the topk router ({} experts, top_k {}), which the "
             "inference engine does not run: topk's capacity limit makes a token's expert output "
             "depend on the other tokens of its micro-batch, so a KV-cached decode cannot "
             "reproduce the trained model; decode rre models (moe.router = \"rre\"), or score "
             "this one with `loom eval loss`",
             cfg.name, cfg.moe.experts, cfg.moe.top_k);
  // The training engine splits experts over tp (model/params.h); the decoder's expert FFN runs
  // whole experts and has no tp reduction for them yet.
  LOOM_CHECK(!cfg.moe.enabled() || tp.size == 1,
             "model '{}' has sparse (MoE) blocks: tensor-parallel generation (tp = {}) runs dense "
             "blocks only; generate with tp 1 (one process)",
             cfg.name, tp.size);
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
    src.f32(s.offset, s.offset + s.numel, small_.data() + at);
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
    int64_t split = 0;  // weight_rows slices the view at this row (0: never sliced)
    int64_t at = 0, scale_at = 0;
    bool tiles = false;  // bf16 in AMX tile order (kernels::amx_tiles_available)
    bool panels = false;  // in 16-column panels (the AVX-512 kernel's layout)
    int64_t elements() const {
      return tiles ? kernels::amx_tiles_elements(N, K)
                   : panels ? kernels::panels_elements(fmt, N, K) : N * K;
    }
  };
  std::vector<Pending> todo;
  auto add_block = [&](const model::BlockOffsets& o, BlockLinears& bl) {
    // The query layer's q comes from another input than k, v (decoder.cpp): sliced at Cq.
    todo.push_back({&bl.qkv, linears, o.w_qkv, Cq + 2 * KV, C, &bl == &qlinears_ ? Cq : 0});
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
  if (linear_format_ == WeightFormat::int8_row && !kernels::weight_matmul_panels_fast(linear_format_))
    LOOM_LOG_WARN("this CPU lacks AVX-512 VNNI (or DQ): int8 weights run the portable integer "
                  "loop, several times slower than the VNNI kernel; --dtype bf16 may be faster");
  for (Pending& p : todo) {
    // Tile order for bf16 where AMX runs it (every M on one kernel: weight_matmul.h), else panel
    // order where the AVX-512 kernel runs, unless a slice (weight_rows) would cut a 32-row block
    // or a 16-column panel: such a weight stays in rows and runs the reference loop.
    p.tiles = p.fmt == WeightFormat::bf16 && kernels::amx_tiles_available(p.K) && p.split % 32 == 0;
    // (int8 with K > 65536 runs the reference loop, fastest on rows: weight_matmul.h.)
    const bool fast = kernels::weight_matmul_panels_fast(p.fmt) &&
                      (p.fmt != WeightFormat::int8_row || p.K <= 65536);
    p.panels = !p.tiles && fast && p.split % 16 == 0;
    if (!p.tiles && !p.panels && fast)
      LOOM_LOG_WARN("a {} x {} weight sliced at row {} cannot be stored in 16-column panels; it "
                    "runs on the slow reference kernel", p.N, p.K, p.split);
    const int64_t n = p.elements();
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
    matmul_bytes_ += n * int64_t(element_bytes(p.fmt)) +
                     (p.fmt == WeightFormat::int8_row ? 4 * p.N : 0);
  }
  // Reserved (not yet written), advised onto huge pages, then filled: every step reads them all.
  lin_f32_.reserve(size_t(n32));
  lin_bf16_.reserve(size_t(n16));
  lin_i8_.reserve(size_t(n8));
  advise_huge_pages(lin_f32_.data(), size_t(n32) * sizeof(float));
  advise_huge_pages(lin_bf16_.data(), size_t(n16) * sizeof(bf16));
  advise_huge_pages(lin_i8_.data(), size_t(n8));
  lin_f32_.resize(size_t(n32));
  lin_bf16_.resize(size_t(n16));
  lin_i8_.resize(size_t(n8));
  lin_scales_.resize(size_t(nsc));
  std::vector<float> one;      // one linear in f32, (N, K)
  std::vector<char> rows_buf;  // one linear in its format, row-major, before packing
  for (Pending& p : todo) {
    const int64_t n = p.N * p.K;
    WeightView& v = *p.view;
    v.format = p.fmt;
    v.N = p.N;
    v.K = p.K;
    v.scales = nullptr;
    v.layout = p.tiles    ? kernels::WeightLayout::amx_tiles
               : p.panels ? kernels::WeightLayout::panels
                          : kernels::WeightLayout::rows;
    char* dst = p.fmt == WeightFormat::f32    ? reinterpret_cast<char*>(lin_f32_.data() + p.at)
                : p.fmt == WeightFormat::bf16 ? reinterpret_cast<char*>(lin_bf16_.data() + p.at)
                                              : reinterpret_cast<char*>(lin_i8_.data() + p.at);
    v.data = dst;
    if (p.fmt == WeightFormat::int8_row) v.scales = lin_scales_.data() + p.scale_at;
    // The weight in its format, row-major: written in place when it stays in rows, else into
    // rows_buf and then packed (f32 is packed straight from its f32 source).
    char* rows = dst;
    const char* pack_from = rows;
    if (v.layout != kernels::WeightLayout::rows && p.fmt != WeightFormat::f32) {
      rows_buf.resize(size_t(n) * element_bytes(p.fmt));
      rows = rows_buf.data();
      pack_from = rows;
    }
    const bool is_head = &v == &head_;
    if (src.int8 && !is_head) {
      // Stored int8 rows: the parameters covering [flat_off, flat_off + n) (q, k, v for qkv)
      // go to their rows of the view as they are.
      int64_t covered = 0;
      for (const auto& s : layout.specs()) {
        if (s.offset < p.flat_off || s.offset >= p.flat_off + n) continue;
        LOOM_CHECK(s.shape.size() == 2 && s.shape[1] == p.K && s.offset + s.numel <= p.flat_off + n,
                   "internal: parameter '{}' does not tile a linear of {} x {}", s.name, p.N, p.K);
        const int64_t row = (s.offset - p.flat_off) / p.K;
        src.int8(s, reinterpret_cast<int8_t*>(rows) + (s.offset - p.flat_off),
                 lin_scales_.data() + p.scale_at + row);
        covered += s.numel;
      }
      LOOM_CHECK(covered == n, "internal: a linear of {} x {} is covered by {} stored elements",
                 p.N, p.K, covered);
    } else {
      const float* w;  // (N, K) f32
      if (is_head) {
        w = small_.data() + tok_;  // the tied head is the token embedding, already loaded
      } else {
        one.resize(size_t(n));
        src.f32(p.flat_off, p.flat_off + n, one.data());
        w = one.data();
      }
      switch (p.fmt) {
        case WeightFormat::f32:
          if (v.layout == kernels::WeightLayout::rows)
            std::copy(w, w + n, reinterpret_cast<float*>(rows));
          else
            pack_from = reinterpret_cast<const char*>(w);
          break;
        case WeightFormat::bf16:
          convert_f32_to_bf16(w, reinterpret_cast<bf16*>(rows), size_t(n));
          break;
        case WeightFormat::int8_row:
          kernels::quantize_rows_int8(reinterpret_cast<int8_t*>(rows),
                                      lin_scales_.data() + p.scale_at, w, p.N, p.K);
          break;
      }
    }
    if (p.tiles)
      kernels::pack_amx_tiles(reinterpret_cast<bf16*>(dst),
                              reinterpret_cast<const bf16*>(pack_from), p.N, p.K);
    else if (p.panels)
      kernels::pack_panels(dst, pack_from, p.fmt, p.N, p.K);
  }
}

ModelWeights ModelWeights::load(const std::string& checkpoint_dir, WeightFormat linears,
                                WeightFormat head, model::TpShard tp) {
  WeightFormats f;
  f.linears = linears;
  f.head = head;
  return load(checkpoint_dir, f, tp);
}

ModelWeights ModelWeights::load(const std::string& checkpoint_dir, const WeightFormats& formats,
                                model::TpShard tp) {
  interop::CheckpointReader r(checkpoint_dir);  // one reader: the files are verified once
  const model::ParamLayout layout(r.config(), tp);
  Source src;
  src.f32 = [&](int64_t lo, int64_t hi, float* dst) {
    r.load_weights_packed(layout, dst, lo, hi);
  };
  WeightFormat head = formats.head;
  if (r.has_int8_weights()) {
    for (const auto& s : layout.specs())
      LOOM_CHECK(!is_linear_weight(s.name) || r.weight_dtype(s.name) == DType::i8,
                 "checkpoint '{}': linear weight '{}' is {} while others are int8; a quantized "
                 "checkpoint stores every linear as int8 (re-run `loom quantize` on the f32 "
                 "checkpoint)", r.dir(), s.name, dtype_name(r.weight_dtype(s.name)));
    src.int8 = [&](const model::ParamSpec& s, int8_t* q, float* scales) {
      r.load_int8(s, q, scales);
    };
    if (formats.head_auto) head = WeightFormat::int8_row;  // as --int8 on the f32 checkpoint
  }
  ModelWeights w(r.config(), src, formats.linears, head, tp);
  w.set_batch_invariant(formats.batch_invariant);
  return w;
}

void ModelWeights::set_batch_invariant(bool on) {
  auto set = [on](WeightView& v) { v.batch_invariant = on; };
  auto set_block = [&](BlockLinears& l) {
    for (WeightView* v : {&l.qkv, &l.out, &l.up, &l.down}) set(*v);
  };
  for (BlockLinears& l : linears_) set_block(l);
  set_block(qlinears_);
  for (BlockExperts& e : experts_) {
    for (WeightView& v : e.up) set(v);
    for (WeightView& v : e.down) set(v);
  }
  set(head_);
}

QuantizeResult quantize_checkpoint(const std::string& checkpoint_dir, const std::string& out_dir,
                                   WeightFormat linears) {
  LOOM_CHECK(linears != WeightFormat::f32,
             "loom quantize: --dtype f32 would copy the checkpoint; choose int8 or bf16");
  interop::CheckpointReader r(checkpoint_dir);
  const model::ModelConfig& cfg = r.config();
  // rre MoE: every expert's up and down linear is quantized per output row like a dense one
  // (is_linear_weight); the routing table stays as stored. topk is refused: the engine cannot
  // decode it (ModelWeights' constructor says why), and an int8 checkpoint serves the engine.
  LOOM_CHECK(!cfg.moe.enabled() || cfg.moe.router == model::Router::rre,
             "model '{}' has sparse blocks with the topk router ({} experts, top_k {}); `loom "
             "quantize` writes checkpoints for the inference engine, which decodes rre MoE models "
             "only (topk's capacity limit makes a token's output depend on the other tokens of "
             "its batch); score this one in f32 with `loom eval loss`",
             cfg.name, cfg.moe.experts, cfg.moe.top_k);
  LOOM_CHECK(!r.has_int8_weights(), "checkpoint '{}' is already int8-quantized; quantize the "
             "f32 checkpoint it came from", r.dir());
  LOOM_CHECK(std::filesystem::absolute(out_dir).lexically_normal() !=
                 std::filesystem::absolute(r.dir()).lexically_normal(),
             "loom quantize: --out '{}' is the checkpoint being read; write to another directory",
             out_dir);
  const model::ParamLayout layout(cfg);
  const DType target = linears == WeightFormat::int8_row ? DType::i8 : DType::bf16;
  QuantizeResult res;
  auto storage = [&](const model::ParamSpec& s) {
    return is_linear_weight(s.name) ? target : r.weight_dtype(s.name);
  };
  for (const auto& s : layout.specs()) {
    ++res.tensors;
    if (!is_linear_weight(s.name)) continue;
    ++res.quantized;
    res.linear_bytes_in += s.numel * int64_t(dtype_size(r.weight_dtype(s.name)));
    res.linear_bytes_out +=
        s.numel * int64_t(dtype_size(target)) + (target == DType::i8 ? 4 * s.shape[0] : 0);
  }
  nlohmann::json state = r.trainer_state().is_object() ? r.trainer_state() : nlohmann::json::object();
  state["quantized"] = {{"from", std::filesystem::absolute(r.dir()).lexically_normal().string()},
                        {"linears", weight_format_name(linears)}};
  const std::string tok = r.dir() + "/tokenizer";
  interop::save_checkpoint_streamed(
      out_dir, cfg, layout,
      [&](const model::ParamSpec& s, float* dst) {
        r.load_weights_packed(layout, dst, s.offset, s.offset + s.numel);
      },
      state,
      [&](const std::string& staging) {
        if (std::filesystem::is_directory(tok))
          std::filesystem::copy(tok, staging + "/tokenizer",
                                std::filesystem::copy_options::recursive);
      },
      storage);
  res.file_bytes_out = std::filesystem::file_size(out_dir + "/model.safetensors");
  for (const auto& s : layout.specs()) {
    res.weight_bytes_in += s.numel * int64_t(dtype_size(r.weight_dtype(s.name)));
    res.weight_bytes_out += s.numel * int64_t(dtype_size(storage(s))) +
                            (storage(s) == DType::i8 ? 4 * s.shape[0] : 0);
  }
  return res;
}

}  // namespace loom::infer
