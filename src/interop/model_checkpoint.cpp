#include "interop/model_checkpoint.h"

#include <fmt/ranges.h>

#include <algorithm>

#include "checkpoint/commit.h"
#include "core/error.h"
#include "kernels/cpu/weight_matmul.h"

namespace loom::interop {

using namespace loom::checkpoint;  // the model-free formats and commit protocol below



namespace {

// The flat format's one writer: `weights` are the model tensors (given or produced).
void save_flat(const std::string& dir, const model::ModelConfig& cfg,
               const model::ParamLayout& layout, const std::vector<TensorToWrite>& weights,
               const OptimizerState& opt, const nlohmann::json& trainer_state,
               const std::function<void(const std::string&)>& write_extra) {
  LOOM_CHECK(layout.tp().size == 1,
             "save_checkpoint takes the whole model's layout; gather tp shards first (tp = {}) "
             "or save with ShardedWriter (checkpoint/sharded.h)", layout.tp().size);
  ProtocolSteps steps;
  FlatSave save = begin_flat(steps, dir);
  try {
    std::map<std::string, FileDigest> sums;
    sums["model.safetensors"] = write_safetensors(steps, save.staging + "/model.safetensors",
                                                  weights, {{"format", "loom"}});
    if (opt.m && opt.v) {
      std::vector<TensorToWrite> st;
      for (const auto& s : layout.specs()) {
        st.push_back({"m." + s.name, DType::f32, s.shape, opt.m + s.offset});
        st.push_back({"v." + s.name, DType::f32, s.shape, opt.v + s.offset});
      }
      sums["optimizer.safetensors"] =
          write_safetensors(steps, save.staging + "/optimizer.safetensors", st,
                            {{"format", "loom-adamw"}, {"step", std::to_string(opt.step)}});
    }
    sums["config.toml"] = write_file(steps, save.staging + "/config.toml", cfg.to_toml());
    sums["trainer_state.json"] = write_file(steps, save.staging + "/trainer_state.json",
                                            trainer_state.dump(2) + "\n");
    if (write_extra) write_extra(save.staging);
    sync_new_files(steps, save.staging, sums);
    write_checksums(steps, save.staging, sums);
    commit_flat(steps, save);  // removes the staging directory itself on failure
  } catch (const std::exception& e) {
    remove_tree(save.staging);
    LOOM_FAIL("checkpoint save to '{}' failed (the previous checkpoint is unchanged): {}", dir,
              e.what());
  }
}

}  // namespace

void save_checkpoint(const std::string& dir, const model::ModelConfig& cfg,
                     const model::ParamLayout& layout, const float* weights,
                     const OptimizerState& opt, const nlohmann::json& trainer_state,
                     const std::function<void(const std::string&)>& write_extra) {
  std::vector<TensorToWrite> tensors;
  for (const auto& s : layout.specs())
    tensors.push_back({s.name, DType::f32, s.shape, weights + s.offset});
  save_flat(dir, cfg, layout, tensors, opt, trainer_state, write_extra);
}

void save_checkpoint_streamed(
    const std::string& dir, const model::ModelConfig& cfg, const model::ParamLayout& layout,
    const std::function<void(const model::ParamSpec&, float*)>& produce,
    const nlohmann::json& trainer_state,
    const std::function<void(const std::string&)>& write_extra, const StorageDType& storage) {
  std::vector<TensorToWrite> tensors;
  for (const auto& s : layout.specs()) {
    const DType dt = storage ? storage(s) : DType::f32;
    switch (dt) {
      case DType::f32:
        tensors.push_back({s.name, dt, s.shape, nullptr,
                           [&produce, &s](void* dst) { produce(s, static_cast<float*>(dst)); }});
        break;
      case DType::bf16:
      case DType::f16:
        tensors.push_back({s.name, dt, s.shape, nullptr, [&produce, &s, dt](void* dst) {
                             std::vector<float> f(size_t(s.numel), 0.f);  // (numel) f32
                             produce(s, f.data());
                             if (dt == DType::bf16)
                               convert_f32_to_bf16(f.data(), static_cast<bf16*>(dst), f.size());
                             else
                               convert_f32_to_f16(f.data(), static_cast<uint16_t*>(dst), f.size());
                           }});
        break;
      case DType::i8: {
        LOOM_CHECK(s.shape.size() == 2, "parameter '{}' (shape {}) cannot be stored as int8 "
                   "rows: only 2-D weights can", s.name, shape_str(s.shape));
        // The scales are computed with q and written right after it.
        auto scales = std::make_shared<std::vector<float>>();
        tensors.push_back({s.name, dt, s.shape, nullptr, [&produce, &s, scales](void* dst) {
                             std::vector<float> f(size_t(s.numel), 0.f);  // (N, K) f32
                             produce(s, f.data());
                             scales->assign(size_t(s.shape[0]), 0.f);
                             kernels::quantize_rows_int8(static_cast<int8_t*>(dst),
                                                         scales->data(), f.data(), s.shape[0],
                                                         s.shape[1]);
                           }});
        tensors.push_back({s.name + kRowScalesSuffix, DType::f32, {s.shape[0]}, nullptr,
                           [scales, &s](void* dst) {
                             LOOM_ASSERT(scales->size() == size_t(s.shape[0]),
                                         "row scales of '{}' written before the tensor", s.name);
                             std::memcpy(dst, scales->data(), scales->size() * sizeof(float));
                             std::vector<float>().swap(*scales);
                           }});
        break;
      }
      default:
        LOOM_FAIL("parameter '{}': a checkpoint cannot store {} (F32, BF16, F16 or I8)", s.name,
                  dtype_name(dt));
    }
  }
  save_flat(dir, cfg, layout, tensors, {}, trainer_state, write_extra);
}

CheckpointReader::CheckpointReader(const std::string& dir) {
  reader_ = std::make_unique<ShardedReader>(dir);
  reader_->verify_all();
  dir_ = reader_->dir();
  cfg_ = model::model_config_from_toml(reader_->config_toml(), dir_ + "/config.toml");
  state_ = reader_->trainer_state();
}

CheckpointReader::~CheckpointReader() = default;

bool CheckpointReader::has_optimizer() const { return reader_->has("m") && reader_->has("v"); }

void expect_same_model(const model::ModelConfig& saved, const model::ModelConfig& c,
                       const std::string& where) {
  std::string diff;
  auto cmp = [&](const char* key, auto a, auto b) {
    if (a != b) diff += fmt::format("{}{} = {} (checkpoint) vs {} (expected)",
                                    diff.empty() ? "" : "; ", key, a, b);
  };
  cmp("vocab", saved.vocab, c.vocab);
  cmp("n_layers", saved.n_layers, c.n_layers);
  cmp("d_model", saved.d_model, c.d_model);
  cmp("n_heads", saved.n_heads, c.n_heads);
  cmp("n_kv_heads", saved.n_kv_heads, c.n_kv_heads);
  cmp("d_ff", saved.d_ff, c.d_ff);
  cmp("max_seq", saved.max_seq, c.max_seq);
  cmp("activation", std::string(model::activation_name(saved.activation)),
      std::string(model::activation_name(c.activation)));
  cmp("query_layer", saved.query_layer, c.query_layer);
  cmp("norm_eps", saved.norm_eps, c.norm_eps);
  // Sparse blocks: what fixes the tensors and the routing (capacity_factor and aux_loss_coef
  // are training settings and may change between runs).
  const model::MoeConfig &sm = saved.moe, &cm = c.moe;
  cmp("moe.sparse_layers", fmt::format("[{}]", fmt::join(sm.sparse_layers, ", ")),
      fmt::format("[{}]", fmt::join(cm.sparse_layers, ", ")));
  if (sm.enabled() && cm.enabled()) {
    cmp("moe.router", std::string(model::router_name(sm.router)),
        std::string(model::router_name(cm.router)));
    cmp("moe.experts", sm.experts, cm.experts);
    cmp("moe.expert_d_ff", sm.expert_d_ff, cm.expert_d_ff);
    cmp("moe.domains", fmt::format("[{}]", fmt::join(sm.domains, ", ")),
        fmt::format("[{}]", fmt::join(cm.domains, ", ")));
    cmp("moe.experts_per_domain", sm.experts_per_domain, cm.experts_per_domain);
    cmp("moe.top_k", sm.top_k, cm.top_k);
  }
  LOOM_CHECK(diff.empty(), "checkpoint '{}' is of a different model: {}", where, diff);
}

void CheckpointReader::expect_config(const model::ModelConfig& c) const {
  expect_same_model(cfg_, c, dir_);
}

// Elements [begin, end) of the layout's flat buffer, tensor by tensor, each as the local slice
// its ParamSpec describes (so a tp shard reads only its rows or columns).
void CheckpointReader::load(const char* kind, const model::ParamLayout& layout, float* dst,
                            int64_t begin, int64_t end) const {
  if (end < 0) end = layout.total();
  for (const auto& s : layout.specs()) {
    int64_t lo = std::max(s.offset, begin), hi = std::min(s.offset + s.numel, end);
    if (lo >= hi) continue;
    LOOM_CHECK(reader_->has(kind, s.name), "checkpoint '{}' has no {} tensor '{}'", dir_, kind,
               s.name);
    const Shape& stored = reader_->shape(kind, s.name);
    LOOM_CHECK(stored == s.global_shape,
               "checkpoint '{}': {} tensor '{}' has shape {} but the model expects {}", dir_,
               kind, s.name, shape_str(stored), shape_str(s.global_shape));
    reader_->read(kind, piece_of(s, lo - s.offset, hi - s.offset), dst + (lo - begin));
  }
}

void CheckpointReader::load_weights(const model::ParamLayout& layout, float* weights,
                                    int64_t begin, int64_t end) const {
  if (end < 0) end = layout.total();
  load("weights", layout, weights + begin, begin, end);
}

void CheckpointReader::load_weights_packed(const model::ParamLayout& layout, float* packed,
                                           int64_t begin, int64_t end) const {
  load("weights", layout, packed, begin, end);
}

DType CheckpointReader::weight_dtype(const std::string& name) const {
  return reader_->dtype("weights", name);
}

bool CheckpointReader::has_int8_weights() const {
  for (const std::string& n : reader_->names("weights"))
    if (reader_->dtype("weights", n) == DType::i8) return true;
  return false;
}

void CheckpointReader::load_int8(const model::ParamSpec& spec, int8_t* q,
                                 float* row_scales) const {
  LOOM_CHECK(reader_->has("weights", spec.name), "checkpoint '{}' has no weights tensor '{}'",
             dir_, spec.name);
  reader_->read_int8_rows("weights", piece_of(spec, 0, spec.numel), q, row_scales);
}

int64_t CheckpointReader::load_optimizer(const model::ParamLayout& layout, float* m, float* v,
                                         int64_t begin, int64_t end) const {
  LOOM_CHECK(has_optimizer(), "checkpoint '{}' has no optimizer state (no m and v tensors)",
             dir_);
  load("m", layout, m, begin, end);
  load("v", layout, v, begin, end);
  if (reader_->legacy_format()) return reader_->legacy_optimizer_step();
  for (const char* key : {"optimizer_step", "step"})
    if (state_.contains(key) && state_[key].is_number_integer()) return state_[key].get<int64_t>();
  LOOM_FAIL("'{}/trainer_state.json' has no integer \"optimizer_step\" or \"step\"", dir_);
}

}  // namespace loom::interop
