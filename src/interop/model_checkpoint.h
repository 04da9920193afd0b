// checkpoint/checkpoint.h: whole-model checkpoints (the pre-sharding API), written atomically and
// verified on load. New code should use sharded.h (ShardedWriter / ShardedReader), which does not
// depend on model/ and writes each rank's pieces; this API is kept for its existing callers.
//
// save_checkpoint writes a flat checkpoint: a directory holding
//   model.safetensors      every parameter by its fixed name (f32; save_checkpoint_streamed
//                          may store BF16, F16 or I8 + "<name>:row_scales", see StorageDType)
//   optimizer.safetensors  AdamW state: "m.<name>", "v.<name>" (f32), step in metadata
//   config.toml            the ModelConfig
//   trainer_state.json     step, data-loader position, run settings (whatever the trainer puts)
//   checksums.json         SHA-256 and size of each file above (and any extra files)
// through the commit protocol of commit.h (flat layout): staged in PARENT/.NAME.staging-PID/,
// every file and the directory fsynced, then switched in by one renameat2(RENAME_EXCHANGE), so a
// crash at any point leaves either the old or the new checkpoint at <dir>, never a half one.
// CheckpointReader loads flat checkpoints and the sharded ones of sharded.h (a checkpoint
// directory, a directory of checkpoints or a run directory; see find_checkpoint), verifies every
// checksum, and checks names and shapes against the layout, naming the file on failure.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/safetensors.h"
#include "checkpoint/sharded.h"
#include "model/config.h"
#include "model/params.h"

namespace loom::interop {


struct OptimizerState {
  const float* m = nullptr;  // (layout.total()) or null: no optimizer file
  const float* v = nullptr;
  int64_t step = 0;
};

// `write_extra(tmp_dir)` may add files (e.g. the tokenizer) before checksums are computed.
void save_checkpoint(const std::string& dir, const model::ModelConfig& cfg,
                     const model::ParamLayout& layout, const float* weights,
                     const OptimizerState& opt, const nlohmann::json& trainer_state,
                     const std::function<void(const std::string&)>& write_extra = {});

// How save_checkpoint_streamed stores a parameter (checkpoint/sharded.h, "Storage dtypes"):
// F32; BF16 or F16, rounded to nearest even from the produced f32 (exact when the values came
// from that dtype); I8, int8 per output row with F32 "<name>:row_scales" by
// kernels::quantize_rows_int8 (the rule infer/ applies at load time; 2-D parameters only).
using StorageDType = std::function<DType(const model::ParamSpec&)>;

// The same flat checkpoint without optimizer state, with each parameter produced when its turn
// to be written comes: `produce(spec, dst)` fills spec.numel f32 values (the buffer is zeroed
// first and freed after) and `storage` (default: F32 for all) picks how it is stored. Peak
// memory is the largest parameter (in f32 plus its stored form), not the model: this is how
// `loom convert` and `loom quantize` write models larger than memory.
void save_checkpoint_streamed(
    const std::string& dir, const model::ModelConfig& cfg, const model::ParamLayout& layout,
    const std::function<void(const model::ParamSpec&, float*)>& produce,
    const nlohmann::json& trainer_state,
    const std::function<void(const std::string&)>& write_extra = {},
    const StorageDType& storage = {});

// Throws loom::Error listing the differing keys unless `saved` (a checkpoint's config, read from
// `where`) is the model `expected`.
void expect_same_model(const model::ModelConfig& saved, const model::ModelConfig& expected,
                       const std::string& where);

class CheckpointReader {
 public:
  // Opens `dir`, verifies every checksum and parses config.toml and trainer_state.json.
  explicit CheckpointReader(const std::string& dir);
  ~CheckpointReader();

  const std::string& dir() const { return dir_; }
  const model::ModelConfig& config() const { return cfg_; }
  const nlohmann::json& trainer_state() const { return state_; }
  bool has_optimizer() const;

  // Throws loom::Error listing the differing keys unless the checkpoint's config equals `cfg`.
  void expect_config(const model::ModelConfig& cfg) const;
  // Parameters [begin, end) of the flat buffer (default: all) into weights + begin, as f32
  // (BF16 / F16 widened exactly, I8 dequantized: ShardedReader::read).
  void load_weights(const model::ParamLayout& layout, float* weights, int64_t begin = 0,
                    int64_t end = -1) const;
  // The same, packed: elements [begin, end) into dst (end-begin floats).
  void load_weights_packed(const model::ParamLayout& layout, float* dst, int64_t begin,
                           int64_t end) const;
  // How a weight tensor is stored (F32, BF16, F16 or I8); whether any is I8 (`loom quantize`).
  DType weight_dtype(const std::string& name) const;
  bool has_int8_weights() const;
  // An I8 parameter's local slice (spec, as ParamLayout gives it; tp shards included) as stored:
  // q (spec.numel) and one scale per local row (spec.shape[0]); a column shard gets the scales
  // of its whole rows. Throws naming the tensor if it is not I8.
  void load_int8(const model::ParamSpec& spec, int8_t* q, float* row_scales) const;
  // Optimizer moments for [begin, end) into m, v (each end-begin floats); returns the step (a
  // sharded checkpoint's trainer_state "optimizer_step", else its "step").
  int64_t load_optimizer(const model::ParamLayout& layout, float* m, float* v, int64_t begin = 0,
                         int64_t end = -1) const;

 private:
  void load(const char* kind, const model::ParamLayout& layout, float* dst, int64_t begin,
            int64_t end) const;

  std::string dir_;
  model::ModelConfig cfg_;
  nlohmann::json state_;
  std::unique_ptr<checkpoint::ShardedReader> reader_;
};


}  // namespace loom::interop
